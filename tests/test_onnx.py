"""rp.onnx: patching ONNX initializers (embedded and external data), bit-exact removal,
load-time sessions, hostile models, and the ``robustpatch onnx`` commands (no torch)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import robustpatch as rp  # noqa: E402
import robustpatch.onnx as ro  # noqa: E402
from robustpatch.cli import main  # noqa: E402
from robustpatch.errors import FormatError, InvalidArgumentError, MismatchError  # noqa: E402
from rp_testutil import copy_model, listing, sha, trio  # noqa: E402

ONNX_DTYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def is_data_of(data: Path, out: Path) -> bool:
    """``data`` is a data file ``apply`` writes for ``out``: ``<out>.<8 hex>.data`` beside it."""
    pattern = re.escape(out.name) + r"\.[0-9a-f]{8}\.data"
    return data.parent == out.parent and re.fullmatch(pattern, data.name) is not None


def model_proto(arrays: dict, skip: tuple[str, ...] = ()) -> onnx.ModelProto:
    """conv1 → BatchNorm bn1 → ReLU → conv2 → flatten → fc over a (N, 3, 2, 2) input,
    with the state-dict names as initializer names (``skip``: initializers left out)."""
    fc_dtype = ONNX_DTYPE[arrays["fc.weight"].dtype]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], pads=[1] * 4),
        helper.make_node(
            "BatchNormalization",
            ["c1", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"],
            ["b1"],
        ),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight"], ["c2"], pads=[1] * 4),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Cast", ["f"], ["fc_in"], to=fc_dtype),
        helper.make_node("Cast", ["fc.bias"], ["fc.bias_c"], to=fc_dtype),
        helper.make_node("Gemm", ["fc_in", "fc.weight", "fc.bias_c"], ["fc_out"], transB=1),
        helper.make_node("Cast", ["fc_out"], ["y"], to=TensorProto.FLOAT),
    ]
    inits = [
        numpy_helper.from_array(v, k)
        for k, v in arrays.items()
        if k not in skip and v.dtype.kind == "f"
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def save(proto: onnx.ModelProto, path: Path, external: bool = False, location: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(
            proto,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location or path.name + ".data",
            size_threshold=256,  # small tensors stay embedded: both kinds are patched
        )
    else:
        onnx.save_model(proto, path)
    return path


def initializers(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(path)
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def run(path_or_session, x: np.ndarray) -> np.ndarray:
    sess = path_or_session
    if not hasattr(sess, "run"):
        sess = ort.InferenceSession(os.fspath(sess), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def make_setup(tmp_path: Path) -> tuple[dict, rp.Signature, Path]:
    """A toy model's clean state dict, a 4-bit signature of it, and a folder."""
    pre, clean, robust = trio(0)
    sig = rp.extract(pre, clean, robust, layers="all").quantize(bits=4)
    return clean, sig, tmp_path


@pytest.fixture
def setup(tmp_path):
    return make_setup(tmp_path)


@pytest.mark.parametrize("external", [False, True])
def test_apply_equals_the_engine_on_the_state_dict_bit_for_bit(setup, external):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external)
    expected = copy_model(clean)
    rp.apply(expected, sig, 0.7)
    (tmp / "out").mkdir()
    rep = ro.apply(src, sig, 0.7, out=tmp / "out" / "p.onnx")
    got = initializers(rep.out)
    for name, want in expected.items():
        if want.dtype.kind == "f":
            assert got[name].tobytes() == want.tobytes(), name
    assert rep.tensors == 7 and rep.bn_buffers == 2
    assert (rep.data is not None) == external
    if external:  # the patched model reads its own data file, never the source's
        assert is_data_of(rep.data, tmp / "out" / "p.onnx")
        locations = {
            e.value
            for t in onnx.load(rep.out, load_external_data=False).graph.initializer
            for e in t.external_data
            if e.key == "location"
        }
        assert locations == {rep.data.name}


