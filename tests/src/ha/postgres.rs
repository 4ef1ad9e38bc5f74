//! A private Postgres instance for the high-availability suite: its own data directory, port and
//! socket directory, started with `initdb` and `pg_ctl` from `/usr/lib/postgresql/<version>/bin`,
//! so the suite can stop and restart the database without touching the machine's shared Postgres
//! that other tests use. Run as the `postgres` user (through `runuser`) when the test runs as root,
//! because Postgres refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};

/// Where Debian and Ubuntu install the Postgres server binaries, one directory per version.
const POSTGRES_LIB: &str = "/usr/lib/postgresql";

/// A Postgres instance owned by one test, stopped (immediately) when dropped.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    socket_dir: PathBuf,
    /// The TCP port on 127.0.0.1 it listens on.
    pub port: u16,
    as_postgres_user: bool,
    running: bool,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// Makes and starts a fresh instance, or `None` (with a printed notice) when the Postgres
    /// server binaries are not installed on a developer machine; under `CI=true` that is an error.
    pub fn start(test: &str) -> anyhow::Result<Option<Self>> {
        let Some(bin) = server_binaries() else {
            crate::skip_unless_ci(
                test,
                &format!("no Postgres server binaries (initdb, pg_ctl) under {POSTGRES_LIB}/*/bin"),
                "install them (Debian: apt-get install postgresql)",
            )?;
            return Ok(None);
        };
        let as_postgres_user = crate::current_uid()? == 0;
        let dir = tempfile::Builder::new().prefix("sigil-pg").tempdir()?;
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir)?;
        if as_postgres_user {
            // Postgres runs as its own user and must own its directories.
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path()))?;
        }
        let mut postgres = PrivatePostgres {
            data: dir.path().join("data"),
            log: dir.path().join("postgres.log"),
            socket_dir,
            port: crate::free_port()?,
            bin,
            as_postgres_user,
            running: false,
            _dir: dir,
        };
        postgres.initdb()?;
        postgres.start_again()?;
        Ok(Some(postgres))
    }

    /// The URL of its `postgres` database (trust authentication, as the `postgres` user).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the instance after [`PrivatePostgres::stop`], on the same port; waits until it
    /// accepts connections.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.socket_dir.display()
        );
        let mut command = self.pg_ctl("start");
        command.arg("-l").arg(&self.log).args(["-o", &options]);
        self.checked(command, "pg_ctl start")?;
        self.running = true;
        Ok(())
    }

    /// Stops the instance the way an operator's restart does (`pg_ctl stop -m fast`: open
    /// connections are cut, nothing committed is lost).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let mut command = self.pg_ctl("stop");
        command.args(["-m", "fast"]);
        self.checked(command, "pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    /// Stops and starts the instance again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    fn initdb(&self) -> anyhow::Result<()> {
        let mut command = self.command("initdb");
        command.arg("-D").arg(&self.data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        self.checked(command, "initdb")
    }

    /// `pg_ctl <action> -D <data> -w`, waiting up to 60 s.
    fn pg_ctl(&self, action: &str) -> Command {
        let mut command = self.command("pg_ctl");
        command
            .arg(action)
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60"]);
        command
    }

    /// `program` from the version's bin directory, through `runuser -u postgres --` as root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// Runs `command`; on failure the error carries its output and the server's log.
    fn checked(&self, mut command: Command, what: &str) -> anyhow::Result<()> {
        run(&mut command).with_context(|| {
            format!(
                "{what} failed; postgres log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let mut command = self.pg_ctl("stop");
            command.args(["-m", "immediate"]);
            let _ = command.output();
        }
    }
}

/// The bin directory of the newest installed Postgres version that has `initdb` and `pg_ctl`.
fn server_binaries() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(POSTGRES_LIB)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn has_server_binaries(bin: &Path) -> bool {
    bin.join("initdb").exists() && bin.join("pg_ctl").exists()
}

/// Runs `command` to completion; an error with its stdout and stderr unless it succeeded.
fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    ensure!(
        output.status.success(),
        "{:?} exited with {}: {}{}",
        command.get_program(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
