"""Leftovers of killed writers: only a dead process's old entries of the right kind go."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from robustpatch._io.atomic import _pid_alive, _proc_state, remove_stale_temps
from robustpatch.sharded import remove_stale_folders

DEAD = 999999999  # no such process


def _old(path):
    os.utime(path, (1, 1))
    return path


@pytest.mark.skipif(os.name != "posix", reason="pids are probed on POSIX only")
def test_a_dead_writers_old_temporary_file_goes_and_nothing_else(tmp_path):
    out = tmp_path / "m.safetensors"
    stale = tmp_path / f".m.safetensors.rp{DEAD}.abc.tmp"
    stale.write_bytes(b"x")
    _old(stale)
    live = tmp_path / f".m.safetensors.rp{os.getpid()}.abc.tmp"  # a concurrent writer's
    live.write_bytes(b"x")
    _old(live)
    other = tmp_path / f".n.safetensors.rp{DEAD}.abc.tmp"  # another destination's
    other.write_bytes(b"x")
    _old(other)
    folder = tmp_path / f".m.safetensors.rp{DEAD}.def.tmp"  # a file is looked for
    folder.mkdir()
    _old(folder)
    fresh = tmp_path / f".m.safetensors.rp{DEAD}.ghi.tmp"  # newer than this process
    fresh.write_bytes(b"x")
    kept = tmp_path / f".m.safetensors.rp{DEAD}.jkl.tmp"  # a set's copy of a linked output
    kept.symlink_to(other)
    os.utime(kept, (1, 1), follow_symlinks=False)
    assert sorted(remove_stale_temps(out)) == sorted([stale, kept])
    assert all(p.exists() for p in (live, other, folder, fresh))


@pytest.mark.skipif(os.name != "posix", reason="pids are probed on POSIX only")
def test_a_dead_writers_old_folders_go_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # in place: a .old folder is a previous one, already replaced
    tmp, old = tmp_path / f".out.rp{DEAD}.a.tmp", tmp_path / f".out.rp{DEAD}.b.old"
    for d in (tmp, old):
        d.mkdir()
        (d / "part").write_bytes(b"x")
        _old(d)
    file = tmp_path / f".out.rp{DEAD}.c.tmp"  # a folder is looked for
    file.write_bytes(b"x")
    _old(file)
    link = tmp_path / f".out.rp{DEAD}.d.tmp"  # never followed
    link.symlink_to(tmp, target_is_directory=True)
    assert sorted(remove_stale_folders(out)) == sorted([tmp, old])
    assert file.exists() and link.is_symlink()


def test_a_previous_folder_a_writer_was_killed_over_is_put_back(tmp_path):
    # killed between the two renames of a commit (no renameat2): "out" was missing and
    # its previous content, at .old, was deleted by the next write's cleanup. A part-
    # deleted .old (an earlier release deleted them under that name) is never put back.
    from test_sharded import shard_name, write_sharded

    out = tmp_path / "out"
    older, newer, part = (tmp_path / f".out.rp{DEAD}.{k}.old" for k in "abc")
    for d, stamp in ((older, 1_000_000), (newer, 2_000_000), (part, 3_000_000)):
        write_sharded(d, seed=stamp)
        if d == part:
            (part / shard_name(1)).unlink()
        os.utime(d, (stamp, stamp))
    want = {p.name: p.read_bytes() for p in newer.iterdir()}
    assert sorted(remove_stale_folders(out)) == sorted([older, part])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == want and not newer.exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process states from /proc")
def test_a_killed_writer_not_yet_reaped_is_dead(tmp_path):
    # a zombie answers kill(pid, 0): its files stayed for good under a PID 1 that never reaps
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while _proc_state(child.pid)[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        stale = tmp_path / f".m.safetensors.rp{child.pid}.abc.tmp"
        stale.write_bytes(b"x")
        _old(stale)
        assert remove_stale_temps(tmp_path / "m.safetensors") == [stale]
    finally:
        child.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process starts from /proc")
def test_a_process_that_started_after_an_entry_is_not_its_writer():
    # the writer's pid was reused: a process that started later kept its files for good
    assert _pid_alive(os.getpid(), since=time.time())
    assert not _pid_alive(os.getpid(), since=_proc_state(os.getpid())[1] - 60)
