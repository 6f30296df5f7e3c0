"""``similarity`` over a library: a folder of 200 4-bit signatures compared from their
packed codes in one Gram matrix (``robustpatch similarity DIR --json``), agreeing with
the cosine of the dequantized deltas, and with the pairwise dot kernel, also across
tile boundaries, mixed group lengths and bit widths, missing tensors, scaled
signatures and sums."""

from __future__ import annotations

import json

import numpy as np
import pytest

from robustpatch.cli import main
from robustpatch.signature import Signature, algebra, similarity

SHAPES = {"conv.weight": (32, 3, 3, 3), "fc.weight": (64, 96), "fc.bias": (96,)}


def dequantized_cosine(sigs) -> np.ndarray:
    """Cosine over the union of tensors of the dequantized deltas (float64)."""
    names = sorted({n for s in sigs for n in s.deltas})
    rows = []
    for s in sigs:
        parts = []
        for n in names:
            size = int(np.prod(SHAPES[n]))
            d = s.deltas.get(n)
            parts.append(np.zeros(size) if d is None else d.dense().reshape(-1).astype(np.float64))
        rows.append(np.concatenate(parts))
    x = np.stack(rows)
    g = x @ x.T
    norms = np.sqrt(np.diag(g))
    return g / np.outer(norms, norms)


def library(n: int, rng) -> list[Signature]:
    """``n`` 4-bit signatures around 4 directions, some lacking a tensor."""
    centres = [
        {k: rng.standard_normal(v).astype(np.float32) for k, v in SHAPES.items()} for _ in range(4)
    ]
    sigs = []
    for i in range(n):
        c = centres[i % 4]
        d = {k: v + 0.7 * rng.standard_normal(v.shape).astype(np.float32) for k, v in c.items()}
        if i % 7 == 3:
            del d["fc.bias"]
        sig = Signature.from_deltas(d, name=f"s{i:03d}")
        sigs.append(sig.quantize(4, "affine", "group", 128 if i % 2 else 64))
    return sigs


def test_a_folder_of_200_signatures_agrees_with_dequantized_cosine(tmp_path, capsys):
    sigs = library(200, np.random.default_rng(0))
    for s in sigs:
        s.save(tmp_path / f"{s.name}.rws")
    assert main(["similarity", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["names"] == [s.name for s in sigs] and len(rep["files"]) == 200
    got = np.array(rep["cosine"])
    assert np.abs(got - dequantized_cosine(sigs)).max() < 1e-9
    # the pairwise dot kernel (what detect uses) gives the same values
    forms = [algebra._Deltas(s) for s in sigs[:12]]
    pairwise = [[algebra._cosine(a, b, union=True) for b in forms] for a in forms]
    off = ~np.eye(12, dtype=bool)
    assert np.abs(got[:12, :12] - np.array(pairwise))[off].max() < 1e-9
    # four clusters: a signature is closest to its own centre's
    same = got[0, 4::4].min()
    assert same > got[0, 1::4].max()


@pytest.mark.parametrize("tile", [40, 200, 1 << 14])
def test_tiles_start_on_group_and_byte_boundaries(monkeypatch, tile):
    rng = np.random.default_rng(1)
    d = {k: rng.standard_normal(v).astype(np.float32) for k, v in SHAPES.items()}
    e = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in d.items()}
    a = Signature.from_deltas(d, name="a").quantize(3, "affine", "group", 96)
    b = Signature.from_deltas(e, name="b").quantize(5, "symmetric", "group", 64)
    c = Signature.from_deltas(d, name="c").quantize(2, "log", "channel")
    dense = Signature.from_deltas(e, name="dense")
    monkeypatch.setattr(algebra, "SIMILARITY_TILE", tile)
    sigs = [a, b, c, dense]
    assert np.abs(similarity(sigs) - dequantized_cosine(sigs)).max() < 1e-9


def test_scaled_signatures_and_sums_count_with_their_coefficients():
    rng = np.random.default_rng(2)
    a, b = library(2, rng)
    got = similarity([2.0 * a, a + b, -1.0 * b])
    expect = dequantized_cosine(
        [(2.0 * a).materialize(), (a + b).materialize(), (-1.0 * b).materialize()]
    )
    assert np.abs(got - expect).max() < 1e-6  # materialize rounds the sum to float32


def test_a_zero_signature_scores_zero_and_an_empty_folder_is_refused(tmp_path, capsys):
    zero = Signature.from_deltas({"fc.bias": np.zeros(96, np.float32)}, name="z")
    one = Signature.from_deltas({"fc.bias": np.ones(96, np.float32)}, name="o")
    assert similarity([zero, one]).tolist() == [[0.0, 0.0], [0.0, 1.0]]
    (tmp_path / "empty").mkdir()
    assert main(["similarity", str(tmp_path / "empty")]) == 1
    assert "holds no .rws signature files" in capsys.readouterr().err
