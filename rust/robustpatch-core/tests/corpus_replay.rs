//! Replays the fuzz corpora (fuzz/corpus/*) through the fuzz targets' checks, on the
//! selected SIMD path and, in child processes, on every other path this CPU runs (the
//! path is chosen once per process). A crash `cargo fuzz` finds lands in the
//! uncommitted fuzz/artifacts/: copy its input into the corpus to keep replaying it.

use robustpatch_core::arch::{self, Simd};
use robustpatch_core::fuzzing::{check_apply, check_header};
use std::path::Path;
use std::process::Command;

/// Corpus sizes when this was written: a replay of far fewer means a lost corpus.
const HEADER_FLOOR: usize = 1500;
const APPLY_FLOOR: usize = 190;

fn replay(dir: &str, check: fn(&[u8])) -> usize {
    // A path this CPU lacks would refuse every input quietly: fail instead.
    arch::selected().expect("ROBUSTPATCH_SIMD names a path this CPU runs");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(dir);
    let mut n = 0;
    for entry in std::fs::read_dir(&root).expect("corpus folder exists") {
        let path = entry.unwrap().path();
        check(&std::fs::read(&path).unwrap());
        n += 1;
    }
    n
}

#[test]
fn header_corpus_replays_cleanly() {
    assert!(replay("header", check_header) >= HEADER_FLOOR);
}

#[test]
fn apply_corpus_replays_cleanly() {
    assert!(replay("apply", check_apply) >= APPLY_FLOOR);
}

#[test]
fn corpora_replay_on_every_path_this_cpu_runs() {
    if std::env::var_os(arch::ENV).is_some() {
        return; // a child (or a forced run): the two tests above are the replay
    }
    let me = std::env::current_exe().unwrap();
    for simd in Simd::available() {
        let name = simd.path().name();
        let out = Command::new(&me)
            .env(arch::ENV, name)
            .args(["corpus_replays_cleanly", "--test-threads=1"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {text}");
        assert!(text.contains("2 passed"), "{name}: {text}");
    }
}
