"""The digits demo's claim 4 (signature similarity) on the label sets the runner builds
when the experiment cannot be judged: it reads "not run" instead of crashing the report."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from robustpatch.lab.demo.claims import _claim4  # noqa: E402
from robustpatch.lab.demo.config import DemoConfig  # noqa: E402


def _results(labels: list[str], matrix: list[list[float]], second_seed) -> dict:
    return {
        "similarity": {"matrix": {"labels": labels, "matrix": matrix}},
        "config": {"second_seed": second_seed},
    }


def _not_run(claim: dict) -> bool:
    return [c["measured"] for c in claim["checks"]] == ["not run"]


def test_claim4_with_one_corruption_is_not_run():
    # DemoConfig(corruptions=("fog",)): the fog twins and the transfer's patterns signature
    labels = ["fog/s0", "fog/s1", "patterns:fog"]
    m = [[1.0, 0.5, 0.3], [0.5, 1.0, 0.3], [0.3, 0.3, 1.0]]
    assert _not_run(_claim4(_results(labels, m, 1)))


def test_claim4_without_a_twin_from_another_seed_is_not_run():
    # second_seed == seed: the second seed's signatures overwrote the first's labels
    labels = ["gaussian_noise/s0", "contrast/s0"]
    assert _not_run(_claim4(_results(labels, [[1.0, 0.2], [0.2, 1.0]], 0)))


def test_claim4_is_judged_when_twins_and_other_corruptions_exist():
    labels = ["fog/s0", "contrast/s0", "fog/s1", "contrast/s1"]
    m = [
        [1.0, 0.2, 0.6, 0.1],
        [0.2, 1.0, 0.1, 0.7],
        [0.6, 0.1, 1.0, 0.3],
        [0.1, 0.7, 0.3, 1.0],
    ]
    claim = _claim4(_results(labels, m, 1))
    assert len(claim["checks"]) == 4 and claim["verdict"] == "holds"
    assert claim["checks"][0]["value"] == pytest.approx(0.6 - 0.2)


def test_second_seed_equal_to_seed_is_refused():
    with pytest.raises(ValueError, match="second_seed must differ from seed"):
        DemoConfig(seed=3, second_seed=3)
    cfg = DemoConfig.tiny()
    cfg.second_seed = cfg.seed  # the config is mutable: the runner checks again
    with pytest.raises(ValueError, match="second_seed must differ"):
        cfg.check()
