"""Undo records (.rpundo) and the safetensors header codec.

A crafted record is refused with one line naming the file and the problem, by
``remove_file`` and by ``robustpatch remove``, and nothing is written; files written by
the previous release (tests/fixtures/prev_release) still load, apply to the same bytes
and remove exactly; the engine's header encoder round-trips through its parser, writes
what ``json.dumps`` wrote before, and the safetensors package reads what we write.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import robustpatch as rp
from robustpatch import _core
from robustpatch._format.safetensors import (
    TensorInfo,
    encode_header,
    parse_header,
    read_tensors,
    write_tensors,
)
from robustpatch._format.undo import (
    UNDO_KEY,
    TensorEntry,
    UndoRecord,
    record_digest,
    undo_path_for,
)
from robustpatch.cli import main
from robustpatch.errors import FormatError, MismatchError
from robustpatch.extraction import extract
from rp_testutil import listing, sha, trio

PREV = Path(__file__).parent / "fixtures" / "prev_release"


@pytest.fixture(scope="module")
def patched_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A model patched with a 4-bit signature (3 delta entries incl. F16, 2 BN buffers)."""
    d = tmp_path_factory.mktemp("pair")
    pre, clean, robust = trio(0, fc_dtype=np.float16)
    write_tensors(d / "model.safetensors", clean)
    sig = extract(pre, clean, robust, layers="all", name="fog").quantize(4)
    rp.apply_file(d / "model.safetensors", [sig], 0.5, d / "p.safetensors")
    return d / "p.safetensors", undo_path_for(d / "p.safetensors")


def _crafted(pair: tuple[Path, Path], folder: Path, edit=None, raw=None, tensors_fn=None):
    """A copy of the patched pair in ``folder`` whose record's metadata is edited, then
    resealed (its record digest recomputed), so the checks past the digest are reached."""
    folder.mkdir()
    patched, undo = folder / "p.safetensors", folder / "p.safetensors.rpundo"
    shutil.copyfile(pair[0], patched)
    header, tensors = read_tensors(pair[1])
    meta = json.loads(header.metadata[UNDO_KEY])
    if edit is not None:
        edit(meta)
    if tensors_fn is not None:
        tensors_fn(tensors)
    if isinstance(meta, dict) and "record_digest" in meta:
        meta["record_digest"] = record_digest(meta, tensors)
    labels = {k: "U16" for k, a in tensors.items() if a.dtype == np.uint16}
    text = raw(meta) if raw is not None else json.dumps(meta)
    write_tensors(undo, tensors, {UNDO_KEY: text}, labels)
    return patched, undo


def _set(key, value):
    return lambda m: m.update({key: value})


def _delete(key):
    return lambda m: m.pop(key)


def _first_tensor(edit):
    return lambda m: edit(m["tensors"][0])


def _rename_first(meta: dict) -> None:
    meta["tensors"][0]["name"] = "ghost.weight"


def _rename_first_records(tensors: dict) -> None:
    """Rename the first delta tensor's records to match ``_rename_first``."""
    first = next(k for k in tensors if k.startswith("records/")).split("/")[1]
    for part in ("positions", "values"):
        tensors[f"records/ghost.weight/{part}"] = tensors.pop(f"records/{first}/{part}")


F, M = FormatError, MismatchError


def case(id_: str, exc, match: str, edit=None, raw=None, tensors_fn=None):
    """A crafted record: ``edit`` (or ``raw``) changes its JSON, ``tensors_fn`` its tensors."""
    return pytest.param(edit, raw, tensors_fn, exc, match, id=id_)


def _infinite_alpha(meta: dict) -> str:
    return json.dumps(meta).replace('"alphas": [0.5]', '"alphas": [Infinity]')


def _no_entries(meta: dict) -> None:
    meta["signatures"][0].pop("entries")


