"""rp.onnx: the files a write leaves beside its output: a data file of its own per write
(a process killed between the set's renames leaves the previous model whole), the
previous writes' data files and records deleted, and the data file ``remove`` restores
under the source's name (no torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import robustpatch.onnx as ro  # noqa: E402
from robustpatch.cli import main  # noqa: E402
from robustpatch.errors import InvalidArgumentError, MismatchError  # noqa: E402
from rp_testutil import sha  # noqa: E402
from test_onnx import initializers, is_data_of, make_setup, model_proto, save  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    return make_setup(tmp_path)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------- a kill


KILLED_APPLY = """
import os, signal, sys
import robustpatch.onnx as ro
from robustpatch._io import atomic

rename, done = atomic.AtomicFile._rename, []

def killed_after(self):  # SIGKILL right after the k-th rename of the set
    rename(self)
    done.append(self.path)
    if len(done) == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)

atomic.AtomicFile._rename = killed_after
ro.apply(sys.argv[1], sys.argv[2], -0.5, out=sys.argv[3])
"""


NEXT_APPLY = """
import sys
import robustpatch.onnx as ro
ro.apply(sys.argv[1], sys.argv[2], 1.0, out=sys.argv[3])
"""


@pytest.mark.parametrize("renamed", [1, 2])
def test_a_write_killed_between_its_renames_leaves_the_previous_model_whole(setup, renamed):
    # the data file was renamed before the model: the previous .onnx read the new data
    # file, a model of other weights (its embedded tensors the previous patch's)
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external=True)  # mixed
    sig.save(tmp / "fog.rws")
    (tmp / "out").mkdir()
    out = tmp / "out" / "p.onnx"
    first = ro.apply(src, sig, 1.0, out=out)
    before = initializers(out)
    args = [sys.executable, "-c", KILLED_APPLY, str(src), str(tmp / "fog.rws"), str(out)]
    assert subprocess.run([*args, str(renamed)]).returncode == -9
    assert {k: v.tobytes() for k, v in initializers(out).items()} == {
        k: v.tobytes() for k, v in before.items()
    }
    if renamed == 1:  # only the new data file is there, which nothing reads
        ro.remove(out, tmp / "back.onnx")
        assert sha(tmp / "back.onnx.data") == sha(tmp / "src" / "m.onnx.data")
    else:  # the new record beside the previous model, which remove refuses
        with pytest.raises(MismatchError, match="differs from the model its undo record"):
            ro.remove(out, tmp / "back.onnx")
    assert len([n for n in names(out.parent) if n.endswith(".data")]) == 2
    # the next write (a process started after the kill) deletes what the kill left
    again = [sys.executable, "-c", NEXT_APPLY, str(src), str(tmp / "fog.rws"), str(out)]
    assert subprocess.run(again).returncode == 0
    data = [n for n in names(out.parent) if n.endswith(".data")]
    assert len(data) == 1 and first.data.name not in data
    assert names(out.parent) == sorted(["p.onnx", *data, "p.onnx.rpundo"])
    ro.remove(out, tmp / "back2.onnx")


# ---------------------------------------------------------------------------- data files


def test_a_write_over_a_previous_output_deletes_its_data_file(setup):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external=True)
    (tmp / "out").mkdir()
    out = tmp / "out" / "p.onnx"
    first = ro.apply(src, sig, 1.0, out=out)
    second = ro.apply(src, sig, -1.0, out=out)
    assert is_data_of(first.data, out) and is_data_of(second.data, out)
    assert first.data != second.data and not first.data.exists()
    assert names(out.parent) == sorted(["p.onnx", second.data.name, "p.onnx.rpundo"])
    third = ro.apply(src, sig, 1.0, out=out, undo=False)  # and without a record
    assert names(out.parent) == sorted(["p.onnx", third.data.name])


def test_a_write_over_a_model_reading_out_data_deletes_that_file(setup):
    """``remove`` (and earlier versions' ``apply``) write ``<out>.data``: a patched model
    written over such an output deletes it once the new set is in place."""
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external=True)
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    (tmp / "out").mkdir()
    ro.remove(tmp / "p.onnx", tmp / "out" / "r.onnx")
    assert (tmp / "out" / "r.onnx.data").exists()
    rep = ro.apply(src, sig, 0.5, out=tmp / "out" / "r.onnx")
    assert is_data_of(rep.data, rep.out)
    assert names(tmp / "out") == sorted(["r.onnx", rep.data.name, "r.onnx.rpundo"])


def test_a_data_file_another_model_of_the_folder_reads_is_kept(setup):
    """A previous output renamed (or copied) still reads its data file: the next write
    to the output's name leaves that file alone."""
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external=True)
    (tmp / "out").mkdir()
    out = tmp / "out" / "p.onnx"
    first = ro.apply(src, sig, 1.0, out=out)
    out.rename(tmp / "out" / "old.onnx")
    second = ro.apply(src, sig, -1.0, out=out)
    (tmp / "out" / "copy.onnx").write_bytes(out.read_bytes())
    ro.apply(src, sig, 0.5, out=out)
    assert first.data.exists() and second.data.exists()
    x = np.zeros((1, 3, 2, 2), np.float32)
    for name in ("old.onnx", "copy.onnx"):
        path = os.fspath(tmp / "out" / name)
        ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_a_previous_outputs_data_file_that_is_an_input_is_kept(setup):
    """The model ``out`` replaces read ``<out>.data``, which is the source's data file:
    an input is never deleted with the previous output's data."""
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx", external=True, location="p.onnx.data")
    (tmp / "p.onnx").write_bytes(src.read_bytes())  # reads p.onnx.data too
    data = sha(tmp / "p.onnx.data")
    rep = ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    assert sha(tmp / "p.onnx.data") == data and is_data_of(rep.data, rep.out)
    assert names(tmp) == sorted(["m.onnx", "p.onnx", "p.onnx.data", rep.data.name, "p.onnx.rpundo"])
    ro.load(src)


