//! The recorder against a real SQLite datastore, with a switch in front of it that makes the
//! datastore refuse or hang, as a database outage does.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::UNIX_EPOCH;

use sigil_core::clock::ManualClock;

use super::*;
use crate::datastore::{SqlDataStore, SvidFilter};

/// How the switched datastore behaves.
const UP: u8 = 0;
const REFUSING: u8 = 1;
const HANGING: u8 = 2;

/// The real datastore behind a switch: up, refusing every call, or never answering.
struct Switched {
    inner: SqlDataStore,
    mode: AtomicU8,
}

impl Switched {
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    async fn gate(&self) -> crate::Result<()> {
        match self.mode.load(Ordering::SeqCst) {
            UP => Ok(()),
            REFUSING => Err(Error::DatastoreUnavailable(
                "switched off by the test".into(),
            )),
            _ => std::future::pending().await,
        }
    }
}

impl IssuedSvidStore for Switched {
    async fn record_issued_svids(&self, svids: &[IssuedSvid]) -> crate::Result<()> {
        self.gate().await?;
        self.inner.record_issued_svids(svids).await
    }
    async fn list_issued_svids(&self, filter: &SvidFilter) -> crate::Result<Vec<IssuedSvid>> {
        self.inner.list_issued_svids(filter).await
    }
    async fn get_issued_svid(&self, serial: &str) -> crate::Result<Option<IssuedSvid>> {
        self.inner.get_issued_svid(serial).await
    }
    async fn prune_issued_svids(&self, before: i64) -> crate::Result<u64> {
        self.inner.prune_issued_svids(before).await
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<Switched>,
    metrics: Arc<Metrics>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ));
    let url = format!("sqlite://{}", dir.path().join("db.sqlite3").display());
    let inner = SqlDataStore::connect(&url, clock).await.expect("datastore");
    Fixture {
        dir,
        store: Arc::new(Switched {
            inner,
            mode: AtomicU8::new(UP),
        }),
        metrics: Arc::new(Metrics::default()),
    }
}

impl Fixture {
    fn settings(&self, spool_max_bytes: u64) -> RecorderSettings {
        RecorderSettings {
            data_dir: self.dir.path().to_path_buf(),
            spool_max_bytes,
            write_timeout: Duration::from_millis(200),
        }
    }

    fn start(&self) -> (IssuanceRecorder, JoinHandle<()>) {
        IssuanceRecorder::start(
            self.store.clone(),
            &self.settings(1 << 20),
            self.metrics.clone(),
        )
        .expect("recorder")
    }

    async fn stored(&self) -> usize {
        self.store
            .list_issued_svids(&SvidFilter::default())
            .await
            .expect("list")
            .len()
    }

    fn spool_lines(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join(SPOOL_FILE))
            .expect("spool")
            .lines()
            .count()
    }

    fn spool_gauge(&self) -> i64 {
        self.metrics.issuance_spool_records.get()
    }

    /// Waits (real time: the datastore's pool needs it) until a replay has emptied the spool.
    async fn wait_drained(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.spool_gauge() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the spool never drained"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn record(n: usize) -> IssuedSvid {
    IssuedSvid {
        serial: format!("{n:040x}"),
        kind: "x509".into(),
        spiffe_id: "spiffe://example.org/w".into(),
        agent_id: "spiffe://example.org/sigil/agent/join_token/t".into(),
        entry_id: "e".into(),
        authority_id: "a".into(),
        not_before: 1_800_000_000,
        not_after: 1_800_003_600,
    }
}

/// Records `range` concurrently, as a burst of signing calls does, and waits for every receipt.
async fn record_all(
    recorder: &IssuanceRecorder,
    range: std::ops::Range<usize>,
) -> Vec<Result<usize>> {
    let pending: Vec<_> = range.map(|n| recorder.record(n, record(n))).collect();
    futures::future::join_all(pending.into_iter().map(Unrecorded::recorded)).await
}

