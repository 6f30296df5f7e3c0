"""rp.onnx: patching ONNX initializers (embedded and external data), bit-exact removal,
load-time sessions, hostile models, and the ``robustpatch onnx`` commands (no torch)."""

from __future__ import annotations

import json
import os
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


@pytest.fixture
def setup(tmp_path):
    pre, clean, robust = trio(0)
    sig = rp.extract(pre, clean, robust, layers="all").quantize(bits=4)
    return clean, sig, tmp_path


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
        assert rep.data == tmp / "out" / "p.onnx.data"
        locations = {
            e.value
            for t in onnx.load(rep.out, load_external_data=False).graph.initializer
            for e in t.external_data
            if e.key == "location"
        }
        assert locations == {"p.onnx.data"}


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
    assert rep.data == tmp / "fog.onnx.data" and sha(tmp / "m.onnx.data") == before
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
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    assert (tmp / "p.onnx.data").stat().st_size == (tmp / "m.onnx.data").stat().st_size
    with open(tmp / "p.onnx.data", "ab") as f:
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
        ro.apply(src, sig, 1.0, out=tmp / "p.onnx")  # its data file would be the source's
    assert {p.name: sha(p) for p in tmp.iterdir()} == before


def test_without_undo_there_is_no_record_and_remove_says_so(setup):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx")
    rep = ro.apply(src, sig, 1.0, out=tmp / "p.onnx", undo=False)
    assert rep.undo is None and not (tmp / "p.onnx.rpundo").exists()
    with pytest.raises(FileNotFoundError, match="no undo record"):
        ro.remove(tmp / "p.onnx", tmp / "back.onnx")


# ---------------------------------------------------------------------------- hostile models


def _external_model(tmp: Path, clean: dict) -> tuple[onnx.ModelProto, Path]:
    """A model saved with external data in ``tmp/src``, reloaded without its data."""
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external=True)
    return onnx.load(src, load_external_data=False), src


def _set_external(proto: onnx.ModelProto, name: str, **entries: str) -> None:
    t = next(t for t in proto.graph.initializer if t.name == name)
    for e in t.external_data:
        if e.key in entries:
            e.value = entries.pop(e.key)
    for k, v in entries.items():
        t.external_data.add(key=k, value=v)


def _write(proto: onnx.ModelProto, src: Path) -> None:
    src.write_bytes(proto.SerializeToString())


def _new_source(tmp: Path, data: bytes) -> Path:
    """``tmp/src/m.onnx`` holding ``data``: the source file of a hostile case."""
    src = tmp / "src" / "m.onnx"
    src.parent.mkdir(parents=True)
    src.write_bytes(data)
    return src


def h_truncated(tmp, clean):
    src = save(model_proto(clean), tmp / "src" / "m.onnx")
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return src


