"""Ways a user could lose or corrupt data, each shown refused or made safe: two in-place
patches (or a patch and a recovery) of one model at once, a failure at each step of an
in-place commit, a pipeline job writing into a sharded base's folder, and a signature
writer whose ``add`` fails part way."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from robustpatch import pipeline
from robustpatch._io.journal import Journal, journal_path_for, recover
from robustpatch.cli import main
from robustpatch.errors import InvalidArgumentError
from robustpatch.files import apply_file, remove_file, undo_path_for
from robustpatch.signature import Signature, writer
from robustpatch.signature.entry import Entry, dense_entry, quantize_entry
from rp_testutil import listing, sha
from test_inplace import write_model, write_signature

posix_only = pytest.mark.skipif(os.name != "posix", reason="flock and mmap sharing are POSIX")


@pytest.fixture
def small(tmp_path):
    infos = write_model(tmp_path / "m.safetensors", 9)
    write_signature(tmp_path / "s.rws", infos, every=2)
    return tmp_path


@pytest.fixture
def held(small):
    """The model of ``small`` locked as another in-place patcher would hold it."""
    import fcntl

    fd = os.open(small / "m.safetensors", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield small
    os.close(fd)


def patched_copy(small: Path) -> bytes:
    """The bytes of the model patched in place (at α 0.7), from a copy."""
    copy = small / "copy" / "m.safetensors"
    copy.parent.mkdir()
    shutil.copy(small / "m.safetensors", copy)
    apply_file(copy, small / "s.rws", 0.7, inplace=True)
    patched = copy.read_bytes()
    shutil.rmtree(copy.parent)
    return patched


# ---------------------------------------------------------------- 1: one patcher at a time


@posix_only
def test_a_held_model_is_refused_at_once_naming_it_and_left_as_it_was(held, capsys):
    model, sig = held / "m.safetensors", held / "s.rws"
    journal_path_for(model).write_bytes(b"RPJRNL1\n-")  # an unfinished patch's journal
    before = listing(held)
    busy = f"{model}: busy: another in-place patch or recover of it is running"
    for call in (
        lambda: apply_file(model, sig, 1.0, inplace=True),
        lambda: remove_file(model, inplace=True),
        lambda: recover(model),
    ):
        with pytest.raises(BlockingIOError) as e:
            call()
        assert f"{e.value.filename}: {e.value.strerror}".startswith(busy)
    assert main(["recover", str(model)]) == 1
    assert capsys.readouterr().err.startswith(f"robustpatch: error: {busy}")
    assert listing(held) == before


@posix_only
def test_the_lock_covers_the_whole_patch_so_a_second_patcher_cannot_roll_it_back(small):
    model, sig = small / "m.safetensors", small / "s.rws"
    original = sha(model)
    expected = patched_copy(small)
    refused: list[str] = []
    ticks: list[int] = []

    def meddle(n: int) -> None:  # runs mid-patch: the journal pending, tensors half patched
        ticks.append(n)
        for call in (lambda: recover(model), lambda: apply_file(model, sig, 0.5, inplace=True)):
            try:
                call()
            except BlockingIOError as e:
                refused.append(e.strerror)

    apply_file(model, sig, 0.7, inplace=True, progress=meddle)
    assert ticks and len(refused) == 2 * len(ticks)  # both refused at every tensor
    assert all(r.startswith("busy") for r in refused)
    assert model.read_bytes() == expected and not journal_path_for(model).exists()
    remove_file(model, inplace=True)  # the lock went with the patch
    assert sha(model) == original


# ---------------------------------------------------------------- 2: a failing commit


def inject(monkeypatch, step: str, when: str) -> None:
    """The first call of the journal's commit ``step`` fails, ``before`` or ``after`` it
    did its work (later calls, a recovery's, run as usual)."""
    real = getattr(Journal, step)
    failed: list[bool] = []

    def failing(self: Journal) -> None:
        if failed:
            return real(self)
        failed.append(True)
        if when == "after":
            real(self)
        raise OSError(errno.EIO, "injected failure", f"{step} {when}")

    monkeypatch.setattr(Journal, step, failing)


APPLY_STEPS = [
    ("_mark_done", "before"),
    ("_mark_done", "after"),  # the marker written, its fsync failed
    ("_rename_record", "before"),
    ("_rename_record", "after"),
    ("_delete", "before"),
]
REMOVE_STEPS = [
    ("_mark_done", "before"),
    ("_mark_done", "after"),
    ("_unlink_consumed", "before"),
    ("_unlink_consumed", "after"),
    ("_delete", "before"),
]


@posix_only
@pytest.mark.parametrize("step,when", APPLY_STEPS)
def test_a_failure_at_each_step_of_an_apply_commit_keeps_model_and_record_a_pair(
    small, monkeypatch, step, when
):
    model, sig = small / "m.safetensors", small / "s.rws"
    record = undo_path_for(model)
    original, before = sha(model), listing(small)
    patched = patched_copy(small)
    inject(monkeypatch, step, when)
    committed = (step, when) != ("_mark_done", "before")
    with pytest.raises(OSError, match="injected failure"):
        apply_file(model, sig, 0.7, inplace=True)
    # committed: the model stays patched, the journal stays for recovery to finish
    assert journal_path_for(model).exists() == committed
    assert (model.read_bytes() == patched) == committed
    recover(model)  # what the next in-place call or 'robustpatch recover' does
    if not committed:  # the original, no record
        assert listing(small) == before
        return
    assert model.read_bytes() == patched and record.exists()
    assert not journal_path_for(model).exists()
    remove_file(model, inplace=True)  # the record in place is the patched model's
    assert sha(model) == original and listing(small) == before


@posix_only
@pytest.mark.parametrize("step,when", REMOVE_STEPS)
def test_a_failure_at_each_step_of_a_removal_commit_keeps_model_and_record_a_pair(
    small, monkeypatch, step, when
):
    model, sig = small / "m.safetensors", small / "s.rws"
    original = listing(small)
    apply_file(model, sig, 0.7, inplace=True)
    patched = listing(small)
    inject(monkeypatch, step, when)
    committed = (step, when) != ("_mark_done", "before")
    with pytest.raises(OSError, match="injected failure"):
        remove_file(model, inplace=True)
    assert journal_path_for(model).exists() == committed
    assert (sha(model) == original[model.name]) == committed
    recover(model)
    assert listing(small) == (original if committed else patched)


@posix_only
def test_a_done_marker_that_landed_before_its_write_failed_is_never_rolled_back(small, monkeypatch):
    """The marker's byte reaches the file but its write reports an error, and the disk
    then fails again part way through any rollback: no half-restored model may end up
    beside the record the done journal puts in place."""
    import robustpatch._io.journal as journal_module

    real, writes_after_marker = journal_module.pwrite_all, []

    def failing_disk(fd: int, data: bytes, offset: int) -> None:
        if writes_after_marker:  # the first write after the marker lands, then none
            writes_after_marker.append(offset)
            if len(writes_after_marker) > 2:
                raise OSError(errno.EIO, "injected failure")
        real(fd, data, offset)
        if bytes(data) == b"D":
            writes_after_marker.append(offset)
            raise OSError(errno.EIO, "injected failure")

    model, sig = small / "m.safetensors", small / "s.rws"
    original, before = sha(model), listing(small)
    patched = patched_copy(small)
    monkeypatch.setattr(journal_module, "pwrite_all", failing_disk)
    with pytest.raises(OSError, match="injected failure"):
        apply_file(model, sig, 0.7, inplace=True)
    monkeypatch.undo()
    assert recover(model) == "completed"
    assert model.read_bytes() == patched and undo_path_for(model).exists()
    remove_file(model, inplace=True)
    assert sha(model) == original and listing(small) == before


# ---------------------------------------------------------------- 4: pipeline outputs


def sharded_fleet(tmp_path: Path) -> None:
    from test_sharded import signature, write_sharded

    write_sharded(tmp_path / "base")
    write_sharded(tmp_path / "other")
    signature().save(tmp_path / "fog.rws")


def fog_job(root: Path, base: str, output: str) -> pipeline.Job:
    return pipeline.Job.make(root / base, [root / "fog.rws"], 1.0, root / output)


@pytest.mark.parametrize(
    "base,output,whose,folder",
    [
        ("base", "base/patched.safetensors", "its own", "base"),
        ("base/model.safetensors.index.json", "base/sub/p", "its own", "base"),
        ("other/model.safetensors.index.json", "other", "its own", "other"),  # the folder
        ("other", "base/p", "job #1's", "base"),
    ],
)
def test_an_output_in_a_sharded_base_folder_is_refused_before_any_job_runs(
    tmp_path, capsys, base, output, whose, folder
):
    sharded_fleet(tmp_path)
    doc = {
        "jobs": [
            {"base": "base", "signatures": ["fog.rws"], "output": "out/a"},
            {"base": base, "signatures": ["fog.rws"], "output": output},
        ]
    }
    (tmp_path / "fleet.json").write_text(json.dumps(doc))
    before = listing(tmp_path)
    with pytest.raises(InvalidArgumentError) as e:
        pipeline.load_manifest(tmp_path / "fleet.json")
    assert str(e.value) == (
        f"{tmp_path / 'fleet.json'}: job #2 writes {tmp_path / output}, in {whose} "
        f"sharded base's folder {os.path.realpath(tmp_path / folder)}"
    )
    assert main(["batch", str(tmp_path / "fleet.json")]) == 1
    assert capsys.readouterr().err == f"robustpatch: error: {e.value}\n"
    with pytest.raises(InvalidArgumentError, match="sharded base's folder"):
        pipeline.run([fog_job(tmp_path, j["base"], j["output"]) for j in doc["jobs"]], workers=1)
    assert listing(tmp_path) == before and not (tmp_path / "out").exists()


def test_an_output_beside_a_sharded_base_folder_is_accepted(tmp_path):
    sharded_fleet(tmp_path)
    jobs = [fog_job(tmp_path, "base", "base-p"), fog_job(tmp_path, "other", "x/p")]
    lines = pipeline.run(jobs, workers=1)
    assert [line["status"] for line in lines] == ["done", "done"]


# ---------------------------------------------------------------- 5: SignatureWriter.add


def good_entries() -> list[Entry]:
    rng = np.random.default_rng(3)
    a = dense_entry("a.weight", rng.normal(0, 1e-2, (8, 16)).astype(np.float32))
    b = dense_entry("b.weight", rng.normal(0, 1e-2, (4, 32)).astype(np.float32))
    q = dense_entry("q.weight", rng.normal(0, 1e-2, (16, 16)).astype(np.float32))
    return [a, b, quantize_entry(q, 4, "affine", "group", 64)]


def saved(entries: list[Entry], path: Path) -> bytes:
    """The file ``Signature.save`` writes for these entries (what the writer must match)."""
    Signature(entries, name="w", meta={"k": 1}).save(path)
    return path.read_bytes()


def test_an_add_refused_part_way_leaves_no_trace_and_can_be_retried(tmp_path):
    a, b, q = good_entries()
    bad = Entry("b.weight", "bn", b.shape, "F32", values=np.zeros(b.shape, np.complex64))
    with writer.SignatureWriter(tmp_path / "w.rws") as w:
        w.add(a)
        with pytest.raises(InvalidArgumentError, match="unsupported dtype complex64"):
            w.add(bad)
        assert len(w) == 1
        w.add(b)  # the name the failed add wanted is free
        w.add(q)
        w.commit("w", {"k": 1})
    assert (tmp_path / "w.rws").read_bytes() == saved([a, b, q], tmp_path / "ref.rws")


def test_an_add_whose_write_fails_part_way_lists_none_of_its_tensors(tmp_path, monkeypatch):
    a, b, q = good_entries()  # q: three file tensors (codes, scale, offset)
    real, calls = writer.pwrite_all, []

    def disk_full_on_the_second_tensor(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:  # a, then q's codes, then q's scale
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer, "pwrite_all", disk_full_on_the_second_tensor)
    with writer.SignatureWriter(tmp_path / "w.rws") as w:
        w.add(a)
        with pytest.raises(OSError, match="No space left"):
            w.add(q)
        assert len(w) == 1 and w.nbytes == a.values.nbytes
        # q's codes truncated away (the data sits behind the header's reserved room)
        assert os.path.getsize(w._data.tmp) == w._start + w.nbytes
        w.add(b)
        w.commit("w", {"k": 1})
    assert (tmp_path / "w.rws").read_bytes() == saved([a, b], tmp_path / "ref.rws")


# ---------------------------------------------------------------------------- failing disks


def _fail_rename_of(monkeypatch, victim: Path) -> None:
    """The rename that puts ``victim`` in place fails (EIO), as on a full or failing disk
    or an immutable file."""
    from robustpatch._io import atomic

    real = atomic.AtomicFile._rename

    def rename(self):
        if self.path == victim:
            self.file.close()
            raise OSError(errno.EIO, "Input/output error", str(victim))
        real(self)

    monkeypatch.setattr(atomic.AtomicFile, "_rename", rename)


def test_a_failed_rename_puts_the_previous_set_back(tmp_path, monkeypatch):
    # the record landed, the model's rename failed, and the previous record was deleted
    from robustpatch._io.atomic import AtomicFile, commit_all

    names = [tmp_path / n for n in ("a.rpundo", "b.data", "c.onnx")]
    for p in names[:2]:
        p.write_bytes(b"old " + p.name.encode())
    before = listing(tmp_path)
    files = [AtomicFile(p, durable=False) for p in names]
    for af in files:
        af.file.write(b"new")
    _fail_rename_of(monkeypatch, names[2])
    with pytest.raises(OSError, match="Input/output error"):
        commit_all(files)
    for af in files:
        af.discard()
    assert listing(tmp_path) == before  # a.rpundo and b.data back, c.onnx still absent


def test_a_previous_file_that_cannot_be_put_back_is_named_in_the_error(
    tmp_path, monkeypatch, capsys
):
    # it stayed under a temporary name that nothing reported (a later cleanup deletes it)
    from robustpatch._io import atomic
    from robustpatch._io.atomic import AtomicFile, commit_all
    from robustpatch.cli import _message

    names = [tmp_path / n for n in ("a.rpundo", "c.onnx")]
    names[0].write_bytes(b"old")
    files = [AtomicFile(p, durable=False) for p in names]
    for af in files:
        af.file.write(b"new")
    _fail_rename_of(monkeypatch, names[1])
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(f".{names[0].name}.rp") and Path(src) != files[0].tmp:
            raise OSError(errno.EIO, "Input/output error", str(src))  # the put-back
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError) as e:
        commit_all(files)
    monkeypatch.undo()
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(".a.rpundo.rp")]
    assert kept.read_bytes() == b"old" and names[0].read_bytes() == b"new"
    line = _message(e.value)
    assert f"the previous {names[0]} could not be put back: it is {kept}" in line
    assert "\n" not in line


