"""rp.onnx: which models a signature fits and which graphs are read (tied weights, node
order, f16 models and ``onnx check``'s flags, the undo record beside a model, what
onnxruntime refuses, ``onnx export``'s flag values), no torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import robustpatch as rp  # noqa: E402
import robustpatch.onnx as ro  # noqa: E402
from robustpatch.cli import main  # noqa: E402
from robustpatch.errors import FormatError, InvalidArgumentError, MismatchError  # noqa: E402
from robustpatch.onnx.check import check  # noqa: E402
from rp_testutil import copy_model, sha, trio  # noqa: E402
from test_onnx import initializers, make_setup, model_proto, run, save  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    return make_setup(tmp_path)


# ---------------------------------------------------------------------------- tied weights


def tied_lm(seed: int = 0) -> tuple[dict, dict, dict]:
    """pretrained, clean, robust state dicts of a language model whose output projection
    ``head.weight`` is its embedding ``embed.weight`` (one array under two names)."""
    rng = np.random.default_rng(seed)

    def moved(base: dict | None, scale: float) -> dict:
        if base is None:
            d = {"embed.weight": rng.normal(size=(10, 4)), "body.weight": rng.normal(size=(4, 4))}
            d["body.bias"] = rng.normal(size=4)
        else:
            d = {
                k: v + rng.normal(0, scale, v.shape) for k, v in base.items() if k != "head.weight"
            }
        d = {k: v.astype(np.float32) for k, v in d.items()}
        d["head.weight"] = d["embed.weight"]
        return d

    pre = moved(None, 0)
    clean = moved(pre, 0.01)
    return pre, clean, moved(clean, 0.1)


def lm_proto(weights: dict[str, np.ndarray], table: str = "head.weight") -> onnx.ModelProto:
    """ids → Gather(table) → Gemm(body) → Relu → Gemm(table)ᵀ, as torch's exporter writes
    a tied model: one initializer, here named ``table``, read by both ends."""
    nodes = [
        helper.make_node("Gather", [table, "ids"], ["e"], axis=0),
        helper.make_node("Gemm", ["e", "body.weight", "body.bias"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", table], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(weights["embed.weight"], table)]
    inits += [numpy_helper.from_array(weights[k], k) for k in ("body.weight", "body.bias")]
    graph = helper.make_graph(
        nodes,
        "lm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def test_a_tied_weight_patches_the_one_initializer_the_export_kept(tmp_path):
    # "has no initializer 'embed.weight' ... (was a BatchNorm folded ...?)"
    pre, clean, robust = tied_lm()
    sig = rp.extract(pre, clean, robust, layers="all")
    assert sig.meta["tied"] == {"head.weight": "embed.weight"}
    src = save(lm_proto(clean), tmp_path / "m.onnx")
    expected = copy_model(clean)
    expected["head.weight"] = expected["embed.weight"]  # still tied
    rp.apply(expected, sig, 0.8)
    rep = ro.apply(src, sig, 0.8, out=tmp_path / "p.onnx")
    assert rep.tensors == 3
    got = initializers(rep.out)
    assert got["head.weight"].tobytes() == expected["embed.weight"].tobytes()
    assert got["body.weight"].tobytes() == expected["body.weight"].tobytes()
    ids = np.array([1, 4, 9], np.int64)
    sess = ro.session(src, sig, 0.8)
    assert set(sess.patched_initializers) == {"head.weight", "body.weight", "body.bias"}
    feed = {"ids": ids}
    plain = ort.InferenceSession(str(rep.out), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, feed)[0], plain.run(None, feed)[0])
    ro.remove(rep.out, tmp_path / "back.onnx")
    assert sha(tmp_path / "back.onnx") == sha(src)
    assert check(src, [sig])["fits"] is True


def test_a_tensor_held_under_no_name_of_its_tie_is_refused_naming_the_tie(tmp_path):
    pre, clean, robust = tied_lm()
    sig = rp.extract(pre, clean, robust, layers="all")
    src = save(lm_proto(clean, table="lm.table"), tmp_path / "m.onnx")
    with pytest.raises(MismatchError, match="'embed.weight', nor 'head.weight' tied to it") as e:
        ro.apply(src, sig, 1.0, out=tmp_path / "p.onnx")
    assert "BatchNorm" not in str(e.value) and not (tmp_path / "p.onnx").exists()


# ---------------------------------------------------------------------------- node order


def _unsorted(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with its last node first, as onnxruntime's float16 converter appends
    its casts of the graph inputs last (onnxruntime runs either order)."""
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend([nodes[-1], *nodes[:-1]])
    return proto


def test_a_graph_whose_nodes_are_not_sorted_is_read_and_patched(setup, capsys):
    # "not a valid ONNX model: Nodes in a graph must be topologically sorted"
    clean, sig, tmp = setup
    src = save(_unsorted(model_proto(clean)), tmp / "m.onnx")
    ref = save(model_proto(clean), tmp / "ref" / "m.onnx")
    rep = ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    want = ro.apply(ref, sig, 1.0, out=tmp / "ref" / "p.onnx")
    x = np.random.default_rng(5).normal(size=(3, 3, 2, 2)).astype(np.float32)
    assert np.array_equal(run(rep.out, x), run(want.out, x))
    assert np.array_equal(run(ro.session(src, sig, 1.0), x), run(want.out, x))
    assert main(["onnx", "check", str(src)]) == 0


