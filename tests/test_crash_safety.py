"""Crash safety of file patching: a writer killed at any moment, two writers racing for
one output, and the direct-I/O writer's fallbacks.

The kill test patches a 128 MiB model through the real CLI and SIGKILLs it at random
moments (seeded): the source must never change, the destination must be absent, the
previous file, or the complete result (bit-identical to an uninterrupted run) with an
undo record that restores the source, and a killed writer's temporary files must be
removed by the next run.

Every record embeds the signature (``embed_signature``): one that refers to it holds its
path relative to the record, so the bytes compared here would depend on the folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from robustpatch._format.safetensors import TensorInfo, encode_header, read_header, read_tensors
from robustpatch._io import direct as direct_io
from robustpatch._io.direct import DirectWriter
from robustpatch.errors import MismatchError
from robustpatch.files import apply_file, remove_file, undo_path_for
from robustpatch.signature import Signature
from rp_testutil import sha

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock are POSIX")

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
N_TENSORS, ROWS, COLS = 32, 1024, 1024  # 32 tensors of 1 Mi elements: 120 MiB in all


def build_model(path: Path, seed: int = 0) -> list[TensorInfo]:
    """A model of float32 tensors with one float16 and one bfloat16 tensor."""
    rng = np.random.default_rng(seed)
    infos, offset = [], 0
    for i in range(N_TENSORS):
        label = "F16" if i == 5 else "BF16" if i == 9 else "F32"
        nbytes = ROWS * COLS * (2 if label != "F32" else 4)
        infos.append(TensorInfo(f"layers.{i}.weight", label, (ROWS, COLS), offset, offset + nbytes))
        offset += nbytes
    with open(path, "wb") as f:
        f.write(encode_header(infos, {"format": "pt"}))
        for t in infos:
            x = rng.standard_normal(ROWS * COLS, dtype=np.float32) * np.float32(0.02)
            if t.dtype == "F16":
                x = x.astype(np.float16)
            elif t.dtype == "BF16":
                x = (x.view(np.uint32) >> 16).astype(np.uint16)
            f.write(x.tobytes())
    return infos


def build_signature(path: Path, infos: list[TensorInfo], every: int, seed: int = 1) -> None:
    """A 4-bit group-128 signature touching every ``every``-th tensor."""
    rng = np.random.default_rng(seed)
    chosen = infos[::every]
    deltas = {t.name: rng.normal(0, 1e-3, t.shape).astype(np.float32) for t in chosen}
    sig = Signature.from_deltas(deltas, dtypes={t.name: t.dtype for t in chosen}, name="crash")
    sig.quantize(4, "affine", "group", 128).save(path)


@dataclass
class Big:
    model: Path
    sig: Path
    model_sha: str
    new: tuple[str, str]  # sha256 of the output and its undo record, alpha 1
    old: tuple[Path, Path]  # an earlier output (alpha 0.5) and its undo record
    old_sha: tuple[str, str]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Big:
    d = tmp_path_factory.mktemp("big")
    infos = build_model(d / "model.safetensors")
    build_signature(d / "sig.rws", infos, every=4)
    ref = d / "ref" / "p.safetensors"
    ref.parent.mkdir()
    apply_file(d / "model.safetensors", [d / "sig.rws"], 1.0, ref, embed_signature=True)
    old = d / "old" / "p.safetensors"
    old.parent.mkdir()
    apply_file(d / "model.safetensors", [d / "sig.rws"], 0.5, old, embed_signature=True)
    return Big(
        d / "model.safetensors",
        d / "sig.rws",
        sha(d / "model.safetensors"),
        (sha(ref), sha(undo_path_for(ref))),
        (old, undo_path_for(old)),
        (sha(old), sha(undo_path_for(old))),
    )


def cli_apply(big: Big, out: Path, durable: bool = False) -> subprocess.Popen:
    argv = [sys.executable, "-m", "robustpatch.cli", "-q", "apply", big.model, big.sig]
    argv += ["--overwrite"]  # the runs replace an earlier output pair on purpose
    argv += ["--embed-signature"]
    argv += ["--durable"] if durable else []
    return subprocess.Popen(
        [str(a) for a in [*argv, "-o", out]],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


TEMP = re.compile(r"\.p\.safetensors(\.rpundo)?\.rp(\d+)\.[A-Za-z0-9_]+\.tmp")


def restores_source(big: Big, out: Path, scratch: Path) -> bool:
    remove_file(out, scratch / "restored.safetensors")
    ok = sha(scratch / "restored.safetensors") == big.model_sha
    (scratch / "restored.safetensors").unlink()
    return ok


def timed_run(big: Big, out: Path, undo: Path, out_dir: Path) -> tuple[float, float]:
    """(seconds until the first temporary file appears, seconds to finish) of one apply."""
    t0 = time.perf_counter()
    proc = cli_apply(big, out, durable=True)
    first_temp = None
    while proc.poll() is None:
        if first_temp is None and temps(out_dir):
            first_temp = time.perf_counter() - t0
        time.sleep(0.002)
    duration = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr.read()
    assert (sha(out), sha(undo)) == big.new and temps(out_dir) == []
    assert first_temp is not None and first_temp < duration
    return first_temp, duration


def test_sigkill_at_random_moments_never_corrupts_source_or_destination(big, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, undo = out_dir / "p.safetensors", undo_path_for(out_dir / "p.safetensors")

    # Durable writes (fsync before the renames): the file-writing window is then long
    # enough for random kills to land in it; the rename protocol is the same either way.
    # Uninterrupted runs: how long one takes, and when its first temporary file appears.
    # The fastest of three (the first pays for cold caches): kills must land in the short
    # file-writing window of a warm run.
    first_temp, duration = min(
        (timed_run(big, out, undo, out_dir) for _ in range(3)), key=lambda r: r[1]
    )

    rng = np.random.default_rng(20240508)
    outcomes: dict[str, int] = {"untouched": 0, "killed mid-write": 0, "completed": 0}
    cleanups = restored = restored_old = 0
    killed: set[int] = set()
    # At least 20 trials; more (up to 60) while too few kills landed mid-write, since on a
    # loaded machine the run's timing drifts from the warm run measured above: each kill
    # that landed before the file work stretches the next delays, each after it shrinks
    # them, so the kills follow the runs' actual pace.
    pace = 1.0
    for trial in range(60):
        if trial >= 20 and outcomes["killed mid-write"] >= 5 and cleanups >= 3:
            break
        for p in (out, undo):
            p.unlink(missing_ok=True)
        had_old = trial % 2 == 1  # odd trials replace an earlier output
        if had_old:
            os.link(big.old[0], out)
            os.link(big.old[1], undo)
        # Mostly while the file work runs; every fourth trial anywhere in the run.
        start = 0.0 if trial % 4 == 0 else first_temp
        delay = pace * rng.uniform(start, duration * 1.05)
        proc = cli_apply(big, out, durable=True)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        killed.add(proc.pid)
        where = f"trial {trial} (killed after {delay:.3f} s of {duration:.3f} s)"

        assert sha(big.model) == big.model_sha, where
        left = temps(out_dir)
        for name in left:  # only killed writers' own temporary files
            m = TEMP.fullmatch(name)
            assert m is not None and int(m.group(2)) in killed, (where, name)
        left = [n for n in left if int(TEMP.fullmatch(n).group(2)) == proc.pid]
        if out.exists():
            got = (sha(out), sha(undo) if undo.exists() else None)
            if got[0] == big.new[0]:
                assert got[1] == big.new[1], f"{where}: new model with a stale undo record"
                outcomes["completed" if not left else "killed mid-write"] += 1
                if restored < 3:  # the undo record restores the source bit for bit
                    assert restores_source(big, out, tmp_path), where
                    restored += 1
            else:
                assert had_old and got[0] == big.old_sha[0], f"{where}: corrupt destination"
                if got[1] != big.old_sha[1]:
                    # Killed between the two renames of commit_all (two system calls):
                    # the new record beside the previous model. remove refuses it.
                    assert got[1] == big.new[1], where
                    with pytest.raises(MismatchError):
                        remove_file(out, tmp_path / "r.safetensors")
                elif restored_old < 2:  # the previous pair still restores the source
                    assert restores_source(big, out, tmp_path), where
                    restored_old += 1
                outcomes["killed mid-write" if left else "untouched"] += 1
        else:
            assert not had_old, f"{where}: the previous output vanished"
            outcomes["killed mid-write" if left else "untouched"] += 1

        if trial % 4:  # a kill meant for the file work: early, late or in it
            early = not left and not (out.exists() and sha(out) == big.new[0])
            late = not left and not early
            pace = min(pace * 1.25, 8.0) if early else max(pace * 0.8, 0.5) if late else pace
        if left and cleanups < 4:  # the next run removes the dead writer's leftovers
            proc = cli_apply(big, out, durable=True)
            assert proc.wait(timeout=120) == 0, proc.stderr.read()
            assert temps(out_dir) == [], where
            assert (sha(out), sha(undo)) == big.new, where
            cleanups += 1

    assert outcomes["killed mid-write"] >= 5, outcomes  # the kills did land mid-write
    assert cleanups >= 3, (outcomes, cleanups)
    # A last uninterrupted run: complete, valid, restorable, nothing left behind.
    assert cli_apply(big, out).wait(timeout=120) == 0
    assert (sha(out), sha(undo)) == big.new and temps(out_dir) == []
    assert restores_source(big, out, tmp_path)
    print(f"\nkill test: run {duration:.2f} s (first temp at {first_temp:.2f} s); {outcomes}")


CHILD = r"""
import json, sys, time
from robustpatch.files import apply_file
src, sig, out, alpha, start = sys.argv[1:6]
time.sleep(max(0.0, float(start) - time.time()))
t0 = time.time()
apply_file(src, [sig], float(alpha), out, embed_signature=True)
print(json.dumps([t0, time.time()]))
"""


def test_two_writers_racing_for_one_output_leave_one_consistent_pair(big, tmp_path):
    refs = {1.0: big.new, 0.5: big.old_sha}
    overlapped = 0
    for trial in range(4):
        out_dir = tmp_path / f"race{trial}"
        out_dir.mkdir()
        out = out_dir / "p.safetensors"
        start = time.time() + 1.0  # both have imported robustpatch by then
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, big.model, big.sig, out, str(alpha), str(start)],
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for alpha in ((1.0, 0.5) if trial % 2 else (0.5, 1.0))
        ]
        spans = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=120)
            assert p.returncode == 0, stderr
            spans.append(json.loads(stdout))
        (a0, a1), (b0, b1) = spans
        overlapped += a0 < b1 and b0 < a1
        got = (sha(out), sha(undo_path_for(out)))
        assert got in refs.values(), f"trial {trial}: mixed or corrupt output"
        names = sorted(p.name for p in out_dir.iterdir())
        assert names == ["p.safetensors", "p.safetensors.rpundo"]  # no temporary files
        assert restores_source(big, out, tmp_path)
    assert overlapped >= 2, "the writers did not run at the same time"


RENAMES = r"""
import os, signal, sys, time
from pathlib import Path
import robustpatch.files as files
mode, src, sig, out, marker = sys.argv[1:6]
real_replace, real_commit = os.replace, files.commit_all
renames = []