def test_a_failed_reapply_keeps_the_previous_output_and_its_record(small, monkeypatch):
    out = small / "out.safetensors"
    apply_file(small / "m.safetensors", small / "s.rws", 0.5, out)
    before = listing(small)
    _fail_rename_of(monkeypatch, out)
    with pytest.raises(OSError, match="Input/output error"):
        apply_file(small / "m.safetensors", small / "s.rws", 1.0, out)
    assert listing(small) == before
    monkeypatch.undo()
    remove_file(out, small / "back.safetensors")
    assert sha(small / "back.safetensors") == sha(small / "m.safetensors")


def test_a_removal_keeps_the_record_it_read_beside_its_output(small):
    # restoring to the name the record was made for deleted the record (an input)
    m, p = small / "m.safetensors", small / "p.safetensors"
    apply_file(m, small / "s.rws", 0.5, p)
    os.rename(p, small / "p2.safetensors")
    record = undo_path_for(p)
    kept = sha(record)
    remove_file(small / "p2.safetensors", p, undo=record)
    assert sha(p) == sha(m) and sha(record) == kept


def test_a_discarded_file_whose_close_fails_is_still_deleted(tmp_path):
    # a full disk failed the close's flush again, and the temporary file stayed
    from robustpatch._io.atomic import AtomicFile

    af = AtomicFile(tmp_path / "x.rws", durable=False)
    real = af.file

    class FullDisk:
        closed = False

        def close(self):
            real.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    af.file = FullDisk()
    af.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_sparse_model_on_a_full_disk_is_refused_before_any_change(small, monkeypatch):
    # a zero tensor stored as a hole: writing the mapped hole killed the process (SIGBUS)
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    before = listing(small)
    with pytest.raises(OSError, match=r"No space left on device: .*m\.safetensors"):
        apply_file(small / "m.safetensors", small / "s.rws", 1.0, inplace=True)
    assert listing(small) == before  # no journal, nothing patched


