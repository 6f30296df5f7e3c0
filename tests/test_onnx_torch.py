"""rp.onnx against torch's exporter: apply on the exported file equals patching in torch
then exporting, bit for bit; folded BatchNorm is refused; rp.onnx.export's variants are
measured and refused outside their tolerance."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper  # noqa: E402

import robustpatch as rp  # noqa: E402
import robustpatch.onnx as ro  # noqa: E402
from robustpatch.cli import main  # noqa: E402
from robustpatch.errors import InvalidArgumentError, MismatchError  # noqa: E402
from robustpatch.lab.models import SmallCNN  # noqa: E402
from robustpatch.onnx.exporter import TOLERANCES, has_dynamo_export  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(
        not has_dynamo_export(), reason="torch.onnx.export(dynamo=True): torch >= 2.6"
    ),
]


def _perturbed(state: dict, gen: torch.Generator, scale: float, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        moved = v.is_floating_point() and k.startswith(prefix)
        out[k] = v + scale * torch.randn(v.shape, generator=gen) if moved else v.clone()
    return out


@pytest.fixture(scope="module")
def models():
    """A small SmallCNN clean model and a signature over its first stage (convs and BN)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    model = SmallCNN(num_classes=10, widths=(4, 8, 8), seed=0).eval()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    clean = _perturbed(pre, gen, 0.01)
    robust = _perturbed(clean, gen, 0.05, prefix="features.")
    for k in clean:
        if k.endswith("running_var"):
            robust[k] = clean[k] * 1.5
    model.load_state_dict(clean)
    sig = rp.extract(pre, clean, robust, layers=r"features\.[0-4]").quantize(bits=4)
    x = torch.rand(16, 3, 32, 32, generator=gen)
    return model, sig, x


def _export(model, x, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, **kwargs)


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_apply_equals_patching_in_torch_then_exporting_bit_for_bit(models, tmp_path):
    model, sig, x = models
    _export(model, x, tmp_path / "clean.onnx", optimize=False)
    ro.apply(tmp_path / "clean.onnx", sig, 0.8, out=tmp_path / "fog.onnx")
    patched = SmallCNN(num_classes=10, widths=(4, 8, 8)).eval()
    patched.load_state_dict(model.state_dict())
    rp.apply(patched, sig, 0.8)
    _export(patched, x, tmp_path / "torch_fog.onnx", optimize=False)
    got, want = _initializers(tmp_path / "fog.onnx"), _initializers(tmp_path / "torch_fog.onnx")
    assert set(sig.entries) <= set(got) and set(got) == set(want)
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    assert any(not np.array_equal(got[n], _initializers(tmp_path / "clean.onnx")[n]) for n in got)