@pytest.mark.parametrize("external", [False, True])
def test_remove_restores_the_source_files_sha256(setup, external):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external)
    ro.apply(src, sig, [1.3], out=tmp / "p.onnx")
    assert sha(tmp / "p.onnx") != sha(src)
    (tmp / "back").mkdir()
    rep = ro.remove(tmp / "p.onnx", tmp / "back" / "m.onnx")
    assert rep.tensors == 7 and rep.bn_buffers == 2
    assert sha(tmp / "back" / "m.onnx") == sha(src)
    if external:
        assert sha(tmp / "back" / "m.onnx.data") == sha(tmp / "src" / "m.onnx.data")


def test_apply_beside_the_source_writes_a_new_data_file(setup):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx", external=True)
    before = sha(tmp / "m.onnx.data")
    rep = ro.apply(src, sig, 1.0, out=tmp / "fog.onnx")
    assert is_data_of(rep.data, tmp / "fog.onnx") and sha(tmp / "m.onnx.data") == before
    x = np.random.default_rng(1).normal(size=(3, 3, 2, 2)).astype(np.float32)
    assert not np.array_equal(run(rep.out, x), run(src, x))


def test_patched_model_runs_as_the_patched_state_dict(setup):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx")
    expected = copy_model(clean)
    rp.apply(expected, sig, 1.0)
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    save(model_proto(expected), tmp / "ref.onnx")
    x = np.random.default_rng(2).normal(size=(4, 3, 2, 2)).astype(np.float32)
    assert np.array_equal(run(tmp / "p.onnx", x), run(tmp / "ref.onnx", x))


@pytest.mark.parametrize("external", [False, True])
def test_session_equals_the_patched_file_and_switches_without_writing(setup, external):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external)
    files = {p: sha(p) for p in (tmp / "src").iterdir()}
    x = np.random.default_rng(3).normal(size=(4, 3, 2, 2)).astype(np.float32)
    for alpha in (1.0, -0.5):
        ro.apply(src, sig, alpha, out=tmp / f"p{alpha}.onnx")
        sess = ro.session(src, sig, alpha)
        assert np.array_equal(run(sess, x), run(tmp / f"p{alpha}.onnx", x))
        assert set(sess.patched_initializers) == set(sig.entries)
    assert not np.array_equal(run(ro.session(src, sig, 1.0), x), run(src, x))
    assert {p: sha(p) for p in (tmp / "src").iterdir()} == files


def test_f16_model_is_patched_like_the_f16_state_dict(tmp_path):
    pre, clean, robust = trio(0, fc_dtype=np.float16)
    sig = rp.extract(pre, clean, robust, layers="all")
    src = save(model_proto(clean), tmp_path / "m.onnx")
    expected = copy_model(clean)
    rp.apply(expected, sig, 1.0)
    rep = ro.apply(src, sig, 1.0, out=tmp_path / "p.onnx")
    got = initializers(rep.out)["fc.weight"]
    assert got.dtype == np.float16 and got.tobytes() == expected["fc.weight"].tobytes()
    ro.remove(rep.out, tmp_path / "back.onnx")
    assert sha(tmp_path / "back.onnx") == sha(src)


def test_folded_batchnorm_is_refused_naming_the_tensor_and_the_export(setup):
    clean, sig, tmp = setup
    bn = ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var")
    proto = model_proto(clean)
    proto.graph.node.remove(proto.graph.node[1])  # BatchNormalization gone, as if folded
    proto.graph.node[1].input[0] = "c1"
    kept = [t for t in proto.graph.initializer if t.name not in bn]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    src = save(proto, tmp / "folded.onnx")
    with pytest.raises(MismatchError, match=r"no initializer 'bn1\.[a-z_]+'.*optimize=False"):
        ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    with pytest.raises(MismatchError, match="optimize=False"):
        ro.session(src, sig, 1.0)
    assert not (tmp / "p.onnx").exists()