CRAFTED = [
    # wrong types
    case("alphas_not_a_list", F, "alphas must be a list of numbers", _set("alphas", "1.0")),
    case("alpha_a_bool", F, "alphas must be a list of numbers", _set("alphas", [True])),
    case("size_a_string", F, "source_size must be a byte count", _set("source_size", "2296")),
    case("signatures_not_objects", F, "must be a list of objects", _set("signatures", [1])),
    case("not_an_object", F, "undo metadata is not a JSON object", raw=lambda m: "[1, 2]"),
    # missing keys
    case("missing_alphas", F, "missing key 'alphas'", _delete("alphas")),
    case("missing_patched_size", F, "missing key 'patched_size'", _delete("patched_size")),
    case(
        "missing_checksum",
        F,
        "missing key 'checksum' of tensor",
        _first_tensor(lambda e: e.pop("checksum")),
    ),
    case("signature_without_entries", F, r"\(signature 0\): not a signature", _no_entries),
    # alphas: wrong length, not finite
    case("alphas_too_many", F, "2 alphas for 1 signatures", _set("alphas", [0.5, 0.5])),
    case("alphas_none", F, "0 alphas for 1 signatures", _set("alphas", [])),
    case("alpha_nan", F, "alpha nan is not finite", _set("alphas", [math.nan])),
    case("alpha_inf", F, "alpha inf is not finite", raw=_infinite_alpha),
    case("alpha_past_f32", F, "outside the float32 range", _set("alphas", [1e39])),
    # names, kinds and dtypes
    case(
        "unknown_tensor_name",
        F,
        "tensor 'ghost.weight' is touched by no signature",
        _rename_first,
        tensors_fn=_rename_first_records,
    ),
    case("name_without_records", F, "'records/ghost.weight/positions' is missing", _rename_first),
    case(
        "unknown_kind",
        F,
        "kind of tensor .* is 'lora'",
        _first_tensor(lambda e: e.update(kind="lora")),
    ),
    case(
        "unknown_dtype",
        F,
        "dtype of tensor .* is 'Q4'",
        _first_tensor(lambda e: e.update(dtype="Q4")),
    ),
    case(
        "dtype_a_list",
        F,
        r"dtype of tensor .* is \[\]",
        _first_tensor(lambda e: e.update(dtype=[])),
    ),
    case("version_zero", F, "invalid format_version 0", _set("format_version", 0)),
    # checksums and sizes
    case(
        "malformed_checksum",
        F,
        "checksum of tensor .* is malformed: 'md5:00'",
        _first_tensor(lambda e: e.update(checksum="md5:00")),
    ),
    case(
        "malformed_header_hash",
        F,
        "patched_header_sha256 is malformed",
        _set("patched_header_sha256", "xyz"),
    ),
    case(
        "tampered_checksum",
        M,
        "tensor changed since it was patched",
        _first_tensor(lambda e: e.update(checksum="crc32:00000000")),
    ),
    case(
        "source_size_negative",
        F,
        r"source_size must be a byte count .* got -1$",
        _set("source_size", -1),
    ),
    case("source_size_2_70", F, f"source_size must be .* got {2**70}$", _set("source_size", 2**70)),
    case("source_size_wrong", F, "the source header: .*past the end", _set("source_size", 12)),
]


