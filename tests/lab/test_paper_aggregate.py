"""Control rows from synthetic per-seed measurements: the null control is judged against
the same BatchNorm handling as the arm it controls."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("scipy")
pytest.importorskip("torch")

from robustpatch.lab.paper import aggregate, protocol  # noqa: E402

CFG = replace(
    protocol.QUICK,
    corruptions=("fog", "contrast"),
    pair=("fog", "contrast"),
    transfer="fog",
)


def _seeds(arms: dict[str, list[float]]) -> list[dict]:
    """Per-seed rows where every corruption has the given arm accuracies."""
    n = len(next(iter(arms.values())))
    out = []
    for i in range(n):
        corrupted = {a: v[i] for a, v in arms.items()}
        out.append(
            {
                "per_corruption": {c: {"corrupted": corrupted} for c in CFG.corruptions},
                "composition": {
                    label: {c: corrupted["paper"] for c in CFG.corruptions}
                    for label in ("official", "linear")
                },
            }
        )
    return out


def _null(rows: list[dict], where: str) -> dict:
    return next(r for r in rows if r["where"] == where and "verdict" in r)


def test_bn_null_is_judged_over_the_robust_bn_swap_alone():
    # The BN route (swap + re-estimation) gains ~30 points by itself; a random direction
    # through the same route adds nothing. Judged over the clean model, the null would
    # "gain" the BN route's 30 points and fail for a reason unrelated to direction.
    arms = {
        "clean": [20.0, 21.0, 19.0],
        "robust": [80.0, 79.0, 81.0],
        "paper": [60.0, 58.0, 61.0],
        "swap_only": [50.0, 52.0, 49.0],
        "null": [50.5, 51.0, 49.5],
        "bn_only": [45.0, 46.0, 44.0],
    }
    rows = aggregate.control_rows(_seeds(arms), CFG)
    null = _null(rows, "fog")
    assert null["verdict"] == "holds"
    assert null["gain"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert "robust-BN swap alone" in null["arm"]
    own = next(r for r in rows if r["where"] == "fog" and "signature's own part" in r["arm"])
    assert own["gain"]["mean"] == pytest.approx((179.0 - 151.0) / 3)
    paper = next(r for r in rows if r["where"] == "fog" and r["arm"].startswith("paper patch ("))
    assert "official BN route" in paper["arm"]


def test_bn_null_that_beats_the_swap_fails():
    arms = {
        "clean": [20.0, 21.0, 19.0],
        "robust": [80.0, 79.0, 81.0],
        "paper": [60.0, 58.0, 61.0],
        "swap_only": [50.0, 52.0, 49.0],
        "null": [55.0, 57.5, 54.0],
        "bn_only": [45.0, 46.0, 44.0],
    }
    assert _null(aggregate.control_rows(_seeds(arms), CFG), "fog")["verdict"] == "fails"


def test_without_batchnorm_the_null_is_judged_over_the_clean_model():
    arms = {
        "clean": [20.0, 21.0, 19.0],
        "robust": [80.0, 79.0, 81.0],
        "paper": [60.0, 58.0, 61.0],
        "null": [30.0, 31.0, 29.5],
        "bn_only": [20.0, 21.0, 19.0],
    }
    rows = aggregate.control_rows(_seeds(arms), CFG)
    null = _null(rows, "contrast")
    assert null["verdict"] == "fails" and null["gain"]["mean"] == pytest.approx(10.1666, 1e-3)
    assert not any("signature's own part" in r["arm"] for r in rows)
    assert not any("official BN route" in r["arm"] for r in rows)