def test_a_graph_with_a_cycle_is_still_refused(setup):
    clean, sig, tmp = setup
    proto = model_proto(clean)
    proto.graph.node[0].input[0] = "y"  # conv1 reads the graph's last output
    src = tmp / "m.onnx"
    src.write_bytes(proto.SerializeToString())
    with pytest.raises(FormatError, match="not a valid ONNX model: .*topologically sorted"):
        ro.load(src)


# ---------------------------------------------------------------------------- onnx check


def test_check_ignores_an_undo_record_that_is_not_the_models(setup, capsys):
    # a damaged record: "not a safetensors file", exit 1; another file's record whose
    # signature is gone: "... give it with --signature", a flag check does not have
    from safetensors.numpy import save_file

    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx")
    (tmp / "m.onnx.rpundo").write_bytes(b"not a record")
    assert main(["onnx", "check", str(src)]) == 0
    out = capsys.readouterr().out
    assert "valid ONNX model" in out and "record beside it is ignored: " in out
    save_file({k: v for k, v in clean.items() if v.dtype.kind == "f"}, tmp / "m.safetensors")
    sig.save(tmp / "fog.rws")
    rp.apply_file(tmp / "m.safetensors", tmp / "fog.rws", out=tmp / "p.safetensors")
    (tmp / "fog.rws").unlink()
    (tmp / "m.onnx.rpundo").write_bytes((tmp / "p.safetensors.rpundo").read_bytes())
    assert main(["onnx", "check", str(src), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["applied"] == [] and "undo record of another file" in rep["record_note"]


def test_check_takes_the_dtype_flags_apply_takes(tmp_path, capsys):
    # an f32 signature "does not fit" an f16 model, pointing at a flag check refused
    pre, clean, robust = trio(0)
    sig = rp.extract(pre, clean, robust, layers="all")
    sig.save(tmp_path / "fog.rws")
    half = copy_model(clean)
    half["fc.weight"] = half["fc.weight"].astype(np.float16)
    src = save(model_proto(half), tmp_path / "m16.onnx")
    assert check(src, [sig])["fits"] is False
    assert check(src, [sig], allow_dtype_change=True)["fits"] is True
    args = ["onnx", "check", str(src), str(tmp_path / "fog.rws")]
    assert main([*args, "--json"]) == 1
    out, err = capsys.readouterr()
    problem = json.loads(out)["problem"]
    assert "--allow-dtype-change" in problem and "allow_dtype_change=True" not in problem
    assert "--allow-dtype-change" in err
    assert main([*args, "--allow-dtype-change"]) == 0
    assert "the signatures fit" in capsys.readouterr().out
    assert main([*args, "--force"]) == 0


# ---------------------------------------------------------------------------- sessions


def test_a_model_onnxruntime_refuses_is_a_format_error_naming_it(setup):
    # onnxruntime's own Fail ("[ShapeInferenceError] Dimension mismatch") came through
    clean, sig, tmp = setup
    arrays = copy_model(clean)
    arrays["fc.weight"] = np.zeros((10, 13), np.float32)  # the Gemm's input has 12 columns
    src = save(model_proto(arrays), tmp / "m.onnx")
    conv = sig.select([k for k in sig.entries if k.startswith("conv1")])
    ro.load(src)  # the checker passes it
    with pytest.raises(FormatError, match=r"m\.onnx: onnxruntime cannot load it: "):
        ro.session(src, conv, 1.0)


# ---------------------------------------------------------------------------- onnx export


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-abs-error", "nan"],
        ["--max-abs-error", "-1"],
        ["--max-abs-error", "abc"],
        ["--min-agreement", "2"],
        ["--min-agreement", "nan"],
        ["--int8", "static", "--dtype", "f16"],
    ],
)
def test_cli_export_refuses_bad_flag_values_as_usage_before_reading(tmp_path, capsys, flags):
    # exit 1 with the library's keywords, after the checkpoint was read (or its error)
    args = ["onnx", "export", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "e.onnx")]
    with pytest.raises(SystemExit) as e:
        main([*args, *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flags[0] in err and "missing.safetensors" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_export_takes_the_limits_of_each_tolerance(tmp_path, capsys):
    """0 and inf, and 0 to 1, are values: the checkpoint's error follows (exit 1)."""
    args = ["onnx", "export", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "e.onnx")]
    for flags in (["--max-abs-error", "0"], ["--max-abs-error", "inf"], ["--min-agreement", "0"]):
        assert main([*args, *flags, "--min-agreement", "1"]) == 1
        assert "missing.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"max_abs_error": float("nan")}, "max_abs_error"),
        ({"min_agreement": 2.0}, "min_agreement"),
        ({"dtype": "f16", "int8": "static"}, "dtype='f32'"),
    ],
)
def test_export_checkpoint_checks_its_options_before_reading(tmp_path, options, problem):
    from robustpatch.onnx.exporter import export_checkpoint

    with pytest.raises(InvalidArgumentError, match=problem):
        export_checkpoint(tmp_path / "missing.safetensors", tmp_path / "e.onnx", **options)
