"""Parser parity with the safetensors package (issue 17, finding 8): over the hostile
corpus (the files tests/test_hostile_files.py builds) and the fuzz corpus
(fuzz/corpus/*), our header parser accepts a file only if ``safetensors.safe_open``
does. Where the verdicts differ, we are the stricter one, for a reason listed in
DELIBERATE; never the reverse."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from robustpatch import _core
from test_hostile_files import CASES, base  # noqa: F401  (base: the cases' fixture)

safetensors = pytest.importorskip("safetensors")

FUZZ = Path(__file__).parent.parent / "fuzz" / "corpus"

#: What we refuse and safetensors accepts, each with its reason (matched on our error).
DELIBERATE = {
    r"duplicate entry": "a name given twice: JSON keeps the last entry, so the file's "
    "meaning depends on the reader",
    r"__metadata__ has the key .* twice": "the same, for a metadata key",
    r"__metadata__ must be an object": "a null or non-object __metadata__ is no metadata "
    "anyone wrote",
    r"unknown dtype": "dtypes the engine has no element size for (F4, F6_*, F8_E8M0, C64...)",
    r"does not start with '\{'": "leading whitespace before the JSON object: no writer "
    "emits it, and it is how a non-safetensors file is recognised",
    r"dimensions; at most 64": "numpy's limit: such a tensor opens here but no array of it "
    "can be made, so extract failed deep inside",
}


def ours(path: Path) -> str | None:
    """None if our parser accepts the file, else its error."""
    try:
        _core.read_header(str(path))
    except _core.FormatError as e:
        return str(e)
    return None


def theirs(path: Path) -> bool:
    """True if the safetensors package opens the file (header validated, mmap)."""
    try:
        with safetensors.safe_open(str(path), "np"):
            return True
    except Exception:  # it raises SafetensorError or other exceptions: any refusal counts
        return False


def check_parity(path: Path) -> None:
    err, accepted = ours(path), theirs(path)
    if err is None:
        assert accepted, f"{path.name}: we accept what safetensors refuses"
    elif accepted:
        reasons = [r for r in DELIBERATE if re.search(r, err)]
        assert reasons, f"{path.name}: we refuse what safetensors accepts: {err}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_corpus_verdicts_match(base, case, tmp_path):  # noqa: F811
    p = tmp_path / "case.safetensors"
    case.build(base, p)
    check_parity(p)


@pytest.mark.parametrize("target", ["header", "apply"])
def test_fuzz_corpus_verdicts_match(target, tmp_path):
    files = sorted((FUZZ / target).iterdir())
    assert files, f"fuzz corpus {target} is empty"
    p = tmp_path / "f"
    for f in files:
        p.write_bytes(f.read_bytes())
        check_parity(p)


def raw(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


ONE = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'

#: The issue's three files (and their kin) that safetensors refuses: so do we.
REFUSED_BY_BOTH = {
    "duplicate_dtype": raw(
        b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)
    ),
    "duplicate_offsets": raw(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"data_offsets":[0,4]}}', bytes(4)
    ),
    "gap_mid_buffer": raw(
        b'{"a":' + ONE + b',"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', bytes(12)
    ),
    "trailing_bytes": raw(b'{"a":' + ONE + b"}", bytes(5)),
    "data_without_tensors": raw(b"{}", bytes(3)),
    "gap_at_start": raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)),
}


@pytest.mark.parametrize("name", REFUSED_BY_BOTH)
def test_what_safetensors_refuses_we_refuse(name, tmp_path):
    p = tmp_path / "f.safetensors"
    p.write_bytes(REFUSED_BY_BOTH[name])
    assert not theirs(p)
    assert ours(p) is not None


@pytest.mark.parametrize(
    "header,data",
    [
        (b'{"a":{"dtype":"F32","x":[1],"shape":[1],"data_offsets":[0,4]}}', 4),  # extra field
        (b'{"a":' + ONE + b"} \n\t", 4),  # trailing whitespace
        (json.dumps({"z": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}).encode(), 0),
    ],
)
def test_what_both_accept(header, data, tmp_path):
    p = tmp_path / "f.safetensors"
    p.write_bytes(raw(header, bytes(data)))
    assert theirs(p) and ours(p) is None