def test_shape_mismatch_is_refused(setup):
    clean, sig, tmp = setup
    other = copy_model(clean)
    other["conv1.weight"] = np.zeros((16, 3, 3, 3), np.float32).reshape(16, 27, 1, 1)
    proto = model_proto(clean)
    proto.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(other["conv1.weight"], "conv1.weight")
    )
    src = tmp / "m.onnx"
    src.write_bytes(proto.SerializeToString())
    with pytest.raises(MismatchError, match="conv1.weight"):
        ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx", force=True)  # same element count


def test_an_initializer_of_sub_byte_dtype_is_named_as_such(setup):
    """An INT4 initializer exists but has no fixed bytes per element: refused as such,
    not as missing (which pointed at BatchNorm folding)."""
    clean, sig, tmp = setup
    proto = model_proto(clean)
    init = proto.graph.initializer[0]
    numel = int(np.prod(init.dims))
    init.data_type = TensorProto.INT4
    init.raw_data = bytes((numel + 1) // 2)
    src = tmp / "m.onnx"
    src.write_bytes(proto.SerializeToString())
    with pytest.raises(MismatchError, match=f"{init.name}.*INT4 or STRING"):
        ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    assert not (tmp / "p.onnx").exists()


def test_initializer_in_typed_fields_is_refused(setup):
    clean, sig, tmp = setup
    proto = model_proto(clean)
    w = clean["conv1.weight"]
    typed = helper.make_tensor("conv1.weight", TensorProto.FLOAT, w.shape, w.ravel().tolist())
    proto.graph.initializer[0].CopyFrom(typed)
    src = tmp / "m.onnx"
    src.write_bytes(proto.SerializeToString())
    with pytest.raises(MismatchError, match="typed fields"):
        ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    assert not (tmp / "p.onnx").exists()


def test_remove_to_another_name_renames_the_data_file_only(setup):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external=True)
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    rep = ro.remove(tmp / "p.onnx", tmp / "r.onnx")
    assert rep.data == tmp / "r.onnx.data"
    assert sha(rep.data) == sha(tmp / "src" / "m.onnx.data")
    assert initializers(rep.out).keys() == initializers(src).keys()
    for name, want in initializers(src).items():
        assert initializers(rep.out)[name].tobytes() == want.tobytes()


def test_remove_refuses_a_changed_model_and_writes_nothing(setup):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx")
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    data = bytearray((tmp / "p.onnx").read_bytes())
    data[-40] ^= 1
    (tmp / "p.onnx").write_bytes(bytes(data))
    with pytest.raises((MismatchError, FormatError)):
        ro.remove(tmp / "p.onnx", tmp / "back.onnx")
    assert not (tmp / "back.onnx").exists()


def test_remove_refuses_an_external_data_file_that_grew_since_the_patch(setup):
    # bytes appended to the patched data file were copied into the "restored" one
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx", external=True)
    rep = ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    assert rep.data.stat().st_size == (tmp / "m.onnx.data").stat().st_size
    with open(rep.data, "ab") as f:
        f.write(b"xyz")
    before = listing(tmp)
    with pytest.raises(MismatchError, match="external data file has .* it changed since"):
        ro.remove(tmp / "p.onnx", tmp / "back.onnx")
    assert listing(tmp) == before


def test_an_output_that_is_a_folder_is_refused_before_any_file_is_written(setup):
    # the record and data file were renamed into place before the model's rename failed
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx", external=True)
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    (tmp / "folder").mkdir()
    before = listing(tmp)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        ro.apply(src, sig, 1.0, out=tmp / "folder")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        ro.remove(tmp / "p.onnx", tmp / "folder")
    assert listing(tmp) == before


def test_outputs_never_replace_inputs(setup):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx", external=True, location="p.onnx.data")
    before = {p.name: sha(p) for p in tmp.iterdir()}
    with pytest.raises(InvalidArgumentError, match="is the input"):
        ro.apply(src, sig, 1.0, out=src)
    with pytest.raises(InvalidArgumentError, match=r"p\.onnx\.data is the input"):
        ro.remove(src, tmp / "p.onnx")  # its data file would be the patched model's
    assert {p.name: sha(p) for p in tmp.iterdir()} == before


