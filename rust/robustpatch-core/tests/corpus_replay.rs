//! Replays the fuzz corpora (fuzz/corpus/*) through the fuzz targets' checks, on the
//! selected SIMD path and, in child processes, on every other path this CPU runs (the
//! path is chosen once per process). A crash `cargo fuzz` finds lands in the
//! uncommitted fuzz/artifacts/: copy its input into the corpus to keep replaying it.

use robustpatch_core::arch::{self, Simd};
use robustpatch_core::fuzzing::{check_apply, check_header};
use robustpatch_core::par::TILE;
use std::path::Path;
use std::process::Command;

/// Corpus sizes when this was written: a replay of far fewer means a lost corpus.
const HEADER_FLOOR: usize = 1500;
const APPLY_FLOOR: usize = 190;
/// Header inputs the parser accepts: 13 the fuzzer found, 6 written by
/// safetensors (every dtype class, empty and scalar tensors, metadata).
const HEADER_ACCEPTED_FLOOR: usize = 19;

/// Inputs of the apply corpus that span several tiles of the kernels (with a
/// partial tile after them): the fuzzer's own inputs stay below one.
const APPLY_PAST_ONE_TILE_FLOOR: usize = 7;

/// Each corpus input of `dir` through `check`, in turn: what `check` returned.
fn replay<R>(dir: &str, check: fn(&[u8]) -> R) -> Vec<R> {
    // A path this CPU lacks would refuse every input quietly: fail instead.
    arch::selected().expect("ROBUSTPATCH_SIMD names a path this CPU runs");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(dir);
    let entries = std::fs::read_dir(&root).expect("corpus folder exists");
    entries
        .map(|entry| check(&std::fs::read(entry.unwrap().path()).unwrap()))
        .collect()
}

#[test]
fn header_corpus_replays_cleanly() {
    let parsed = replay("header", check_header);
    assert!(parsed.len() >= HEADER_FLOOR);
    let accepted = parsed.iter().filter(|&&ok| ok).count();
    assert!(accepted >= HEADER_ACCEPTED_FLOOR, "{accepted}");
}

#[test]
fn apply_corpus_replays_cleanly() {
    let applied = replay("apply", check_apply);
    assert!(applied.len() >= APPLY_FLOOR);
    let past_one_tile = applied.iter().flatten().filter(|&&n| n > TILE).count();
    assert!(
        past_one_tile >= APPLY_PAST_ONE_TILE_FLOOR,
        "{past_one_tile}"
    );
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