class TiedLM(torch.nn.Module):
    """A language model whose output projection is its embedding (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.body = torch.nn.Linear(16, 16)
        self.lm_head = torch.nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.body(self.embed(ids))))


def test_apply_to_the_export_of_a_tied_model_equals_patching_in_torch(tmp_path):
    # torch's exporter keeps one initializer of the tie, not the name the signature kept:
    # "has no initializer 'embed.weight' ... (was a BatchNorm folded ...?)"
    torch.manual_seed(0)
    pre, clean, robust = TiedLM(), TiedLM(), TiedLM()
    for m, scale in ((clean, 0.01), (robust, 0.1)):
        m.load_state_dict(pre.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn_like(p))
    sig = rp.extract(pre, clean, robust, layers="all")
    assert sig.meta["tied"] == {"lm_head.weight": "embed.weight"}
    ids = torch.tensor([[1, 2, 3]])
    _export(clean.eval(), ids, tmp_path / "lm.onnx", optimize=False)
    ro.apply(tmp_path / "lm.onnx", sig, 1.0, out=tmp_path / "p.onnx")
    rp.apply(clean, sig, 1.0)
    _export(clean, ids, tmp_path / "torch_p.onnx", optimize=False)
    got, want = _initializers(tmp_path / "p.onnx"), _initializers(tmp_path / "torch_p.onnx")
    assert set(got) == set(want) and len(got) == 3
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name


def test_export_with_folded_batchnorm_is_refused_with_the_way_out(models, tmp_path):
    model, sig, x = models
    _export(model, x, tmp_path / "folded.onnx")  # torch's default optimizes: BN folded
    with pytest.raises(MismatchError, match=r"features\.1\..*optimize=False"):
        ro.apply(tmp_path / "folded.onnx", sig, 1.0, out=tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("dtype,int8", [("f32", False), ("f16", False), ("f32", "dynamic")])
def test_export_measures_the_written_variant_against_patched_torch(models, tmp_path, dtype, int8):
    model, sig, x = models
    out = tmp_path / "v.onnx"
    rep = ro.export(
        model, x, out, signatures=sig, alphas=1.0, dtype=dtype, int8=int8, min_agreement=0.0
    )
    patched = SmallCNN(num_classes=10, widths=(4, 8, 8)).eval()
    patched.load_state_dict(model.state_dict())
    rp.apply(patched, sig, 1.0)
    with torch.no_grad():
        ref = patched(x).numpy()
    got = _run(out, x)
    assert rep["max_abs_error"] == pytest.approx(float(np.abs(got - ref).max()), rel=1e-6)
    assert rep["agreement"] == float((got.argmax(1) == ref.argmax(1)).mean())
    assert rep["bytes"] == out.stat().st_size
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "BatchNormalization" not in ops  # folded after patching
    # the f16 converter's input casts came last: "must be topologically sorted"
    onnx.checker.check_model(str(out))
    ro.load(out)
    if int8:
        assert ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}


def test_export_refuses_a_variant_outside_its_tolerance(models, tmp_path):
    model, sig, x = models
    out = tmp_path / "v.onnx"
    with pytest.raises(MismatchError, match="nothing was written"):
        ro.export(model, x, out, signatures=sig, int8="dynamic", max_abs_error=0.0)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InvalidArgumentError, match="dtype='f32'"):
        ro.export(model, x, out, dtype="f16", int8="static")
    with pytest.raises(InvalidArgumentError, match="'f32' or 'f16'"):
        ro.export(model, x, out, dtype="bf16")


def test_cli_export_writes_a_static_int8_variant(models, tmp_path, capsys):
    from safetensors.torch import save_file

    model, sig, x = models
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "c.st")
    sig.save(tmp_path / "fog.rws")
    args = ["onnx", "export", str(tmp_path / "c.st"), "-o", str(tmp_path / "q.onnx")]
    args += ["--signature", str(tmp_path / "fog.rws"), "--int8", "static"]
    assert main([*args, "--min-agreement", "0", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["variant"] == "int8" and rep["batch"] == 64
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "QuantizeLinear" in ops


def test_export_on_a_torch_without_the_dynamo_exporter_says_what_it_needs(
    models, tmp_path, monkeypatch
):
    model, sig, x = models
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, f=None: None)
    with pytest.raises(InvalidArgumentError, match=r"torch >= 2\.6"):
        ro.export(model, x, tmp_path / "v.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_refuses_a_checkpoint_that_is_not_safetensors_in_one_line(tmp_path, capsys):
    (tmp_path / "c.st").write_bytes(b"not a safetensors file at all")
    args = ["onnx", "export", str(tmp_path / "c.st"), "-o", str(tmp_path / "q.onnx")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("robustpatch: error: ") and err.count("\n") == 1
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("bad", [{"max_abs_error": float("nan")}, {"min_agreement": float("nan")}])
def test_export_refuses_a_nan_tolerance_before_any_work(models, tmp_path, bad):
    model, sig, x = models
    with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
        ro.export(model, x, tmp_path / "v.onnx", signatures=sig, **bad)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_never_writes_over_its_checkpoint_or_signature(models, tmp_path, capsys):
    # with --overwrite, -o the checkpoint (or a signature) was replaced by the ONNX bytes
    from safetensors.torch import save_file

    model, sig, _ = models
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "c.st")
    sig.save(tmp_path / "fog.rws")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    base = ["onnx", "export", str(tmp_path / "c.st"), "--signature", str(tmp_path / "fog.rws")]
    for target in ("c.st", "fog.rws"):
        assert main([*base, "-o", str(tmp_path / target), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert "is the input" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as usage:
        main([*base[:3], "-o", str(tmp_path / "v.onnx"), "--alpha", "0.5"])
    assert usage.value.code == 2
    assert "--alpha needs --signature" in capsys.readouterr().err  # it was ignored
    with pytest.raises(InvalidArgumentError, match="is the input"):
        ro.export(
            model, torch.rand(2, 3, 32, 32), tmp_path / "fog.rws", signatures=[tmp_path / "fog.rws"]
        )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_input_the_model_cannot_take_or_a_model_that_is_no_classifier_is_one_error(
    models, tmp_path, capsys
):
    # a 360-line torch traceback; a raw AxisError / AttributeError after the export
    from safetensors.torch import save_file

    model, _, x = models
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "c.st")
    args = ["onnx", "export", str(tmp_path / "c.st"), "-o", str(tmp_path / "v.onnx")]
    assert main([*args, "--input-shape", "3", "2", "2"]) == 1
    err = capsys.readouterr().err
    assert "does not run on inputs of shape (3, 2, 2)" in err and err.count("\n") == 1

    class Flat(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3))

    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, x

    for odd in (Flat(), Pair()):
        with pytest.raises(InvalidArgumentError, match=r"one tensor of shape \(N, C, \.\.\.\)"):
            ro.export(odd, x, tmp_path / "v.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.st"]
    seg = torch.nn.Conv2d(3, 5, 1)  # (N, C, H, W) out: agreement per pixel, as before
    assert ro.export(seg, x, tmp_path / "seg.onnx")["agreement"] == 1.0


def test_max_abs_error_is_relative_to_the_largest_output_as_its_default_is(models, tmp_path):
    # a value given was compared with the absolute error, the default with the relative one
    model, sig, x = models
    big = SmallCNN(num_classes=10, widths=(4, 8, 8)).eval()
    big.load_state_dict(model.state_dict())
    with torch.no_grad():
        big.classifier.weight.mul_(1000.0)
    default = ro.export(big, x, tmp_path / "a.onnx", dtype="f16", min_agreement=0.0)
    allowed = TOLERANCES["f16"][0]
    assert default["max_abs_error"] > allowed >= default["relative_error"]  # the case it broke
    ro.export(big, x, tmp_path / "b.onnx", dtype="f16", min_agreement=0.0, max_abs_error=allowed)


def test_a_nan_measurement_fails_the_tolerance():
    from robustpatch.onnx.exporter import _check_tolerance

    nan = {"max_abs_error": float("nan"), "relative_error": float("nan"), "agreement": 1.0}
    for limit in (None, 1.0):
        with pytest.raises(MismatchError):
            _check_tolerance(nan, "f32", limit, None)
    with pytest.raises(MismatchError):
        _check_tolerance({**nan, "relative_error": 0.0, "agreement": float("nan")}, "f32", 1, None)


def test_cli_export_of_a_checkpoint_named_in_bytes_not_utf8_prints_nothing_with_q(
    models, tmp_path, capfd
):
    # safetensors' own open refused the name (a traceback); torch's exporter logged that
    # torchvision is missing on every export, -q or not
    from safetensors.torch import save_file

    model, _, _ = models
    bad = tmp_path / os.fsdecode(b"c\xff.st")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "c.st")
    os.rename(tmp_path / "c.st", bad)
    assert main(["onnx", "export", str(bad), "-o", str(tmp_path / "v.onnx"), "-q"]) == 0
    out, err = capfd.readouterr()
    assert out == "" and err == ""