def h_not_protobuf(tmp, clean):
    return _new_source(tmp, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def h_raw_size(tmp, clean):
    proto = model_proto(clean)
    proto.graph.initializer[0].raw_data = proto.graph.initializer[0].raw_data[:-4]
    return _new_source(tmp, proto.SerializeToString())


def h_negative_dim(tmp, clean):
    proto = model_proto(clean)
    proto.graph.initializer[0].dims[0] = -16
    return _new_source(tmp, proto.SerializeToString())


def h_name_not_utf8(tmp, clean):
    data = model_proto(clean).SerializeToString()
    return _new_source(tmp, data.replace(b"Relu", b"\xffelu", 1))


def h_duplicate_name(tmp, clean):
    proto = model_proto(clean)
    proto.graph.initializer.append(proto.graph.initializer[0])
    return _new_source(tmp, proto.SerializeToString())


def h_two_graphs(tmp, clean):
    """A second graph field: protobuf merges it, so its bytes would not be the ones used."""
    src = save(model_proto(clean), tmp / "src" / "m.onnx")
    g = model_proto(clean).graph.SerializeToString()
    tag, n, out = bytes([7 << 3 | 2]), len(g), bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    src.write_bytes(src.read_bytes() + tag + bytes(out) + g)
    return src


def h_dotdot(tmp, clean):
    proto, src = _external_model(tmp, clean)
    (tmp / "outside.bin").write_bytes((tmp / "src" / "m.onnx.data").read_bytes())
    _set_external(proto, "conv2.weight", location="../outside.bin")
    _write(proto, src)
    return src


def h_absolute(tmp, clean):
    proto, src = _external_model(tmp, clean)
    (tmp / "outside.bin").write_bytes((tmp / "src" / "m.onnx.data").read_bytes())
    for t in proto.graph.initializer:
        if t.external_data:
            _set_external(proto, t.name, location=str(tmp / "outside.bin"))
    _write(proto, src)
    return src


def h_symlink_out(tmp, clean):
    proto, src = _external_model(tmp, clean)
    (tmp / "outside.bin").write_bytes((tmp / "src" / "m.onnx.data").read_bytes())
    (tmp / "src" / "link.bin").symlink_to(tmp / "outside.bin")
    for t in proto.graph.initializer:
        if t.external_data:
            _set_external(proto, t.name, location="link.bin")
    _write(proto, src)
    return src


def h_past_end(tmp, clean):
    proto, src = _external_model(tmp, clean)
    _set_external(proto, "conv2.weight", offset=str(10**6))
    _write(proto, src)
    return src


def h_length_mismatch(tmp, clean):
    proto, src = _external_model(tmp, clean)
    _set_external(proto, "conv2.weight", length="64")
    _write(proto, src)
    return src


def h_overlap(tmp, clean):
    proto, src = _external_model(tmp, clean)
    ext = [t for t in proto.graph.initializer if t.external_data]
    first = {e.key: e.value for e in ext[0].external_data}
    _set_external(proto, ext[1].name, offset=first.get("offset", "0"))
    _write(proto, src)
    return src


def h_missing_data(tmp, clean):
    _, src = _external_model(tmp, clean)
    (tmp / "src" / "m.onnx.data").unlink()
    return src


HOSTILE = [
    h_truncated,
    h_not_protobuf,
    h_raw_size,
    h_negative_dim,
    h_name_not_utf8,
    h_duplicate_name,
    h_two_graphs,
    h_dotdot,
    h_absolute,
    h_symlink_out,
    h_past_end,
    h_length_mismatch,
    h_overlap,
    h_missing_data,
]


def _folder_state(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("make", HOSTILE, ids=lambda f: f.__name__[2:])
def test_hostile_model_is_refused_and_nothing_is_written(setup, make):
    clean, sig, tmp = setup
    src = make(tmp, clean)
    before = _folder_state(src.parent), _folder_state(tmp)
    (tmp / "out").mkdir()
    with pytest.raises(FormatError):
        ro.apply(src, sig, 1.0, out=tmp / "out" / "p.onnx")
    with pytest.raises(FormatError):
        ro.session(src, sig, 1.0)
    assert (_folder_state(src.parent), _folder_state(tmp)) == before
    assert list((tmp / "out").iterdir()) == []


def test_a_data_file_swapped_after_the_checks_is_refused(setup):
    """Between validation and use, the data file's path now names another file (e.g. a
    symlink pointing out of the folder): the file opened must be the one checked."""
    from robustpatch.onnx.model import load

    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external=True)
    m = load(src)
    data = tmp / "src" / "m.onnx.data"
    (tmp / "outside.bin").write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(tmp / "outside.bin")
    with pytest.raises(FormatError, match="changed meanwhile"):
        m.open_data()


def test_hostile_patched_model_is_refused_by_remove(setup):
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "src" / "m.onnx", external=True)
    ro.apply(src, sig, 1.0, out=tmp / "p.onnx")
    proto = onnx.load(tmp / "p.onnx", load_external_data=False)
    _set_external(proto, "conv2.weight", location="../src/m.onnx.data")
    _write(proto, tmp / "p.onnx")
    with pytest.raises(FormatError, match="outside the model's folder"):
        ro.remove(tmp / "p.onnx", tmp / "back.onnx")
    assert not (tmp / "back.onnx").exists()


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
    assert rep["tensors"] == 7 and rep["data"] == str(tmp / "p.onnx.data")
    assert main(["onnx", "check", str(tmp / "p.onnx"), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["applied"] == [{"name": sig.name, "hash": sig.content_hash, "alpha": 0.5}]
    assert check["external_data"] == "p.onnx.data"
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


def test_cli_refuses_a_hostile_model_in_one_line(setup, capsys):
    clean, sig, tmp = setup
    src = h_dotdot(tmp, clean)
    sig.save(tmp / "fog.rws")
    code = main(["onnx", "apply", str(src), str(tmp / "fog.rws"), "-o", str(tmp / "p.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("robustpatch: error: ") and err.count("\n") == 1
    assert "outside the model's folder" in err and not (tmp / "p.onnx").exists()
    assert main(["onnx", "check", str(src)]) == 1


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
    """``<out>.data`` is an output of a model with external data (apply and remove
    alike): an existing one is refused, not replaced; a model whose tensors are all
    embedded writes none, so the file is no output of it."""
    clean, sig, tmp = setup
    src = save(model_proto(clean), tmp / "m.onnx", external=external)
    sig.save(tmp / "fog.rws")
    assert main(["onnx", "apply", str(src), str(tmp / "fog.rws"), "-o", str(tmp / "p.onnx")]) == 0
    for out in ("q.onnx", "r.onnx"):
        (tmp / (out + ".data")).write_bytes(b"someone else's bytes")
    runs = (
        ["onnx", "apply", str(src), str(tmp / "fog.rws"), "-o", str(tmp / "q.onnx")],
        ["onnx", "remove", str(tmp / "p.onnx"), "-o", str(tmp / "r.onnx")],
    )
    for args in runs:
        capsys.readouterr()
        assert main(args) == (1 if external else 0)
        if external:
            assert "already exists" in capsys.readouterr().err
            assert not Path(args[-1]).exists()
        assert Path(args[-1] + ".data").read_bytes() == b"someone else's bytes"
        if external:
            assert main([*args, "--overwrite"]) == 0
            assert Path(args[-1] + ".data").read_bytes() != b"someone else's bytes"


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
