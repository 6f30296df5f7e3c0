"""rp.onnx on hostile ONNX files: each malformed or crafted model is refused with a
FormatError naming the file, and nothing is written (no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
helper, numpy_helper = onnx.helper, onnx.numpy_helper  # the wheel's tests run without onnx

import robustpatch.onnx as ro  # noqa: E402
from robustpatch.cli import main  # noqa: E402
from robustpatch.errors import FormatError  # noqa: E402
from rp_testutil import sha  # noqa: E402
from test_onnx import make_setup, model_proto, save  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    return make_setup(tmp_path)


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


def h_symlink_inside(tmp, clean):
    """A symlink that stays in the folder (onnx.checker refuses any: robustpatch's own
    check stands in for it, as it reads no data file)."""
    _, src = _external_model(tmp, clean)
    (tmp / "src" / "m.onnx.data").rename(tmp / "src" / "real.bin")
    (tmp / "src" / "m.onnx.data").symlink_to("real.bin")
    return src


def h_hard_link(tmp, clean):
    """A data file with a second name (an archive's hard link may name any file)."""
    _, src = _external_model(tmp, clean)
    os.link(tmp / "src" / "m.onnx.data", tmp / "twin.bin")
    return src


def h_attribute_external(tmp, clean):
    """A Constant's tensor in the data file (convert_attribute=True): it is neither
    checked nor pointed at the output's data file, so it would be read from wherever its
    location resolves."""
    proto = model_proto(clean)
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    gemm.output[0] = "fc_pre"
    shift = numpy_helper.from_array(np.zeros(10, np.float32))
    last = proto.graph.node.pop()  # the Cast to y
    proto.graph.node.extend(
        [
            helper.make_node("Constant", [], ["shift"], value=shift),
            helper.make_node("Add", ["fc_pre", "shift"], ["fc_out"]),
            last,
        ]
    )
    src = tmp / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(
        proto,
        src,
        save_as_external_data=True,
        location="m.onnx.data",
        size_threshold=0,
        convert_attribute=True,
    )
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


def h_location_not_utf8(tmp, clean):
    """A location protobuf hands over as bytes (a TypeError in every ONNX command)."""
    _, src = _external_model(tmp, clean)
    src.write_bytes(src.read_bytes().replace(b"m.onnx.data", b"m.onnx\xffdata"))
    return src


def h_typed_and_raw(tmp, clean):
    """raw_data and float_data in one tensor: which one a runtime reads is a guess."""
    proto = model_proto(clean)
    proto.graph.initializer[0].float_data.append(1.0)
    return _new_source(tmp, proto.SerializeToString())


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
    h_symlink_inside,
    h_hard_link,
    h_attribute_external,
    h_past_end,
    h_length_mismatch,
    h_overlap,
    h_missing_data,
    h_location_not_utf8,
    h_typed_and_raw,
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


def test_cli_refuses_a_hostile_model_in_one_line(setup, capsys):
    clean, sig, tmp = setup
    src = h_dotdot(tmp, clean)
    sig.save(tmp / "fog.rws")
    code = main(["onnx", "apply", str(src), str(tmp / "fog.rws"), "-o", str(tmp / "p.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("robustpatch: error: ") and err.count("\n") == 1
    assert "outside the model's folder" in err and not (tmp / "p.onnx").exists()
    assert main(["onnx", "check", str(src)]) == 1


def test_a_location_not_utf8_is_named_in_one_line(setup, capsys):
    clean, sig, tmp = setup
    src = h_location_not_utf8(tmp, clean)
    with pytest.raises(FormatError, match=r"initializer '[^']+': external data location is not"):
        ro.load(src)
    assert main(["onnx", "check", str(src)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("robustpatch: error: ") and err.count("\n") == 1


def test_external_data_in_a_folder_named_in_bytes_not_utf8_is_checked_applied_and_removed(
    setup, capsys
):
    # the checker's fallback loaded the data with onnx's helper, which refused the path:
    # a TypeError in check, apply and session
    clean, sig, tmp = setup
    save(model_proto(clean), tmp / "d" / "m.onnx", external=True)  # onnx's own save
    folder = tmp / os.fsdecode(b"d\xff")  # takes UTF-8 paths only
    os.rename(tmp / "d", folder)
    src = folder / "m.onnx"
    assert main(["onnx", "check", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["external_data"] == "m.onnx.data"
    x = np.random.default_rng(4).normal(size=(2, 3, 2, 2)).astype(np.float32)
    rep = ro.apply(src, sig, 1.0, out=folder / "p.onnx")
    sess = ro.session(src, sig, 1.0)
    (tmp / "utf8").mkdir()  # onnxruntime opens UTF-8 paths only
    ref = ro.apply(src, sig, 1.0, out=tmp / "utf8" / "p.onnx").out
    ref = ort.InferenceSession(str(ref), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": x})[0], ref.run(None, {"x": x})[0])
    (folder / "back").mkdir()
    ro.remove(rep.out, folder / "back" / "m.onnx")
    assert sha(folder / "back" / "m.onnx") == sha(src)
    assert sha(folder / "back" / "m.onnx.data") == sha(folder / "m.onnx.data")
