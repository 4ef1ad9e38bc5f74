//! The registry with fake attestors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::Code;

use super::*;
use crate::Error;
use crate::node::fake::assert_status;

/// Says `selectors` of every caller, or refuses every caller, and counts its calls.
#[derive(Debug, Default)]
struct Fake {
    selectors: Vec<&'static str>,
    refuse: Option<&'static str>,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl WorkloadAttestor for Fake {
    async fn attest(&self, _caller: &Caller) -> Result<Vec<Selector>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(reason) = self.refuse {
            return Err(Error::CallerRefused(reason.to_string()));
        }
        Ok(self
            .selectors
            .iter()
            .map(|text| {
                let (kind, value) = text.split_once(':').expect("kind:value");
                Selector::new(kind, value).expect("selector")
            })
            .collect())
    }
}

fn says(selectors: &[&'static str]) -> Fake {
    Fake {
        selectors: selectors.to_vec(),
        ..Fake::default()
    }
}

fn caller() -> Caller {
    Caller {
        pid: Some(4242),
        uid: 1000,
        gid: 1000,
        process: None,
    }
}

#[tokio::test]
async fn the_selectors_of_every_attestor_are_combined_sorted_and_without_repeats() {
    let attestors = WorkloadAttestors::default()
        .with(says(&["unix:uid:1000", "unix:gid:1000"]))
        .with(says(&["k8s:ns:web", "unix:uid:1000"]));
    let selectors = attestors.attest(&caller()).await.expect("attested");
    let texts: Vec<String> = selectors.iter().map(ToString::to_string).collect();
    assert_eq!(texts, ["k8s:ns:web", "unix:gid:1000", "unix:uid:1000"]);
}

#[tokio::test]
async fn an_attestor_that_refuses_refuses_the_caller_and_the_next_is_not_asked() {
    let next = says(&["k8s:ns:web"]);
    let next_calls = next.calls.clone();
    let attestors = WorkloadAttestors::default()
        .with(says(&["unix:uid:1000"]))
        .with(Fake {
            refuse: Some("process 4242 is gone"),
            ..Fake::default()
        })
        .with(next);
    let refused = attestors.attest(&caller()).await.expect_err("refused");
    assert_status(refused, Code::PermissionDenied, &["process 4242 is gone"]);
    assert_eq!(next_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn no_attestor_no_selectors() {
    let selectors = WorkloadAttestors::default()
        .attest(&caller())
        .await
        .expect("attested");
    assert!(selectors.is_empty());
}
