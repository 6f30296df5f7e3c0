"""The IDX reader: a tiny fixture plain and gzipped, and malformed files with clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

pytest.importorskip("torch")

from robustpatch.errors import FormatError  # noqa: E402
from robustpatch.lab.data import fashion_mnist as fm  # noqa: E402
from robustpatch.lab.data.idx import read_idx  # noqa: E402


def idx(array: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: "u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    head = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return head + array.astype(dtype).tobytes()


FIXTURE = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)


@pytest.mark.parametrize("compress", [False, True])
def test_reads_tiny_fixture_plain_and_gzip(tmp_path, compress):
    data = idx(FIXTURE)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    got = read_idx(path)
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, FIXTURE)


def test_big_endian_types_come_back_native(tmp_path):
    values = np.array([[-2, 300], [7, -32768]], dtype=np.int16)
    (tmp_path / "s.idx").write_bytes(idx(values, 0x0B))
    got = read_idx(tmp_path / "s.idx")
    assert got.dtype == np.dtype("int16") and got.dtype.isnative
    np.testing.assert_array_equal(got, values)


MALFORMED = {
    "bad magic": (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic starts with 0100"),
    "unknown type code": (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code 0x07"),
    "zero dimensions": (b"\x00\x00\x08\x00", "zero dimensions"),
    "shorter than magic": (b"\x00\x00", "the magic needs 4"),
    "header truncated": (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "header truncated"),
    "payload truncated": (idx(FIXTURE)[:-5], "payload truncated"),
    "trailing bytes": (idx(FIXTURE) + b"\x00\x00", "trailing bytes"),
    "dims disagree with size": (
        b"\x00\x00\x08\x02" + struct.pack(">II", 3, 3) + bytes(8),
        "need 9 bytes, the file has 8",
    ),
    "float size mismatch": (
        b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + bytes(4),
        "float32 need 8 bytes",
    ),
    "corrupt gzip": (gzip.compress(idx(FIXTURE))[:-12], "corrupt gzip"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_gives_one_clear_line(tmp_path, case):
    data, expected = MALFORMED[case]
    path = tmp_path / "bad.idx"
    path.write_bytes(data)
    with pytest.raises(FormatError) as err:
        read_idx(path)
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message
    assert path.read_bytes() == data


def _write_folder(folder, images: np.ndarray, labels: np.ndarray) -> None:
    for file in ("train", "test"):
        img_name, lbl_name = fm._FILES[file]
        (folder / img_name).write_bytes(idx(images))
        (folder / lbl_name).write_bytes(idx(labels))


def test_folder_with_label_count_mismatch_is_refused(tmp_path):
    _write_folder(tmp_path, np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(FormatError, match="expected 4 uint8 labels"):
        fm.load_folder(tmp_path, fm.SplitSizes(1, 1, 1, 1))


def test_folder_with_wrong_image_size_is_refused(tmp_path):
    _write_folder(tmp_path, np.zeros((4, 28, 27), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(FormatError, match=r"expected uint8 images \(N, 28, 28\)"):
        fm.load_folder(tmp_path, fm.SplitSizes(1, 1, 1, 1))


def test_folder_without_files_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        fm.load_folder(tmp_path, fm.SplitSizes(1, 1, 1, 1))