def replace(a, b):
    real_replace(a, b)
    renames.append(b)
    if len(renames) == 1 and mode == "die-between-renames":
        os.kill(os.getpid(), signal.SIGKILL)
    if len(renames) == 1 and mode == "pause-between-renames":
        Path(marker + ".a").touch()  # A has renamed its record, not yet its model
        deadline = time.time() + 20
        while not os.path.exists(marker + ".b") and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # room for B to rename both, were the renames not locked


def commit_all(afs):
    Path(marker + ".b").touch()  # B is about to commit
    real_commit(afs)


os.replace = replace
if mode == "commit-while-paused":
    while not os.path.exists(marker + ".a"):
        time.sleep(0.01)
    files.commit_all = commit_all
alpha = 0.5 if mode == "commit-while-paused" else 1.0
files.apply_file(src, [sig], alpha, out, embed_signature=True)
"""


def run_renames(mode: str, big: Big, out: Path, marker: Path) -> subprocess.Popen:
    argv = [sys.executable, "-c", RENAMES, mode, big.model, big.sig, out, marker]
    return subprocess.Popen([str(a) for a in argv], env=ENV, stderr=subprocess.PIPE, text=True)


def output_folder(big: Big, tmp_path: Path, had_old: bool) -> tuple[Path, Path, Path]:
    """(folder, output, its undo record) in a fresh folder, holding a previous pair
    (the same signature at α 0.5) when ``had_old``."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, undo = out_dir / "p.safetensors", undo_path_for(out_dir / "p.safetensors")
    if had_old:
        os.link(big.old[0], out)
        os.link(big.old[1], undo)
    return out_dir, out, undo