def test_without_undo_there_is_no_record_and_remove_says_so(setup):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx")
    rep = ro.apply(src, sig, 1.0, out=tmp / "p.onnx", undo=False)
    assert rep.undo is None and not (tmp / "p.onnx.rpundo").exists()
    with pytest.raises(FileNotFoundError, match="no undo record"):
        ro.remove(tmp / "p.onnx", tmp / "back.onnx")


# ---------------------------------------------------------------------------- no torch


def test_apply_remove_session_never_import_torch(setup):
    clean, sig, tmp = setup
    save(model_proto(clean), tmp / "m.onnx", external=True)
    sig.save(tmp / "fog.rws")
    code = f"""
import sys, numpy as np
import robustpatch as rp
ro = rp.onnx  # imported on first use
import robustpatch.onnx.exporter, robustpatch.cli  # torch only when export is called
d = {str(tmp)!r}
ro.apply(d + "/m.onnx", d + "/fog.rws", 1.0, out=d + "/p.onnx")
ro.remove(d + "/p.onnx", d + "/back.onnx")
s = ro.session(d + "/m.onnx", d + "/fog.rws", 1.0)
s.run(None, {{"x": np.zeros((1, 3, 2, 2), np.float32)}})
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------------------- CLI


def test_cli_apply_check_remove_json(setup, capsys):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx", external=True)
    sig.save(tmp / "fog.rws")
    args = [str(src), str(tmp / "fog.rws"), "-o", str(tmp / "p.onnx"), "--alpha", "0.5"]
    assert main(["onnx", "apply", *args, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tensors"] == 7 and is_data_of(Path(rep["data"]), tmp / "p.onnx")
    assert main(["onnx", "check", str(tmp / "p.onnx"), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["applied"] == [{"name": sig.name, "hash": sig.content_hash, "alpha": 0.5}]
    assert check["external_data"] == Path(rep["data"]).name
    assert main(["onnx", "check", str(tmp / "p.onnx")]) == 0  # the digest, not "tensors-blak"
    digest = sig.content_hash.rpartition(":")[2][:12]
    assert f"(alpha 0.5, {digest})" in capsys.readouterr().out
    assert main(["onnx", "check", str(src), str(tmp / "fog.rws"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True
    (tmp / "back").mkdir()
    assert main(["onnx", "remove", str(tmp / "p.onnx"), "-o", str(tmp / "back" / "m.onnx")]) == 0
    assert sha(tmp / "back" / "m.onnx.data") == sha(tmp / "m.onnx.data")


def test_cli_refuses_an_existing_output_without_overwrite(setup, capsys):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx")
    sig.save(tmp / "fog.rws")
    args = ["onnx", "apply", str(src), str(tmp / "fog.rws"), "-o", str(tmp / "p.onnx")]
    assert main(args) == 0
    before = sha(tmp / "p.onnx")
    assert main([*args, "--alpha", "2"]) == 1
    assert "already exists" in capsys.readouterr().err and sha(tmp / "p.onnx") == before
    assert main([*args, "--alpha", "2", "--overwrite"]) == 0
    assert sha(tmp / "p.onnx") != before


def test_cli_check_says_when_a_signature_does_not_fit(setup, capsys):
    clean, sig, tmp = setup
    proto = model_proto(clean, skip=("bn1.running_mean",))
    proto.graph.node[1].input[3] = "rm"
    proto.graph.initializer.append(numpy_helper.from_array(clean["bn1.running_mean"], "rm"))
    src = tmp / "m.onnx"
    src.write_bytes(proto.SerializeToString())
    sig.save(tmp / "fog.rws")
    assert main(["onnx", "check", str(src), str(tmp / "fog.rws"), "--json"]) == 1
    assert "bn1.running_mean" in capsys.readouterr().err
    assert main(["onnx", "check", str(src), str(tmp / "fog.rws")]) == 1
    out, err = capsys.readouterr()  # the misfit said once, as the error (it was said twice)
    assert "bn1.running_mean" in err and "bn1.running_mean" not in out


@pytest.mark.parametrize("sub", ["apply", "remove", "export", "check"])
def test_cli_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main(["onnx", sub, "--help"])
    assert e.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_cli_refuses_an_existing_undo_record_without_overwrite(setup, capsys):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx")
    sig.save(tmp / "fog.rws")
    (tmp / "p.onnx.rpundo").write_bytes(b"the record of another patch")
    args = ["onnx", "apply", str(src), str(tmp / "fog.rws"), "-o", str(tmp / "p.onnx")]
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err and not (tmp / "p.onnx").exists()
    assert (tmp / "p.onnx.rpundo").read_bytes() == b"the record of another patch"
    assert main([*args, "--no-undo"]) == 0


@pytest.mark.parametrize("external", [False, True])
def test_cli_refuses_an_existing_data_file_without_overwrite(setup, capsys, external):
    """``<out>.data`` is what remove writes beside a model with external data: an
    existing one is refused, not replaced. A model whose tensors are all embedded writes
    none, and apply writes a name of its own: the file is no output of those, and stays."""
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx", external=external)
    sig.save(tmp / "fog.rws")
    assert main(["onnx", "apply", str(src), str(tmp / "fog.rws"), "-o", str(tmp / "p.onnx")]) == 0
    for out in ("q.onnx", "r.onnx"):
        (tmp / (out + ".data")).write_bytes(b"someone else's bytes")
    apply = ["onnx", "apply", str(src), str(tmp / "fog.rws"), "-o", str(tmp / "q.onnx")]
    assert main(apply) == 0
    assert (tmp / "q.onnx.data").read_bytes() == b"someone else's bytes"
    remove = ["onnx", "remove", str(tmp / "p.onnx"), "-o", str(tmp / "r.onnx")]
    capsys.readouterr()
    assert main(remove) == (1 if external else 0)
    if external:
        assert "already exists" in capsys.readouterr().err
        assert not (tmp / "r.onnx").exists()
    assert (tmp / "r.onnx.data").read_bytes() == b"someone else's bytes"
    if external:
        assert main([*remove, "--overwrite"]) == 0
        assert sha(tmp / "r.onnx.data") == sha(tmp / "m.onnx.data")


def test_a_model_named_in_bytes_that_are_not_utf8_is_checked_applied_and_removed(setup, capsys):
    # onnx's checker takes UTF-8 paths only: a traceback; an output whose external data
    # file ONNX cannot name was written, then could not be read
    clean, sig, tmp = setup
    bad = os.fsdecode(b"m\xff.onnx")
    src = save(model_proto(clean), tmp / "m.onnx", external=True)
    os.rename(src, tmp / bad)
    sig.save(tmp / "fog.rws")
    assert main(["onnx", "check", str(tmp / bad), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["external_data"] == "m.onnx.data"
    args = [str(tmp / bad), str(tmp / "fog.rws"), "-o", str(tmp / "p.onnx")]
    assert main(["onnx", "apply", *args, "-q"]) == 0
    bad_out = os.fsdecode(b"r\xff.onnx")
    assert main(["onnx", "remove", str(tmp / "p.onnx"), "-o", str(tmp / bad_out)]) == 1
    err = capsys.readouterr().err
    assert "ONNX cannot store" in err and err.count("\n") == 1
    assert not (tmp / bad_out).exists()


def test_inspect_of_an_onnx_model_points_at_onnx_check(setup, capsys):
    # read as safetensors: "header length 725934997956595208 exceeds the limit"
    from robustpatch.cli import main

    clean, _, tmp = setup
    model = save(model_proto(clean), tmp / "m.onnx")
    assert main(["inspect", str(model)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"robustpatch: error: {model}: an ONNX model: robustpatch onnx check describes it"