def test_a_sharded_commit_that_fails_puts_the_previous_folder_back(tmp_path, monkeypatch):
    # without renameat2: the previous folder was set aside, the new one's rename failed,
    # and the output was missing (its content later deleted as a dead writer's leftover)
    from robustpatch import sharded
    from test_sharded import signature, write_sharded

    write_sharded(tmp_path / "base")
    signature().save(tmp_path / "fog.rws")
    out = tmp_path / "out"
    apply_file(tmp_path / "base", tmp_path / "fog.rws", 0.5, out)
    before = listing(tmp_path)
    monkeypatch.setattr(sharded, "_exchange", lambda a, b: False)
    real, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if Path(b) == out and len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match=r"Input/output error.*out"):
        apply_file(tmp_path / "base", tmp_path / "fog.rws", 1.0, out)
    assert listing(tmp_path) == before


def test_an_in_place_error_that_leaves_the_journal_names_the_model_and_recover(
    small, monkeypatch, capsys
):
    # "[Errno 5] Input/output error": no file named, nothing said of the journal left
    from robustpatch import inplace
    from robustpatch._io import journal

    model = small / "m.safetensors"
    original = sha(model)

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(inplace, "_patch", failing)
    monkeypatch.setattr(journal.Journal, "roll_back", failing)
    assert main(["apply", str(model), str(small / "s.rws"), "--inplace"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"robustpatch: error: {model}: Input/output error; the journal keeps the original "
        f"bytes: run 'robustpatch recover {model}'"
    )
    monkeypatch.undo()
    recover(model)
    assert sha(model) == original and not journal_path_for(model).exists()


def test_a_failing_disk_in_a_sharded_write_names_the_output_not_its_temp_folder(
    tmp_path, monkeypatch
):
    # ".out.rp123.x.tmp/model-00001-of-00003.safetensors: No space left on device"
    from robustpatch import sharded
    from test_sharded import signature, write_sharded

    write_sharded(tmp_path / "base")
    signature().save(tmp_path / "fog.rws")

    def full(src, dst, durable):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(sharded, "_link_or_copy", full)
    with pytest.raises(OSError) as e:
        apply_file(tmp_path / "base", tmp_path / "fog.rws", 1.0, tmp_path / "out")
    assert os.path.dirname(e.value.filename) == str(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "fog.rws"]


def test_a_full_disk_while_a_signature_streams_names_the_signature(tmp_path, monkeypatch):
    # extract's writer said "[Errno 28] No space left on device", naming no file
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "pwrite_all", full)
    with writer.SignatureWriter(tmp_path / "w.rws") as w:
        with pytest.raises(OSError) as e:
            w.add(good_entries()[0])
    assert e.value.filename == str(tmp_path / "w.rws") and list(tmp_path.iterdir()) == []


