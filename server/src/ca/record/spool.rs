//! The issuance spool: issuance records the datastore could not take, one JSON object per line
//! in `<data_dir>/issuance-spool.jsonl` (mode 0600), each append fsynced before its SVIDs leave
//! the server.
//!
//! A line cut short by a crash is a record whose receipt was never sent, so its SVID never left
//! the server: opening the spool drops it. The file never grows past its bound; an append that
//! would is refused whole.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::datastore::IssuedSvid;
use crate::{Error, Result};

/// The spool's file name in the data directory.
pub const SPOOL_FILE: &str = "issuance-spool.jsonl";

/// The open spool file and what it holds.
#[derive(Debug)]
pub(super) struct Spool {
    path: PathBuf,
    file: File,
    bytes: u64,
    records: u64,
    max_bytes: u64,
}

impl Spool {
    /// Opens (or creates) the spool at `path`, dropping a trailing line cut short by a crash.
    pub(super) fn open(path: PathBuf, max_bytes: u64) -> Result<Self> {
        let io =
            |what: &str, e| Error::io(format!("{what} the issuance spool {}", path.display()), e);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("cannot open", e))?;
        let mut content = Vec::new();
        file.read_to_end(&mut content)
            .map_err(|e| io("cannot read", e))?;
        let complete = content
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |newline| newline + 1);
        if complete < content.len() {
            tracing::warn!(
                bytes = content.len() - complete,
                "dropping a partly written record at the end of the issuance spool (its SVID was never handed out)"
            );
            file.set_len(complete as u64)
                .and_then(|()| file.sync_data())
                .map_err(|e| io("cannot repair", e))?;
        }
        let records = content[..complete].iter().filter(|b| **b == b'\n').count() as u64;
        if let Some(dir) = path.parent() {
            // The file's directory entry must survive a power cut too.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("cannot sync the directory of", e))?;
        }
        Ok(Spool {
            path,
            file,
            bytes: complete as u64,
            records,
            max_bytes,
        })
    }

    /// True when no record waits.
    pub(super) fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// How many records wait.
    pub(super) fn records(&self) -> u64 {
        self.records
    }

    /// Appends `records` and waits until they are on disk; all or none.
    pub(super) fn append(&mut self, records: &[IssuedSvid]) -> Result<()> {
        let mut lines = Vec::with_capacity(records.len() * 256);
        for record in records {
            serde_json::to_writer(&mut lines, record)
                .map_err(|e| Error::datastore_caused("cannot encode an issuance record", e))?;
            lines.push(b'\n');
        }
        if self.bytes + lines.len() as u64 > self.max_bytes {
            return Err(Error::Unavailable(format!(
                "the issuance spool {} is full ({} records, {} of at most {} bytes, `[issuance_record] spool_max_mib`): the datastore has been away too long; bring it back and the spool drains",
                self.path.display(),
                self.records,
                self.bytes,
                self.max_bytes
            )));
        }
        // The blocking write and fsync run on the writer task's thread: the spool is in use only
        // while the datastore is away, and a batch is one write and one fsync.
        let written = self
            .file
            .write_all(&lines)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Take back a partial append so the file holds whole lines only.
            let _ = self.file.set_len(self.bytes);
            return Err(Error::io(
                format!("cannot write to the issuance spool {}", self.path.display()),
                e,
            ));
        }
        self.bytes += lines.len() as u64;
        self.records += records.len() as u64;
        Ok(())
    }

    /// Every record in the spool, oldest first. A line that does not parse (the file was edited
    /// or damaged) is logged and skipped.
    pub(super) fn read_all(&self) -> Result<Vec<IssuedSvid>> {
        let content = std::fs::read(&self.path).map_err(|e| {
            Error::io(
                format!("cannot read the issuance spool {}", self.path.display()),
                e,
            )
        })?;
        let mut records = Vec::with_capacity(usize::try_from(self.records).unwrap_or(0));
        for (number, line) in content.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice(line) {
                Ok(record) => records.push(record),
                Err(e) => tracing::error!(
                    line = number + 1,
                    error = %e,
                    path = %self.path.display(),
                    "skipping an issuance spool line that is not a record"
                ),
            }
        }
        Ok(records)
    }

    /// Empties the spool once the datastore holds everything in it.
    pub(super) fn clear(&mut self) -> Result<()> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| {
                Error::io(
                    format!("cannot empty the issuance spool {}", self.path.display()),
                    e,
                )
            })?;
        self.bytes = 0;
        self.records = 0;
        Ok(())
    }
}
