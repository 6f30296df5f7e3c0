"""pread_blocks: a byte range read in bounded blocks, a short file a one-line FormatError."""

from __future__ import annotations

import os

import pytest

from robustpatch._io.ranged import pread_blocks
from robustpatch.errors import FormatError


@pytest.fixture
def fd(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4)  # 1,024 bytes
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("step", [1, 7, 100, 5000])
def test_the_range_comes_back_whole_in_blocks_of_at_most_step(fd, step):
    blocks = list(pread_blocks(fd, 10, 1000, step, "x"))
    assert b"".join(blocks) == (bytes(range(256)) * 4)[10:1000]
    assert max(len(b) for b in blocks) <= step


def test_an_empty_range_reads_nothing(fd):
    assert list(pread_blocks(fd, 500, 500, 64, "x")) == []


def test_a_file_that_ends_inside_the_range_names_where_and_the_byte(fd):
    with pytest.raises(
        FormatError, match=r"^tensor 'w': the file ends at byte 1024, before byte 2000$"
    ):
        b"".join(pread_blocks(fd, 1000, 2000, 64, "tensor 'w'"))