#[tokio::test]
async fn a_receipt_means_the_record_is_in_the_datastore() {
    let fixture = fixture().await;
    let (recorder, task) = fixture.start();
    let results = record_all(&recorder, 0..300).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        fixture.stored().await,
        300,
        "every answered SVID has its row"
    );
    drop(recorder);
    task.await.expect("writer");
    assert_eq!(fixture.spool_lines(), 0);
}

#[tokio::test]
async fn an_outage_spools_records_and_they_reach_the_datastore_when_it_is_back() {
    for outage in [REFUSING, HANGING] {
        let fixture = fixture().await;
        let (recorder, task) = fixture.start();
        fixture.store.set(outage);
        let results = record_all(&recorder, 0..50).await;
        assert!(
            results.iter().all(Result::is_ok),
            "signing goes on during an outage: {results:?}"
        );
        // While the spool holds records, new batches join it without waiting on the datastore.
        assert!(
            record_all(&recorder, 50..60)
                .await
                .iter()
                .all(Result::is_ok)
        );
        assert_eq!(fixture.spool_lines(), 60, "all sixty are on disk");
        assert_eq!(fixture.spool_gauge(), 60);
        assert_eq!(fixture.stored().await, 0);

        fixture.store.set(UP);
        // The next replay (within REPLAY_INTERVAL) moves everything; wait for the gauge to drop.
        fixture.wait_drained().await;
        assert_eq!(fixture.stored().await, 60);
        assert_eq!(
            fixture.spool_lines(),
            0,
            "the spool is emptied after the replay"
        );
        drop(recorder);
        task.await.expect("writer");
    }
}

#[tokio::test]
async fn records_spooled_before_a_crash_are_replayed_by_the_next_run() {
    let fixture = fixture().await;
    let (recorder, task) = fixture.start();
    fixture.store.set(REFUSING);
    assert!(record_all(&recorder, 0..40).await.iter().all(Result::is_ok));
    // kill -9: the task dies where it stands, without its shutdown replay.
    task.abort();
    let _ = task.await;
    drop(recorder);
    // The crash also cut a record short mid-line; its receipt was never sent.
    let spool = fixture.dir.path().join(SPOOL_FILE);
    let mut content = std::fs::read(&spool).expect("spool");
    content.extend_from_slice(br#"{"serial":"cut-sh"#);
    std::fs::write(&spool, content).expect("write");

    fixture.store.set(UP);
    let (recorder, task) = fixture.start();
    assert_eq!(fixture.spool_gauge(), 40, "the next run finds the forty");
    // A new record goes in at once behind the replay.
    assert!(
        record_all(&recorder, 40..41)
            .await
            .iter()
            .all(Result::is_ok)
    );
    fixture.wait_drained().await;
    assert_eq!(fixture.stored().await, 41);
    drop(recorder);
    task.await.expect("writer");
}

#[tokio::test]
async fn a_full_spool_refuses_the_svid_and_keeps_what_it_holds() {
    let fixture = fixture().await;
    // Room for about ten records.
    let (recorder, task) = IssuanceRecorder::start(
        fixture.store.clone(),
        &fixture.settings(3_000),
        fixture.metrics.clone(),
    )
    .expect("recorder");
    fixture.store.set(REFUSING);
    let mut accepted = 0;
    let mut refusal = None;
    for n in 0..100 {
        match recorder.record(n, record(n)).recorded().await {
            Ok(_) => accepted += 1,
            Err(e) => {
                refusal = Some(e.to_string());
                break;
            }
        }
    }
    let refusal = refusal.expect("the spool fills up");
    assert!(refusal.contains("spool_max_mib"), "{refusal}");
    assert!(refusal.contains("not handed out"), "{refusal}");
    assert!(accepted > 0);
    assert_eq!(
        fixture.spool_lines(),
        accepted,
        "the accepted records stay spooled"
    );
    fixture.store.set(UP);
    drop(recorder);
    // Shutting down offers the spool to the datastore once more.
    task.await.expect("writer");
    assert_eq!(fixture.stored().await, accepted);
}
