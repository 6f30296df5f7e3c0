//! Replays the fuzz corpora (fuzz/corpus/*) through the fuzz targets' checks, so
//! every input a fuzzer ever kept — including past crashes — runs in CI.

use robustpatch_core::fuzzing::{check_apply, check_header};
use std::path::Path;

fn replay(dir: &str, check: fn(&[u8])) -> usize {
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
    assert!(replay("header", check_header) >= 4);
}

#[test]
fn apply_corpus_replays_cleanly() {
    assert!(replay("apply", check_apply) >= 4);
}