def test_a_failed_claim_leaves_no_folders_it_made(tmp_path, monkeypatch):
    # the job failed writing its "building" marker and left new/ and new/sub/ behind
    from robustpatch._io import atomic

    m = tmp_path / "m.safetensors"
    infos = write_model(m, 3)
    write_signature(tmp_path / "s.rws", infos, every=2)
    before = listing(tmp_path)

    def failing(self):
        raise OSError(errno.EIO, "Input/output error", str(self.path))

    monkeypatch.setattr(atomic.AtomicFile, "commit", failing)
    (line,) = pipeline.run(
        [
            {
                "base": str(m),
                "signatures": [str(tmp_path / "s.rws")],
                "output": str(tmp_path / "new" / "sub" / "p.safetensors"),
            }
        ],
        workers=1,
    )
    assert line["status"] == "failed" and listing(tmp_path) == before
    assert not (tmp_path / "new").exists()


def test_a_durable_write_whose_folder_sync_fails_says_so(small, monkeypatch):
    # the EIO of the folder's fsync was swallowed: a durable call reported success
    real = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error") as e:
        apply_file(
            small / "m.safetensors", small / "s.rws", 1.0, small / "p.safetensors", durable=True
        )
    assert e.value.filename == str(small)


def test_a_previous_file_that_cannot_be_kept_is_never_deleted(small, monkeypatch):
    # no hard link possible (EPERM on a colleague's file): "put back" deleted the new
    # record, leaving the output with no record at all
    out = small / "out.safetensors"
    apply_file(small / "m.safetensors", small / "s.rws", 0.5, out)
    model_before = sha(out)

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    _fail_rename_of(monkeypatch, out)
    with pytest.raises(OSError, match="Input/output error"):
        apply_file(small / "m.safetensors", small / "s.rws", 1.0, out)
    assert sha(out) == model_before and undo_path_for(out).exists()
    assert not [p for p in small.iterdir() if p.name.endswith(".tmp")]


def test_a_killed_writers_second_name_does_not_block_an_in_place_call(small):
    # the kept hard link of a killed re-apply made the model "have 2 hard links"
    model = small / "m.safetensors"
    kept = small / ".m.safetensors.rp999999999.abcd1234.tmp"
    os.link(model, kept)
    os.utime(kept, (1, 1))  # older than this process, as a killed writer's is
    apply_file(model, small / "s.rws", 1.0, inplace=True)
    assert not kept.exists() and os.stat(model).st_nlink == 1
