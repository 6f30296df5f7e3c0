"""remove_file checks the undo record's digest in a second thread while it restores the
file (issue 15: the digest was a serial pass over the whole record before the restore
began), and still commits nothing restored with a record that fails it."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import robustpatch as rp
import robustpatch.files as files_module
from robustpatch._format import undo as undo_module
from robustpatch._format.safetensors import read_tensors, write_tensors
from robustpatch._format.undo import UNDO_KEY, undo_path_for
from robustpatch.errors import FormatError
from robustpatch.extraction import extract
from rp_testutil import listing, sha, trio


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(model, patched): a 4-bit signature applied at α 1.0, its record beside it."""
    d = tmp_path_factory.mktemp("pair")
    pre, clean, robust = trio(0)
    write_tensors(d / "model.safetensors", clean)
    sig = extract(pre, clean, robust, layers="all", name="fog").quantize(4)
    rp.apply_file(d / "model.safetensors", [sig], 1.0, d / "p.safetensors")
    return d / "model.safetensors", d / "p.safetensors"


def test_the_record_digest_is_checked_while_the_file_is_restored(pair, tmp_path, monkeypatch):
    """The digest check waits until the restore has begun: were it checked before the
    restore (serially), it would wait in vain and fail the removal."""
    restoring = threading.Event()
    check, restore = undo_module._check_record_digest, files_module.restore_target

    def check_once_restoring(*args):
        assert restoring.wait(60), "the record digest was checked before the restore began"
        check(*args)

    def restore_flagged(*args):
        restoring.set()
        return restore(*args)

    monkeypatch.setattr(undo_module, "_check_record_digest", check_once_restoring)
    monkeypatch.setattr(files_module, "restore_target", restore_flagged)
    rp.remove_file(pair[1], tmp_path / "r.safetensors")
    assert sha(tmp_path / "r.safetensors") == sha(pair[0])


def _rename_signature(meta: dict) -> None:
    """Damage the restore never reads: only the record digest can tell."""
    meta["signatures"][0]["name"] += "-renamed"


def test_a_record_that_restores_exactly_but_fails_its_digest_commits_nothing(pair, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    patched, undo = folder / "p.safetensors", undo_path_for(folder / "p.safetensors")
    shutil.copyfile(pair[1], patched)
    header, tensors = read_tensors(undo_path_for(pair[1]))
    meta = json.loads(header.metadata[UNDO_KEY])
    _rename_signature(meta)
    labels = {k: "U16" for k, a in tensors.items() if a.dtype == np.uint16}
    write_tensors(undo, tensors, {UNDO_KEY: json.dumps(meta)}, labels)
    before = (sha(patched), sha(undo))
    with pytest.raises(FormatError, match="record digest does not match"):
        rp.remove_file(patched, out / "r.safetensors")
    assert listing(out) == {}
    assert (sha(patched), sha(undo)) == before
