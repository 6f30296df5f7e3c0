"""Sharded checkpoints (``*.index.json`` + shards): patched shard by shard into an atomic
folder, untouched shards hard-linked, restored bit for bit; hostile indexes refused with
nothing written."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

import robustpatch as rp
from robustpatch._format.safetensors import read_tensors, write_tensors
from robustpatch.cli import main
from robustpatch.errors import FormatError, InvalidArgumentError, MismatchError
from robustpatch.sharded import RECORD_NAME, remove_stale_folders
from rp_testutil import child_peak_mib, listing, sha

INDEX = "model.safetensors.index.json"
#: tensor -> shard it lives in (shard 1 is touched by no signature)
LAYOUT = {
    "embed.weight": 0,
    "layers.0.weight": 0,
    "layers.1.weight": 1,
    "layers.1.bias": 1,
    "layers.2.weight": 2,
    "head.weight": 2,
}


def shard_name(k: int, n: int = 3) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_sharded(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 3-shard checkpoint of float32 tensors; returns the tensors."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: rng.normal(size=(4, 6)).astype(np.float32) for n in LAYOUT}
    for k in range(3):
        part = {n: a for n, a in tensors.items() if LAYOUT[n] == k}
        write_tensors(folder / shard_name(k), part)
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
        "weight_map": {n: shard_name(k) for n, k in LAYOUT.items()},
    }
    (folder / INDEX).write_text(json.dumps(index))
    return tensors


def signature(seed: int = 1) -> rp.Signature:
    rng = np.random.default_rng(seed)
    names = ("embed.weight", "layers.2.weight")  # shards 0 and 2
    return rp.Signature.from_deltas(
        {n: rng.normal(0, 0.1, (4, 6)).astype(np.float32) for n in names}, name="fog"
    )


@pytest.fixture
def ckpt(tmp_path):
    tensors = write_sharded(tmp_path / "base")
    sig = signature()
    sig.save(tmp_path / "fog.rws")
    return tmp_path, tensors, sig


def loaded(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for k in range(3):
        out.update(read_tensors(folder / shard_name(k))[1])
    return out


# ---------------------------------------------------------------------------- apply / remove


def test_apply_patches_touched_shards_links_the_rest_and_remove_restores_bit_for_bit(ckpt):
    d, tensors, sig = ckpt
    rep = rp.apply_file(d / "base" / INDEX, [d / "fog.rws"], 0.5, d / "out")
    assert rep.out == d / "out" and rep.undo == d / "out" / RECORD_NAME and rep.tensors == 2
    got = loaded(d / "out")
    for name, arr in tensors.items():
        delta = sig[name].dense() * np.float32(0.5) if name in sig else 0
        np.testing.assert_array_equal(got[name], arr + delta)
    untouched = (d / "base" / shard_name(1)).stat()
    assert (d / "out" / shard_name(1)).stat().st_ino == untouched.st_ino  # hard link
    assert (d / "out" / shard_name(0)).stat().st_ino != (d / "base" / shard_name(0)).stat().st_ino
    index = json.loads((d / "out" / INDEX).read_text())
    assert index["weight_map"] == json.loads((d / "base" / INDEX).read_text())["weight_map"]
    applied = index["metadata"]["robustpatch.applied"]
    assert applied == [{"name": "fog", "hash": sig.content_hash, "alpha": 0.5}]
    assert sorted(p.name for p in (d / "out").glob("*.rpundo")) == [
        shard_name(0) + ".rpundo",
        shard_name(2) + ".rpundo",
    ]

    rp.remove_file(d / "out", d / "restored")  # the folder works as the index does
    assert listing(d / "restored") == listing(d / "base")


def test_a_shard_with_an_interrupted_in_place_patch_is_refused(ckpt):
    # it was hard-linked into the output, which its later recovery changed through the link
    from robustpatch._io.journal import journal_path_for

    d, _, _ = ckpt
    rp.apply_file(d / "base", [d / "fog.rws"], 0.5, d / "out")
    journal_path_for(d / "base" / shard_name(1)).write_bytes(b"RPJRNL2\nP")
    journal_path_for(d / "out" / shard_name(1)).write_bytes(b"RPJRNL2\nP")
    before = listing(d)
    with pytest.raises(rp.errors.FormatError, match="robustpatch recover"):
        rp.apply_file(d / "base", [d / "fog.rws"], 0.5, d / "out2")
    with pytest.raises(rp.errors.FormatError, match="robustpatch recover"):
        rp.remove_file(d / "out", d / "restored")
    assert listing(d) == before and not (d / "out2").exists() and not (d / "restored").exists()


def test_an_output_in_a_missing_folder_is_named_in_the_error(ckpt):
    # the error named the temporary folder: nodir/.out.rp27294.bzhvvih6.tmp
    d, _, _ = ckpt
    with pytest.raises(FileNotFoundError) as e:
        rp.apply_file(d / "base", [d / "fog.rws"], 0.5, d / "nodir" / "out")
    assert e.value.filename == str(d / "nodir" / "out")


def test_a_folder_is_accepted_for_its_index_and_other_folders_stay_refused(ckpt, tmp_path):
    d, _, sig = ckpt
    rp.apply_file(d / "base", sig, 1.0, d / "out")
    assert (d / "out" / INDEX).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        rp.apply_file(empty, sig, 1.0, tmp_path / "o.safetensors")


def test_untouched_shards_are_copied_where_links_are_refused(ckpt, monkeypatch):
    d, _, sig = ckpt

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    rp.apply_file(d / "base", sig, 1.0, d / "out")
    copied = d / "out" / shard_name(1)
    assert copied.stat().st_ino != (d / "base" / shard_name(1)).stat().st_ino
    assert sha(copied) == sha(d / "base" / shard_name(1))


def test_cli_apply_and_remove_take_an_index(ckpt, capsys):
    d, _, _ = ckpt
    args = ["apply", str(d / "base" / INDEX), str(d / "fog.rws"), "-o", str(d / "out")]
    assert main([*args, "--json", "-q"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["file"] == str(d / "out") and rep["tensors"] == 2
    # a folder's name may end with a separator (a single file's may not: test_cli_edges)
    assert main(["remove", str(d / "out" / INDEX), "-o", f"{d / 'back'}/", "-q"]) == 0
    assert listing(d / "back") == listing(d / "base")
    assert main([*args, "-q"]) == 1  # exists: --overwrite needed
    assert "already exists" in capsys.readouterr().err


def test_overwrite_replaces_a_previous_output_whole(ckpt):
    d, tensors, sig = ckpt
    rp.apply_file(d / "base", sig, 1.0, d / "out")
    rp.apply_file(d / "base", sig, -1.0, d / "out")
    got = loaded(d / "out")
    np.testing.assert_array_equal(
        got["embed.weight"], tensors["embed.weight"] - sig["embed.weight"].dense()
    )
    assert [p.name for p in d.iterdir() if p.name.startswith(".out.")] == []


def test_a_folder_robustpatch_did_not_write_is_never_replaced(ckpt):
    d, _, sig = ckpt
    mine = d / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint robustpatch wrote"):
        rp.apply_file(d / "base", sig, 1.0, mine)
    assert listing(mine) == {"notes.txt": sha(mine / "notes.txt")}


def test_an_output_with_files_the_user_added_is_never_replaced(ckpt):
    # a folder with an undo record was replaced whole, the user's config.json with it
    d, _, sig = ckpt
    rp.apply_file(d / "base", sig, 1.0, d / "out")
    (d / "out" / "config.json").write_text("{}")
    before = listing(d / "out")
    with pytest.raises(FileExistsError, match="not a checkpoint robustpatch wrote"):
        rp.apply_file(d / "base", sig, 0.5, d / "out")
    assert listing(d / "out") == before


def test_an_output_folder_holding_an_input_is_refused(ckpt):
    d, _, sig = ckpt
    with pytest.raises(InvalidArgumentError, match="holds the input"):
        rp.apply_file(d / "base", sig, 1.0, d / "base")
    with pytest.raises(InvalidArgumentError, match="holds the input"):
        rp.apply_file(d / "base", d / "fog.rws", 1.0, d)
    with pytest.raises(InvalidArgumentError, match="written to a folder"):
        rp.apply_file(d / "base", sig, 1.0, d / "o.safetensors")


def test_a_signature_tensor_missing_from_every_shard_writes_nothing(ckpt):
    d, _, _ = ckpt
    bad = rp.Signature.from_deltas({"nowhere.weight": np.ones((4, 6), np.float32)})
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(MismatchError, match="nowhere.weight"):
        rp.apply_file(d / "base", bad, 1.0, d / "out")
    assert sorted(p.name for p in d.iterdir()) == before


def test_an_error_in_a_later_shard_leaves_no_folder(ckpt):
    """The first shard is written before the last one fails to overflow-check."""
    d, tensors, _ = ckpt
    huge = {
        "embed.weight": np.ones((4, 6), np.float32),
        "head.weight": np.full((4, 6), 3e38, np.float32),
    }
    sig = rp.Signature.from_deltas(huge)
    with pytest.raises(rp.NonFiniteError):
        rp.apply_file(d / "base", sig, 10.0, d / "out")
    assert not (d / "out").exists()
    assert [p.name for p in d.iterdir() if p.name.startswith(".out.")] == []


def test_removal_refuses_a_changed_untouched_shard_and_a_changed_index(ckpt):
    d, _, sig = ckpt
    rp.apply_file(d / "base", sig, 1.0, d / "out")
    index = d / "out" / INDEX
    index.write_text(index.read_text().replace('"fog"', '"fig"'))
    with pytest.raises(MismatchError, match="index changed"):
        rp.remove_file(d / "out", d / "back")
    rp.apply_file(d / "base", sig, 1.0, d / "out2")
    linked = d / "out2" / shard_name(1)
    other = write_tensors(
        d / "x.safetensors",
        {
            "layers.1.weight": np.zeros((4, 6), np.float32),
            "layers.1.bias": np.zeros((4, 7), np.float32),
        },
    )
    del other
    os.replace(d / "x.safetensors", linked)
    with pytest.raises(MismatchError, match="changed since"):
        rp.remove_file(d / "out2", d / "back")
    assert not (d / "back").exists()


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_write(ckpt):
    d, _, sig = ckpt
    stale = d / ".out.rp999999999.abc.tmp"  # no such process
    stale.mkdir()
    (stale / "part").write_bytes(b"x")
    os.utime(stale, (1, 1))
    live = d / f".out.rp{os.getpid()}.abc.tmp"  # this process: a concurrent writer's
    live.mkdir()
    assert remove_stale_folders(d / "out") == [stale]
    assert live.exists()


# ---------------------------------------------------------------------------- hostile indexes


def hostile(d: Path, edit) -> Path:
    index = json.loads((d / "base" / INDEX).read_text())
    edit(index)
    (d / "base" / INDEX).write_text(json.dumps(index) if not isinstance(index, str) else index)
    return d / "base" / INDEX


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (
            lambda i: i["weight_map"].update({"embed.weight": "../fog.rws"}),
            FormatError,
            "not a file name",
        ),
        (
            lambda i: i["weight_map"].update({"embed.weight": "/etc/passwd"}),
            FormatError,
            "not a file name",
        ),
        (
            lambda i: i["weight_map"].update({"x.weight": "missing.safetensors"}),
            FileNotFoundError,
            "missing",
        ),
        (
            lambda i: i["weight_map"].update({"embed.weight": shard_name(1)}),
            FormatError,
            "embed.weight",
        ),
        (lambda i: i["weight_map"].pop("head.weight"), FormatError, "does not list"),
        (
            lambda i: i["weight_map"].update({"ghost": shard_name(0)}),
            FormatError,
            "not stored there",
        ),
        (lambda i: i.pop("weight_map"), FormatError, "weight_map"),
        (lambda i: i["weight_map"].update({"embed.weight": 3}), FormatError, "not a file"),
        # names of robustpatch's own files: a patched copy would write records over them
        (
            lambda i: i["weight_map"].update({"embed.weight": "robustpatch.rpundo.json"}),
            FormatError,
            "one robustpatch gives its own files",
        ),
        (
            lambda i: i["weight_map"].update({"embed.weight": f"{shard_name(0)}.rpundo"}),
            FormatError,
            "one robustpatch gives its own files",
        ),
    ],
)
def test_hostile_indexes_are_refused_and_nothing_is_written(ckpt, edit, error, match):
    d, _, sig = ckpt
    index = hostile(d, edit)
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(error, match=match):
        rp.apply_file(index, sig, 1.0, d / "out")
    assert sorted(p.name for p in d.iterdir()) == before


def test_a_tensor_listed_twice_is_refused(ckpt):
    d, _, sig = ckpt
    text = (d / "base" / INDEX).read_text()
    dup = text.replace('"weight_map": {', f'"weight_map": {{"head.weight": "{shard_name(0)}", ', 1)
    (d / "base" / INDEX).write_text(dup)
    with pytest.raises(FormatError, match="'head.weight' is listed twice"):
        rp.apply_file(d / "base", sig, 1.0, d / "out")


def test_a_tensor_stored_in_two_shards_is_refused(ckpt):
    d, tensors, sig = ckpt
    write_tensors(
        d / "base" / shard_name(1),
        {n: tensors[n] for n in ("layers.1.weight", "layers.1.bias", "embed.weight")},
    )
    with pytest.raises(FormatError, match=r"'embed.weight' is in .* and "):
        rp.apply_file(d / "base", sig, 1.0, d / "out")
    assert not (d / "out").exists()


def test_inplace_is_refused_for_a_sharded_checkpoint(ckpt, capsys):
    d, _, sig = ckpt
    before = listing(d / "base")
    with pytest.raises(InvalidArgumentError, match="inplace=True patches one safetensors file"):
        rp.apply_file(d / "base", sig, 1.0, inplace=True)
    assert listing(d / "base") == before
    assert main(["apply", str(d / "base"), str(d / "fog.rws"), "--inplace"]) == 1
    err = capsys.readouterr().err  # the CLI's flags, not the keywords
    assert "--inplace patches one safetensors file" in err and "(-o)" in err
    assert listing(d / "base") == before


def test_cli_reports_a_hostile_index_in_one_line_and_writes_nothing(ckpt, capsys):
    d, _, _ = ckpt
    index = hostile(d, lambda i: i["weight_map"].update({"embed.weight": "../fog.rws"}))
    before = sorted(p.name for p in d.iterdir())
    assert main(["apply", str(index), str(d / "fog.rws"), "-o", str(d / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"robustpatch: error: {index}: shard name '../fog.rws' is not a file name in its folder"
    )
    assert sorted(p.name for p in d.iterdir()) == before


MEMORY_CHILD = r"""
from pathlib import Path
from robustpatch.files import apply_file
if op == "apply":
    d = Path(args["dir"])
    apply_file(d / "ckpt", [d / "tv.rws"], 1.0, d / "out")
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_a_dense_task_vector_is_streamed_shard_by_shard(tmp_path):
    """A full-model dense signature file (64 MiB over 16 shards) is never held whole: the
    patch's peak memory stays under half of it (loaded, it would take all of it). A
    shard's part is 4 MiB: with 8 MiB parts the peak, a few parts in flight, came within
    a few MiB of the bound."""
    rng = np.random.default_rng(0)
    (tmp_path / "ckpt").mkdir()
    weight_map, deltas = {}, {}
    for k in range(16):
        shard = shard_name(k, 16)
        tensors = {
            f"l{k}.{i}.weight": rng.normal(size=(256, 1024)).astype(np.float32) for i in range(4)
        }
        write_tensors(tmp_path / "ckpt" / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
        deltas.update({n: rng.normal(0, 0.01, (256, 1024)).astype(np.float32) for n in tensors})
    (tmp_path / "ckpt" / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    rp.Signature.from_deltas(deltas, name="tv").save(tmp_path / "tv.rws")
    sig_mib = sum(a.nbytes for a in deltas.values()) / (1 << 20)
    base = child_peak_mib(MEMORY_CHILD, "baseline")
    peak = child_peak_mib(MEMORY_CHILD, "apply", dir=str(tmp_path))
    assert peak - base < sig_mib / 2, (peak, base, sig_mib)


def test_inspect_describes_a_sharded_checkpoint_by_its_index_or_folder(ckpt, capsys):
    d, tensors, sig = ckpt
    rp.apply_file(d / "base", [d / "fog.rws"], 0.5, d / "out")
    for path in (d / "out", d / "out" / INDEX):
        assert main(["inspect", str(path), "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["kind"] == "model" and rep["shards"] == 3 and rep["tensors"] == len(tensors)
        assert rep["applied"] == [{"name": "fog", "hash": sig.content_hash, "alpha": 0.5}]
        assert rep["undo"] == str(d / "out" / RECORD_NAME)
    assert main(["inspect", str(d / "base")]) == 0
    out = capsys.readouterr().out
    assert "6 tensors (6 F32) in 3 shards" in out and "no robustpatch signatures" in out


def test_inspect_describes_a_sharded_checkpoints_undo_record(ckpt, capsys):
    # it said "not a safetensors file"
    d, _, sig = ckpt
    rp.apply_file(d / "base", [d / "fog.rws"], 0.5, d / "out")
    record = d / "out" / RECORD_NAME
    assert main(["inspect", str(record), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kind"] == "undo" and rep["index"] == str(d / "out" / INDEX)
    assert rep["shards"] == 3 and 0 < rep["patched_shards"] <= 3
    assert [(s["name"], s["hash"], s["alpha"]) for s in rep["signatures"]] == [
        ("fog", sig.content_hash, 0.5)
    ]
    assert main(["inspect", str(record)]) == 0
    assert f"undo record of {d / 'out' / INDEX}" in capsys.readouterr().out
    index = json.loads((d / "out" / INDEX).read_text())
    index["metadata"]["note"] = "edited"
    (d / "out" / INDEX).write_text(json.dumps(index))
    assert main(["inspect", str(record)]) == 1
    assert "the index changed since it was patched" in capsys.readouterr().err


# ---------------------------------------------------------------------------- review findings


def _symlinked_shard(folder: Path, k: int, store: Path) -> None:
    """Move shard ``k`` into ``store`` and leave a relative link to it, as a Hugging Face
    cache snapshot does (its files are links to ``../../blobs/<hash>``)."""
    store.mkdir(parents=True, exist_ok=True)
    (folder / shard_name(k)).rename(store / shard_name(k))
    (folder / shard_name(k)).symlink_to(os.path.relpath(store / shard_name(k), folder))


def test_an_untouched_shard_that_is_a_relative_link_is_linked_as_the_file_it_names(ckpt):
    # the link itself was hard-linked: from the output's folder it named another file
    d, tensors, _ = ckpt
    _symlinked_shard(d / "base", 1, d / "store")
    write_sharded(d / "other" / "decoy", seed=7)
    _symlinked_shard(d / "other" / "decoy", 1, d / "other" / "store")  # "../store/..." there
    original = sha(d / "store" / shard_name(1))
    rp.apply_file(d / "base", d / "fog.rws", 1.0, d / "other" / "out")
    out_shard = d / "other" / "out" / shard_name(1)
    assert not out_shard.is_symlink() and sha(out_shard) == original
    rp.remove_file(d / "other" / "out", d / "other" / "restored")
    assert sha(d / "other" / "restored" / shard_name(1)) == original


def test_a_shard_that_links_into_the_output_folder_is_an_input_never_replaced(ckpt):
    # the output folder was replaced whole, deleting the input shard it read
    d, _, _ = ckpt
    rp.apply_file(d / "base", d / "fog.rws", 1.0, d / "out")
    src = d / "src"
    shutil.copytree(d / "base", src)
    (src / shard_name(1)).unlink()
    (src / shard_name(1)).symlink_to(Path("..") / "out" / shard_name(1))
    before = listing(d / "out")
    with pytest.raises(InvalidArgumentError, match="holds the input"):
        rp.apply_file(src, d / "fog.rws", 1.0, d / "out")
    assert listing(d / "out") == before


def test_an_output_written_without_undo_records_can_be_written_again(ckpt):
    # it had no folder record, so it counted as a folder robustpatch did not write
    d, tensors, sig = ckpt
    rp.apply_file(d / "base", d / "fog.rws", 1.0, d / "out", undo=False)
    rp.apply_file(d / "base", d / "fog.rws", 0.5, d / "out", undo=False)
    np.testing.assert_array_equal(
        loaded(d / "out")["embed.weight"],
        tensors["embed.weight"] + np.float32(0.5) * sig["embed.weight"].dense(),
    )


def test_inspect_of_a_folder_record_lists_every_signature_it_removes(ckpt, capsys):
    # it listed the first patched shard's signatures only (and a traceback where a
    # shard's record held more than the index)
    d, tensors, _ = ckpt
    only_shard_1 = {"layers.1.weight": np.full((4, 6), 0.25, np.float32)}
    rp.Signature.from_deltas(only_shard_1, name="mid").save(d / "mid.rws")
    rp.apply_file(d / "base", [d / "fog.rws", d / "mid.rws"], [1.0, 0.5], d / "out")
    assert main(["inspect", str(d / "out" / RECORD_NAME), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["alpha"]) for s in rep["signatures"]] == [("fog", 1.0), ("mid", 0.5)]
    assert rep["patched_shards"] == 3


def test_extract_reads_a_sharded_checkpoint_by_its_folder_and_guards_any_index_name(ckpt):
    # a folder was "a directory, not a regular file"; an index named weights.json was
    # read, but its shards were not counted as inputs: the output replaced one
    d, _, _ = ckpt
    write_sharded(d / "robust", seed=3)
    whole = rp.extract(d / "base", d / "base", d / "robust", layers="all")
    assert whole.entries and set(whole.entries) <= set(LAYOUT)
    (d / "robust" / "weights.json").write_bytes((d / "robust" / INDEX).read_bytes())
    before = listing(d / "robust")
    with pytest.raises(InvalidArgumentError, match="is the input"):
        rp.extract_to(
            d / "robust" / shard_name(0), d / "base", d / "base", d / "robust" / "weights.json"
        )
    assert listing(d / "robust") == before


@pytest.mark.parametrize("number", ["NaN", "Infinity", "1e999"])
def test_an_index_with_a_number_json_cannot_hold_is_a_format_error(ckpt, capsys, number):
    # inspect --json printed it back as NaN/Infinity: invalid JSON, exit 0
    d, _, _ = ckpt
    text = (d / "base" / INDEX).read_text()
    (d / "base" / INDEX).write_text(
        text.replace('"total_size": ', f'"odd": {number}, "total_size": ')
    )
    assert main(["inspect", str(d / "base"), "--json"]) == 1
    assert f"holds {number}, which JSON does not allow" in capsys.readouterr().err


def test_an_output_folder_gets_the_mode_a_new_folder_gets(ckpt):
    # it was 0700, as the temporary folder it was built in
    d, _, _ = ckpt
    old = os.umask(0o022)
    try:
        rp.apply_file(d / "base", d / "fog.rws", 1.0, d / "out")
        rp.remove_file(d / "out", d / "restored")
    finally:
        os.umask(old)
    assert (d / "out").stat().st_mode & 0o777 == 0o755
    assert (d / "restored").stat().st_mode & 0o777 == 0o755


def test_an_output_folder_in_a_group_shared_folder_stays_group_shared(ckpt):
    # setting the mode cleared the setgid bit mkdir passes on, so files got another group
    d, _, _ = ckpt
    shared = d / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    rp.apply_file(d / "base", d / "fog.rws", 1.0, shared / "out")
    assert (shared / "out").stat().st_mode & stat.S_ISGID


@pytest.mark.parametrize("applied", ["[{}]", '[{"name": "fog", "hash": "h", "alpha": NaN}]'])
def test_a_folder_record_with_a_malformed_applied_list_is_a_one_line_error(ckpt, capsys, applied):
    # inspect raised KeyError on {} and printed NaN back (invalid JSON)
    d, _, _ = ckpt
    rp.apply_file(d / "base", d / "fog.rws", 1.0, d / "out")
    record = d / "out" / RECORD_NAME
    doc = json.loads(record.read_text())
    record.write_text(json.dumps(doc).replace(json.dumps(doc["applied"]), applied))
    assert main(["inspect", str(record), "--json"]) == 1
    assert "bad undo record" in capsys.readouterr().err


def test_an_output_with_an_index_of_another_name_can_be_written_again(ckpt):
    # only *.safetensors.index.json was looked for: model.index.json's output was refused
    d, _, sig = ckpt
    (d / "base" / INDEX).rename(d / "base" / "model.index.json")
    rp.apply_file(d / "base" / "model.index.json", sig, 1.0, d / "out")
    rp.apply_file(d / "base" / "model.index.json", sig, 0.5, d / "out")
    assert (d / "out" / "model.index.json").exists()