# ---------------------------------------------------------------------------- records


def test_an_output_written_without_a_record_drops_the_previous_ones(setup):
    # "onnx apply --no-undo --overwrite" and "onnx remove --overwrite" kept the record of
    # the model they replaced, which named signatures the new file does not carry
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx")
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    ro.apply(src, sig, -1.0, out=tmp / "p.onnx", undo=False)
    assert not (tmp / "p.onnx.rpundo").exists()
    ro.apply(src, sig, 1.0, out=tmp / "q.onnx")
    ro.apply(src, sig, 1.0, out=tmp / "r.onnx")
    ro.remove(tmp / "q.onnx", tmp / "r.onnx")
    assert sha(tmp / "r.onnx") == sha(src) and not (tmp / "r.onnx.rpundo").exists()
    (tmp / "s.onnx.rpundo").write_bytes((tmp / "q.onnx.rpundo").read_bytes())
    ro.remove(tmp / "q.onnx", tmp / "s.onnx", undo=tmp / "s.onnx.rpundo")  # an input: kept
    assert (tmp / "s.onnx.rpundo").exists()


# ---------------------------------------------------------------------------- source names


def test_remove_with_the_sources_data_name_gives_back_its_bytes_under_any_name(setup, capsys):
    # the data file was always <out>.data: a source reading weights.bin (as
    # onnx.save_model(..., location="weights.bin") writes it) never came back whole
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "model.onnx", external=True, location="w.bin")
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    (tmp / "back").mkdir()
    rep = ro.remove(tmp / "p.onnx", tmp / "back" / "restored.onnx", source_data_name=True)
    assert rep.data == tmp / "back" / "w.bin"
    assert sha(rep.out) == sha(src) and sha(rep.data) == sha(tmp / "src" / "w.bin")
    plain = ro.remove(tmp / "p.onnx", tmp / "back" / "model.onnx")  # <out>.data, as documented
    assert plain.data == tmp / "back" / "model.onnx.data" and sha(plain.out) != sha(src)
    args = ["onnx", "remove", str(tmp / "p.onnx"), "-o", str(tmp / "back" / "again.onnx")]
    assert main([*args, "--source-data-name"]) == 1  # back/w.bin exists
    assert "w.bin: already exists" in capsys.readouterr().err
    assert not (tmp / "back" / "again.onnx").exists()
    assert main([*args, "--source-data-name", "--overwrite"]) == 0
    assert sha(tmp / "back" / "again.onnx") == sha(src)


def test_remove_refuses_the_sources_data_name_in_a_subfolder(setup):
    clean, sig, tmp = setup
    (tmp / "src" / "sub").mkdir(parents=True)
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external=True, location="sub/w.bin")
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    before = names(tmp)
    with pytest.raises(InvalidArgumentError, match="'sub/w.bin', in a subfolder"):
        ro.remove(tmp / "p.onnx", tmp / "r.onnx", source_data_name=True)
    assert names(tmp) == before
    x = np.zeros((1, 3, 2, 2), np.float32)
    ro.remove(tmp / "p.onnx", tmp / "r.onnx")  # as <out>.data
    sess = ort.InferenceSession(os.fspath(tmp / "r.onnx"), providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x})


def test_remove_refuses_a_source_data_name_that_is_the_outputs_own(setup):
    # both files of the set went to one name: the data file, then the model over it
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external=True, location="r.onnx")
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    before = names(tmp)
    with pytest.raises(InvalidArgumentError, match="'r.onnx', the output's own name"):
        ro.remove(tmp / "p.onnx", tmp / "r.onnx", source_data_name=True)
    assert names(tmp) == before


def test_an_output_in_a_missing_folder_and_a_check_without_a_model_say_what_is_wrong(
    tmp_path, capsys
):
    # the error named the undo record; "required: model, signatures" (signatures optional)
    clean, sig, d = make_setup(tmp_path)
    onnx.save(model_proto(clean), d / "m.onnx")
    sig.save(d / "s.rws")
    with pytest.raises(FileNotFoundError) as e:
        ro.apply(d / "m.onnx", [d / "s.rws"], 1.0, out=d / "nodir" / "o.onnx")
    assert e.value.filename == str(d / "nodir" / "o.onnx")
    with pytest.raises(SystemExit):
        main(["onnx", "check"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.endswith("the following arguments are required: model")
