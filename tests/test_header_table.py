"""Parsed headers keep their tensors as columns (issue 17, must-show 3): each TensorInfo
is made on access, and parsing a header of many tiny tensors takes at most 4× the
header's size."""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from robustpatch._format.safetensors import (
    TensorInfo,
    encode_header,
    parse_header,
    read_header,
    write_tensors,
)

INFOS = [
    TensorInfo("scalar", "F64", (), 0, 8),
    TensorInfo("matrix", "F16", (2, 3), 8, 20),
    TensorInfo("empty", "U8", (0, 5, 1), 20, 20),
    TensorInfo("bits", "BF16", (4,), 20, 28),
    TensorInfo("cube", "I64", (1, 1, 2), 28, 44),
]


@pytest.fixture
def header():
    head = encode_header(INFOS, {"k": "v"})
    return parse_header(head + bytes(44), len(head) + 44)


def test_each_tensor_comes_back_whole_in_file_order(header):
    assert list(header.tensors) == INFOS
    assert header.metadata == {"k": "v"}
    values = [d for t in header.tensors for d in (t.begin, t.end, *t.shape)]
    assert len(values) == 19 and {type(d) for d in values} == {int}


def test_indexing_acts_like_a_list(header):
    t = header.tensors
    assert len(t) == 5
    assert t[1] == INFOS[1] and t[-1] == INFOS[-1] and t[-5] == INFOS[0]
    assert t[1:4] == INFOS[1:4] and t[::-2] == INFOS[::-2]
    for bad in (5, -6):
        with pytest.raises(IndexError):
            t[bad]


def test_equality_with_lists_and_other_headers(header):
    assert header.tensors == INFOS and INFOS == header.tensors
    assert header.tensors != INFOS[:-1]
    assert header.tensors != [*INFOS[:-1], TensorInfo("cube", "I64", (2, 1, 1), 28, 44)]
    assert header.tensors != "not a table"
    head = encode_header(INFOS, {"k": "v"})
    assert parse_header(head + bytes(44), len(head) + 44) == header


def test_by_name_and_unsorted_input(tmp_path):
    arrays = {"b": np.ones((2, 2), np.float32), "a": np.arange(3, dtype=np.int64)}
    write_tensors(tmp_path / "m.safetensors", arrays)
    h = read_header(tmp_path / "m.safetensors")
    assert h.by_name()["a"] == TensorInfo("a", "I64", (3,), 16, 40)
    assert [t.name for t in h.tensors] == ["b", "a"]


def test_by_name_is_built_once_and_read_only(header):
    # built once per header: a record looks up two tensors for each one it restores, and
    # a table rebuilt per lookup made removing a full-model patch quadratic
    table = header.by_name()
    assert set(table) == {t.name for t in INFOS}
    # the table makes a new TensorInfo on each access: the same object means built once
    assert all(table[t.name] is header.by_name()[t.name] for t in INFOS)
    with pytest.raises(TypeError):
        table["x"] = INFOS[0]  # type: ignore[index]
    assert pickle.loads(pickle.dumps(header)) == header  # the cache does not stop pickling


def tiny_tensors_file(path, n: int) -> int:
    """A file of ``n`` one-byte tensors with short names; returns the header's size."""
    body = ",".join(
        f'"{i:x}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n)
    )
    head = ("{" + body + "}").encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(n))
    return len(head)


def test_parsing_many_tiny_tensors_takes_at_most_4x_the_header(tmp_path):
    # A scaled-down issue case (1.4 M tensors, 92 MB header): the growth of peak RSS
    # over the parse alone, in a fresh process that has already read the buffer. One
    # Python object per tensor took over 7× the header.
    path = tmp_path / "tiny.safetensors"
    n = 300_000
    size = tiny_tensors_file(path, n)
    script = textwrap.dedent(
        f"""
        import os, resource
        from robustpatch._format.safetensors import parse_header
        buf = open({str(path)!r}, "rb").read(8 + {size})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        h = parse_header(buf, os.path.getsize({str(path)!r}))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert len(h.tensors) == {n} and h.tensors[-1].end == {n}
        print((after - before) * 1024 / {size})
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) <= 4.0, f"{float(out.stdout):.2f}× the header"
