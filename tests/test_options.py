"""The keyword options of a patch (robustpatch.options.PatchOptions): declared once,
checked where a call enters, and carried whole to the writer that does the work."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

import robustpatch as rp
import robustpatch.onnx as ro
from robustpatch._format.safetensors import read_tensors, write_tensors
from robustpatch.errors import InvalidArgumentError, MismatchError, NonFiniteError
from robustpatch.options import PatchOptions
from robustpatch.sharded import RECORD_NAME
from robustpatch.targets import apply, subtract

SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture
def case(tmp_path):
    """An f16 model as one file and as a one-shard checkpoint, and a signature that
    overflows it at α = 1e30."""
    model = {"w": np.linspace(-1, 1, 64).astype(np.float16)}
    write_tensors(tmp_path / "m.safetensors", model)
    (tmp_path / "ckpt").mkdir()
    write_tensors(tmp_path / "ckpt" / SHARD, model)
    index = {"metadata": {}, "weight_map": {"w": SHARD}}
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    sig = rp.Signature.from_deltas({"w": np.full(64, 0.01, np.float16)}, name="fog")
    sig.save(tmp_path / "fog.rws")
    return tmp_path


def _run(d, layout: str, **options):
    """Apply to ``layout``; (the patched tensor, the undo record's path)."""
    if layout == "file":
        rp.apply_file(d / "m.safetensors", d / "fog.rws", 1e30, d / "p.safetensors", **options)
        return read_tensors(d / "p.safetensors")[1]["w"], d / "p.safetensors.rpundo"
    if layout == "sharded":
        rp.apply_file(d / "ckpt", d / "fog.rws", 1e30, d / "out", **options)
        return read_tensors(d / "out" / SHARD)[1]["w"], d / "out" / RECORD_NAME
    rp.apply_file(d / "m.safetensors", d / "fog.rws", 1e30, inplace=True, **options)
    return read_tensors(d / "m.safetensors")[1]["w"], d / "m.safetensors.rpundo"


@pytest.mark.parametrize("layout", ["file", "sharded", "inplace"])
def test_every_writer_gets_the_options_it_was_called_with(case, layout):
    with pytest.raises(NonFiniteError, match="overflow"):
        _run(case, layout)
    w, record = _run(case, layout, allow_nonfinite=True, undo=False)
    assert np.isinf(w).all()
    assert not record.exists()


CALLS = {
    "apply_file": lambda d, **o: rp.apply_file(
        d / "m.safetensors", d / "fog.rws", 1.0, d / "p", **o
    ),
    "onnx.apply": lambda d, **o: ro.apply(d / "m.onnx", d / "fog.rws", 1.0, d / "p", **o),
    "apply": lambda d, **o: apply({"w": np.zeros(64, np.float16)}, d / "fog.rws", 1.0, **o),
    "subtract": lambda d, **o: subtract({"w": np.zeros(64, np.float16)}, d / "fog.rws", **o),
}


@pytest.mark.parametrize("fn", CALLS)
def test_a_misspelt_option_is_a_type_error_naming_the_call(case, fn):
    msg = rf"^{fn}\(\) got an unexpected keyword argument 'forse'$"
    with pytest.raises(TypeError, match=msg):
        CALLS[fn](case, forse=True)
    assert not (case / "p").exists()


@pytest.mark.parametrize("fn", CALLS)
def test_an_option_that_is_not_true_or_false_is_refused(case, fn):
    with pytest.raises(InvalidArgumentError, match=r"^force must be true or false, got 'no'$"):
        CALLS[fn](case, force="no")
    assert not (case / "p").exists()


@pytest.mark.parametrize("fn", ["apply", "subtract"])
@pytest.mark.parametrize("option", ["undo", "durable"])
def test_a_model_in_memory_takes_no_file_option(case, fn, option):
    with pytest.raises(
        TypeError, match=rf"^{fn}\(\) got an unexpected keyword argument '{option}'$"
    ):
        CALLS[fn](case, **{option: True})


@pytest.mark.parametrize("fn", [rp.apply, rp.subtract])
def test_a_model_in_memory_takes_the_dtype_change_its_refusal_advises(fn):
    # the refusal said "allow_dtype_change=True", which the call then rejected (TypeError)
    sig = rp.Signature.from_deltas({"w": np.full((2, 3), 0.5, np.float32)}, name="s")
    model = {"w": np.zeros((2, 3), np.float16)}
    with pytest.raises(MismatchError, match=r"allow_dtype_change=True to apply anyway"):
        fn(model, sig)
    assert not model["w"].any()
    fn(model, sig, allow_dtype_change=True)
    assert (model["w"] == np.float16(0.5 if fn is rp.apply else -0.5)).all()


# ---------------------------------------------------------------------------- the CLI's flags

NONE = asdict(PatchOptions())  # the defaults
ALL_FLAGS = ["--force", "--allow-dtype-change", "--no-undo", "--durable", "--allow-nonfinite"]
ALL = {
    "force": True,
    "allow_dtype_change": True,
    "undo": False,
    "durable": True,
    "allow_nonfinite": True,
}


@pytest.mark.parametrize("command", [["apply"], ["subtract"], ["onnx", "apply"]])
@pytest.mark.parametrize(
    "flags, options",
    [([], NONE), (ALL_FLAGS, ALL)],
)
def test_each_patching_command_turns_its_flags_into_the_options(
    case, monkeypatch, command, flags, options
):
    import robustpatch.files
    from robustpatch.cli import main
    from robustpatch.files import FileReport
    from robustpatch.onnx.patch import OnnxReport

    seen = {}

    def file_stand_in(src, sigs, alphas, out, *, progress, inplace, embed_signature, **o):
        seen.update(o)
        return FileReport(case / "p", None, 0, 0, 0, 0)

    def onnx_stand_in(model, sigs, alphas, out, **o):
        seen.update(o)
        return OnnxReport(case / "p", None, None, 0, 0, 0)

    monkeypatch.setattr(robustpatch.files, "apply_file", file_stand_in)
    monkeypatch.setattr(ro, "apply", onnx_stand_in)
    argv = [*command, str(case / "m.safetensors"), str(case / "fog.rws"), "-o", str(case / "p")]
    assert main([*argv, *flags]) == 0
    assert seen == options


def test_no_flag_shows_a_default_in_the_help(capsys):
    from robustpatch.cli import main

    with pytest.raises(SystemExit):
        main(["apply", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no-undo do not write the .rpundo record --durable" in out


# ---------------------------------------------------------------------------- a pipeline job


def test_a_jobs_options_reach_the_writer(case):
    from robustpatch.pipeline.jobs import Job, run_job

    job = Job.make(
        case / "m.safetensors", case / "fog.rws", 1.0, case / "j.safetensors", undo=False
    )
    assert run_job(job)["status"] == "done"
    assert (case / "j.safetensors").exists() and not (case / "j.safetensors.rpundo").exists()


def test_a_job_takes_no_option_a_manifest_cannot_give(case):
    from robustpatch.pipeline.jobs import Job

    msg = r"^Job\.make\(\) got an unexpected keyword argument 'allow_nonfinite'$"
    with pytest.raises(TypeError, match=msg):
        Job.make(case / "m.safetensors", case / "fog.rws", 1.0, case / "j", allow_nonfinite=True)