@pytest.mark.parametrize("had_old", [False, True])
def test_a_writer_killed_between_its_two_renames(big, tmp_path, had_old):
    """The one moment a kill can split the pair: the record is renamed first, so the
    destination is never a new model without its record; at worst the new record sits
    beside the previous model, and remove_file refuses that pair."""
    out_dir, out, undo = output_folder(big, tmp_path, had_old)
    proc = run_renames("die-between-renames", big, out, tmp_path / "m")
    assert proc.wait(timeout=120) == -9, proc.stderr.read()
    assert sha(big.model) == big.model_sha
    assert sha(undo) == big.new[1]  # the record landed
    if had_old:
        assert sha(out) == big.old_sha[0]  # the previous model, intact
        with pytest.raises(MismatchError, match="header differs"):
            remove_file(out, tmp_path / "r.safetensors")
        assert not (tmp_path / "r.safetensors").exists()
    else:
        assert not out.exists()  # no model without its record
    left = sorted(str(TEMP.fullmatch(n).group(1)) for n in temps(out_dir))
    # the model's temp, and the second names the set kept of a previous pair to put back
    assert left == ([".rpundo", "None", "None"] if had_old else ["None"])
    assert cli_apply(big, out).wait(timeout=120) == 0  # the next run cleans up
    assert (sha(out), sha(undo)) == big.new and temps(out_dir) == []