@pytest.mark.parametrize(("edit", "raw", "tensors_fn", "exc", "match"), CRAFTED)
def test_a_crafted_undo_record_is_refused_in_one_line(
    patched_pair, tmp_path, capsys, edit, raw, tensors_fn, exc, match
):
    patched, undo = _crafted(patched_pair, tmp_path / "in", edit, raw, tensors_fn)
    out = tmp_path / "out"
    out.mkdir()
    before = (sha(patched), sha(undo))

    with pytest.raises(exc) as info:
        rp.remove_file(patched, out / "r.safetensors")
    message = str(info.value)
    assert re.search(match, message), message
    assert "\n" not in message
    if exc is FormatError:
        assert message.startswith(str(undo)), message  # names the record

    code = main(["remove", str(patched), "-o", str(out / "r.safetensors")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("robustpatch: error: ") and re.search(match, lines[0]), err
    assert listing(out) == {}
    assert (sha(patched), sha(undo)) == before


def test_the_crafted_set_covers_the_required_kinds():
    ids = {c.id for c in CRAFTED}
    required = {"size_a_string", "missing_alphas", "alphas_too_many", "alpha_nan"}
    required |= {"unknown_tensor_name", "tampered_checksum"}
    required |= {"source_size_negative", "source_size_2_70"}
    assert required <= ids


def test_a_long_bad_value_is_shortened_in_the_message(patched_pair, tmp_path):
    patched, _ = _crafted(patched_pair, tmp_path / "in", _set("alphas", "x" * 5000))
    with pytest.raises(FormatError) as info:
        rp.remove_file(patched, tmp_path / "r.safetensors")
    assert len(str(info.value)) < 200 + len(str(tmp_path)) + 100, str(info.value)
    assert str(info.value).endswith("xxx...")  # the value's repr, cut


def test_out_of_range_positions_are_a_format_error(patched_pair, tmp_path):
    def bad_positions(tensors: dict) -> None:
        key = next(k for k in tensors if k.endswith("/positions") and tensors[k].size)
        tensors[key] = tensors[key].copy()
        tensors[key][0] = 10**9

    patched, undo = _crafted(patched_pair, tmp_path / "in", tensors_fn=bad_positions)
    with pytest.raises(FormatError, match=r"position 1000000000 is outside a tensor of"):
        rp.remove_file(patched, tmp_path / "r.safetensors")


def test_an_undo_record_round_trips_through_its_parser():
    record = UndoRecord(
        source_size=100,
        patched_size=164,
        patched_header_sha256="ab" * 32,
        alphas=[0.5, -1.0],
        signatures=[{"name": "a"}, {"name": "b"}],
        tensors=[
            TensorEntry("w", "delta", "F16", "crc32:0badf00d", "sha256:" + "1" * 64),
            TensorEntry("bn.running_var", "bn", "F32", "crc32:00000001", "sha256:" + "2" * 64),
        ],
        source_header_digest="sha256:" + "3" * 64,
        record_digest="sha256:" + "4" * 64,
    )
    assert UndoRecord.parse(record.to_json(), "r.rpundo") == record


def test_xxh3_tensor_digests_make_a_version_4_record_and_need_it():
    xxh3 = "xxh3-128:" + "5" * 32
    record = UndoRecord(
        source_size=100,
        patched_size=164,
        patched_header_sha256="ab" * 32,
        alphas=[1.0],
        signatures=[{"name": "a"}],
        tensors=[TensorEntry("w", "delta", "BF16", "crc32:0badf00d", xxh3)],
        source_header_digest="blake3:" + "3" * 64,
        record_digest="blake3:" + "4" * 64,
    )
    raw = record.to_json()
    assert json.loads(raw)["format_version"] == 4
    assert UndoRecord.parse(raw, "r.rpundo") == record
    for older in (2, 3):  # an older reader would not know the digest: never written so
        meta = json.loads(raw)
        meta["format_version"] = older
        with pytest.raises(FormatError, match="digest of tensor 'w' is malformed"):
            UndoRecord.parse(json.dumps(meta), "r.rpundo")


def test_a_record_with_blake3_tensor_digests_still_removes_exactly(tmp_path):
    """Records written before version 4 hold a BLAKE3 digest of each original tensor."""
    from robustpatch._format import undo

    model, patched = PREV / "model.safetensors", tmp_path / "p.safetensors"
    real = undo.digest
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("robustpatch.records.digest", lambda data, _algorithm: real(data, "blake3"))
        rp.apply_file(model, [PREV / "sig4.rws"], [0.75], patched)
    meta = json.loads(read_tensors(str(patched) + ".rpundo")[0].metadata[UNDO_KEY])
    assert meta["format_version"] < 4
    assert all(e["digest"].startswith("blake3:") for e in meta["tensors"])
    rp.remove_file(patched, tmp_path / "r.safetensors")
    assert sha(tmp_path / "r.safetensors") == sha(model)


def test_a_version_2_record_without_its_digests_is_refused():
    meta = {
        "format_version": 2,
        "kind": "undo",
        "source_size": 100,
        "patched_size": 164,
        "patched_header_sha256": "ab" * 32,
        "alphas": [1.0],
        "signatures": [{"name": "a"}],
        "tensors": [],
        "source_header_digest": "sha256:" + "3" * 64,
    }
    with pytest.raises(FormatError, match="r.rpundo: bad undo record: missing key 'record_digest'"):
        UndoRecord.parse(json.dumps(meta), "r.rpundo")
    meta["record_digest"] = "sha256:short"
    with pytest.raises(FormatError, match="record_digest is malformed: 'sha256:short'"):
        UndoRecord.parse(json.dumps(meta), "r.rpundo")


def test_a_record_damaged_on_disk_fails_its_own_digest(patched_pair, tmp_path):
    """One byte of a signature tensor stored in the record, changed in place."""
    shutil.copyfile(patched_pair[0], tmp_path / "p.safetensors")
    data = bytearray(patched_pair[1].read_bytes())
    data[-1] ^= 0x01  # the last signature tensor's last byte
    (tmp_path / "p.safetensors.rpundo").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="record digest does not match its contents"):
        rp.remove_file(tmp_path / "p.safetensors", tmp_path / "r.safetensors")
    assert not (tmp_path / "r.safetensors").exists()


# ---------------------------------------------------------------------------- previous release


def _prev_sums() -> dict[str, str]:
    lines = (PREV / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split() for line in lines)}


