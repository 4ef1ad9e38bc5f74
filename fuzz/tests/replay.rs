//! Replays every file of `corpus/<target>/` through its target as a plain test, so an input that
//! once crashed a target (added to the corpus, see docs/fuzzing.md) fails CI until it is fixed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use sigil_fuzz::{TARGETS, Target};

fn fuzz_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let body: Target = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, body)| *body)
        .unwrap_or_else(|| panic!("{target} is not in sigil_fuzz::TARGETS"));
    let files = corpus_files(target);
    assert!(
        !files.is_empty(),
        "corpus/{target}/ is empty; run `cargo run -p sigil-fuzz --example make-corpus`"
    );
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).expect("a readable corpus file");
            catch_unwind(AssertUnwindSafe(|| body(&data))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{target} panicked on {} of {} corpus files: {failed:#?}",
        failed.len(),
        files.len()
    );
}

macro_rules! replay_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*

        /// Every target of the library has a test here, a libFuzzer target and a corpus, and
        /// every corpus directory belongs to a target.
        #[test]
        fn every_target_is_replayed_and_fuzzed() {
            let replayed = [$(stringify!($target)),*];
            for (name, _) in TARGETS {
                assert!(replayed.contains(name), "{name} has no replay test");
                let target = fuzz_dir()
                    .join("libfuzzer/fuzz_targets")
                    .join(format!("{name}.rs"));
                assert!(target.is_file(), "{} is missing", target.display());
            }
            assert_eq!(replayed.len(), TARGETS.len(), "a replay test without a target");
            for entry in std::fs::read_dir(fuzz_dir().join("corpus")).expect("corpus/") {
                let name = entry.expect("an entry").file_name();
                let name = name.to_string_lossy();
                assert!(
                    TARGETS.iter().any(|(target, _)| *target == name),
                    "corpus/{name}/ belongs to no target"
                );
            }
        }
    };
}

replay_tests!(
    spiffe_id,
    selector,
    csr,
    csr_sans,
    certificate,
    bundle_json,
    federation_bundle,
    jwt_svid,
    jwt_claims,
    server_config,
    agent_config,
    forwarder_config,
    id_pattern,
    cgroup,
    path_normalize,
    authority_rewriter,
);