def test_a_writer_cannot_commit_between_anothers_two_renames(big, tmp_path):
    """Writer A pauses between renaming its record and its model; writer B commits the
    same output meanwhile. The folder lock makes B wait, so the pair that ends up at the
    destination is B's, whole (unlocked, B's model would be replaced by A's beside B's
    record)."""
    out = tmp_path / "p.safetensors"
    marker = tmp_path / "marker"
    a = run_renames("pause-between-renames", big, out, marker)
    b = run_renames("commit-while-paused", big, out, marker)
    assert a.wait(timeout=120) == 0, a.stderr.read()
    assert b.wait(timeout=120) == 0, b.stderr.read()
    assert (sha(out), sha(undo_path_for(out))) == big.old_sha  # B's (alpha 0.5) pair
    assert restores_source(big, out, tmp_path)


KILL_MID_STREAM = r"""
import os, signal, sys
import robustpatch.files as files
src, sig, out, after = sys.argv[1:5]
written = 0


def tick(n):
    global written
    written += n
    if written >= int(after):
        os.kill(os.getpid(), signal.SIGKILL)


files.apply_file(src, [sig], 1.0, out, progress=tick, embed_signature=True)
"""


@pytest.mark.parametrize("had_old", [False, True])
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_a_default_writer_killed_mid_stream(big, tmp_path, share, had_old):
    """The default (not durable) writer killed at a chosen point of its stream: first
    bytes, half, everything written but not yet renamed. Deterministic, unlike the
    random kills, which need a durable writer's longer window to land mid-write."""
    out_dir, out, undo = output_folder(big, tmp_path, had_old)
    header = read_header(big.model)
    after = max(1, int(share * (header.file_size - header.data_start)))  # tensor bytes
    argv = [sys.executable, "-c", KILL_MID_STREAM, big.model, big.sig, out, after]
    proc = subprocess.run([str(a) for a in argv], env=ENV, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == -9, proc.stderr
    assert sha(big.model) == big.model_sha
    if had_old:
        assert (sha(out), sha(undo)) == big.old_sha  # the previous pair, whole
    else:
        assert not out.exists() and not undo.exists()
    left = temps(out_dir)
    assert len(left) == 2 and all(TEMP.fullmatch(n) for n in left), left
    assert cli_apply(big, out).wait(timeout=120) == 0  # the next run cleans up
    assert (sha(out), sha(undo)) == big.new and temps(out_dir) == []


# ---------------------------------------------------------------------------- direct I/O


def test_direct_and_buffered_writes_give_the_same_bytes(big, tmp_path, monkeypatch):
    """The durable large-file path (direct I/O) and the buffered one write identical
    files; so does remove_file."""
    direct = tmp_path / "direct" / "p.safetensors"
    buffered = tmp_path / "buffered" / "p.safetensors"
    direct.parent.mkdir()
    buffered.parent.mkdir()
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 0)
    seen: list[int] = []
    apply_file(
        big.model, [big.sig], 1.0, direct, durable=True, progress=seen.append, embed_signature=True
    )
    h = read_header(big.model)
    assert sum(seen) == h.file_size - h.data_start  # progress counts every data byte
    remove_file(direct, tmp_path / "direct" / "r.safetensors", durable=True)
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 1 << 62)
    apply_file(big.model, [big.sig], 1.0, buffered, durable=True, embed_signature=True)
    assert (sha(direct), sha(undo_path_for(direct))) == big.new
    assert (sha(buffered), sha(undo_path_for(buffered))) == big.new
    assert sha(tmp_path / "direct" / "r.safetensors") == big.model_sha
    from safetensors import safe_open  # the sidecar is plain safetensors

    with safe_open(undo_path_for(direct), "np") as f:
        assert any(k.endswith("/positions") for k in f.keys())