def test_previous_release_fixtures_are_as_written():
    assert {n: sha(PREV / n) for n in _prev_sums()} == _prev_sums()


def test_previous_release_signature_loads_with_the_same_content_hash():
    sig = rp.Signature.load(PREV / "sig4.rws")
    header = read_tensors(PREV / "sig4.rws")[0]
    stored = json.loads(header.metadata["robustpatch"])["content_hash"]
    assert sig.content_hash == stored
    assert sig.content_hash == (
        "sha256:3394ad25ba641ec45860606d038d672a9067aeb3f95fdf6353af542a5678359d"
    )
    kinds = sorted((e.kind, e.quant is not None) for e in sig)
    assert kinds == [
        ("bn", False),
        ("bn", False),
        ("delta", True),
        ("delta", True),
        ("delta", True),
    ]


def test_previous_release_patch_is_reproduced_byte_for_byte(tmp_path):
    rp.apply_file(PREV / "model.safetensors", [PREV / "sig4.rws"], [0.75], tmp_path / "p")
    assert sha(tmp_path / "p") == _prev_sums()["patched.safetensors"]


def test_previous_release_undo_record_removes_exactly(tmp_path):
    """A version 1 record has no digests: accepted, its CRCs verified."""
    meta = json.loads(read_tensors(PREV / "patched.safetensors.rpundo")[0].metadata[UNDO_KEY])
    assert meta["format_version"] == 1 and "record_digest" not in meta
    report = rp.remove_file(PREV / "patched.safetensors", tmp_path / "restored")
    assert sha(tmp_path / "restored") == _prev_sums()["model.safetensors"]
    assert (report.tensors, report.bn_buffers) == (3, 2)


# ---------------------------------------------------------------------------- header codec


def _python_encoder(tensors: list[TensorInfo], metadata: dict[str, str]) -> bytes:
    """The encoder of the previous release (json.dumps), for comparison."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    for t in tensors:
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    text = json.dumps(obj, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


CODEC_CASES = [
    ([TensorInfo("a", "F32", (2, 3), 0, 24)], {}),
    ([], {"k": "v"}),
    ([], {}),
    (
        [
            TensorInfo("é/ü\u2603\U0001f600", "BF16", (1,), 0, 2),
            TensorInfo('q"\\\n\t', "U8", (0,), 2, 2),
        ],
        {"ключ": 'va"l\\ue\x01\x7f', "x": ""},
    ),
]


@pytest.mark.parametrize(("tensors", "meta"), CODEC_CASES)
def test_the_engine_encoder_writes_what_json_dumps_wrote(tensors, meta):
    assert encode_header(tensors, meta) == _python_encoder(tensors, meta)


@pytest.mark.parametrize(("tensors", "meta"), CODEC_CASES)
def test_encode_then_parse_round_trips(tensors, meta):
    head = encode_header(tensors, meta)
    data = max((t.end for t in tensors), default=0)
    h = parse_header(head + bytes(data), len(head) + data)
    assert h.metadata == meta
    assert h.tensors == sorted(tensors, key=lambda t: (t.begin, t.end))
    assert h.data_start == len(head) and len(head) % 8 == 0


def test_the_safetensors_package_reads_what_we_write(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "h": np.linspace(-1, 1, 5).astype(np.float16),
        "ñame": np.array([7, 8], np.int64),
        "empty": np.zeros((0, 3), np.float32),
    }
    write_tensors(tmp_path / "m.safetensors", arrays, {"note": "ünïcode"})
    got = st.load_file(tmp_path / "m.safetensors")
    assert set(got) == set(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and np.array_equal(got[k], a), k
    from safetensors import safe_open

    with safe_open(tmp_path / "m.safetensors", "np") as f:
        assert f.metadata() == {"note": "ünïcode"}


def test_the_binding_encodes_in_the_order_given():
    head = _core.encode_header([("m", "1")], [("b", "F32", [1], 0, 4), ("a", "F32", [1], 4, 8)])
    assert head[8:].rstrip().decode() == (
        '{"__metadata__":{"m":"1"},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    )