def direct_io_works(folder: Path) -> bool:
    with open(folder / "probe", "w+b") as f:
        w = DirectWriter.open(f.fileno())
        if w is not None:
            w.finish()
    (folder / "probe").unlink()
    return w is not None


@pytest.mark.parametrize("sizes", [[1], [4095, 4097, 1], [8 << 20, 3], [5 << 20, 6 << 20, 123]])
def test_direct_writer_appends_exactly_what_it_is_given(tmp_path, sizes):
    if not direct_io_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    rng = np.random.default_rng(len(sizes))
    src = tmp_path / "src.bin"
    src.write_bytes(rng.integers(0, 256, 20 << 20, np.uint8).tobytes())
    expect = bytearray()
    with open(tmp_path / "dst.bin", "w+b") as f, open(src, "rb") as s:
        w = DirectWriter.open(f.fileno())
        assert w is not None
        for i, n in enumerate(sizes):
            if i % 2:
                off = int(rng.integers(0, (20 << 20) - n))
                assert w.copy_from(s.fileno(), off, n) == n
                expect += src.read_bytes()[off : off + n]
            else:
                data = rng.integers(0, 256, n, np.uint8).tobytes()
                w.write(data)
                expect += data
        assert w.finish() == len(expect)
    assert (tmp_path / "dst.bin").read_bytes() == bytes(expect)


def test_direct_writer_reports_a_full_disk_and_leaves_no_output(big, tmp_path):
    """A real failing write (file size limit below the output's size) on the direct path:
    EFBIG, a one-line error, nothing at the destination."""
    import resource

    limit = big.model.stat().st_size // 2 + 12345  # not a multiple of the block size

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "robustpatch.cli", "apply", big.model, big.sig, "-o", out / "p"]
        + ["--durable"],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("robustpatch: error: ") and "Traceback" not in proc.stderr
    assert "too large" in proc.stderr.lower() or str(errno.EFBIG) in proc.stderr
    assert list(out.iterdir()) == []
    assert sha(big.model) == big.model_sha


def test_a_rejected_direct_write_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    """Where the filesystem refuses an O_DIRECT write (EINVAL), the writer switches to
    buffered writes and the file is still exact."""
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    data = np.random.default_rng(0).integers(0, 256, (9 << 20) + 77, np.uint8).tobytes()
    with open(tmp_path / "f", "w+b") as f:
        w = DirectWriter.open(f.fileno())
        if w is None:
            pytest.skip("no O_DIRECT on this filesystem")
        monkeypatch.setattr(os, "pwrite", pwrite)
        w.write(data)
        assert w.finish() == len(data)
    assert refused == [0]
    assert (tmp_path / "f").read_bytes() == data


def test_undo_record_is_written_as_it_goes_and_reads_back(big, tmp_path):
    """The streamed sidecar is valid safetensors and holds a record per touched tensor."""
    out = tmp_path / "p.safetensors"
    rep = apply_file(big.model, [big.sig], 1.0, out)
    header, tensors = read_tensors(undo_path_for(out))
    names = {n.split("/")[1] for n in tensors if n.startswith("records/")}
    assert len(names) == rep.tensors == N_TENSORS // 4
    assert sum(len(a) for n, a in tensors.items() if n.endswith("/positions")) == (
        rep.record_elements
    )
    assert header.data_start % 8 == 0
