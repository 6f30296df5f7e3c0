"""The demo pipeline end to end at a miniature size: the report's files, weakened forms of
claims 2 (a shallow patch helps, beyond BN re-estimation) and 5 (transfer, composition,
α), and exact removal."""

from __future__ import annotations

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from robustpatch.lab import demo

    out = tmp_path_factory.mktemp("demo")
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster on a shared machine
    try:
        # The tiny robustifier comparison too: the demo report carries its table.
        config = dataclasses.replace(demo.DemoConfig.tiny(), robustifiers="tiny")
        results = demo.run(out, log=lambda _m: None, config=config)
    finally:
        torch.set_num_threads(old)
    return out, results


def test_report_files_are_written(tiny_run):
    out, results = tiny_run
    figures = [
        "patch_gain",
        "layers",
        "depth",
        "alpha",
        "compression",
        "similarity",
        "composition",
        "transfer",
    ]
    for name in ["results.json", "report.md"] + [f"{f}.png" for f in figures]:
        assert (out / name).stat().st_size > 0, name
    for name in [
        "pretrained.safetensors",
        "digits32-clean-s0.safetensors",
        "gaussian_noise.rws",
        "gaussian_noise-4bit.rws",
    ]:
        assert (out / "files" / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())  # strict JSON (no NaN)
    assert [c["id"] for c in saved["claims"]] == [1, 2, "2s", 3, 4, 5, 6, "R"]
    assert "### Claim 2 across fine-tune seeds [0, 1]" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "BN-only" in report
    rows = saved["robustifiers"]["rows"]
    assert len(rows) == 5 and "## 10. Robustifiers compared" in report
    assert (out / "robustifiers" / "comparison.json").stat().st_size > 0
    for c in saved["claims"]:
        assert ("**pass**" if c["passed"] else "**FAIL**") in report
    # The BN-only baseline is always there, per corruption and severity.
    for name in ("gaussian_noise", "contrast"):
        arms = saved["per_corruption"][name]["arms"]
        for arm in ("clean", "bn_reestimation_only", "robust", "shallow|reestimate"):
            assert len(arms[arm]["severity"]) == 5
            assert all(0.0 <= a <= 100.0 for a in arms[arm]["severity"])
    # The CLI's summary lines read these keys.
    s = results["summary"][0]
    assert {"clean", "bn_reestimation_only", "robust"} <= set(s["mean"]) and s["recovered"]


def test_weak_claim_2_shallow_patch_helps(tiny_run):
    _, results = tiny_run
    for name, r in results["per_corruption"].items():
        a = r["arms"]
        p = a["shallow|reestimate"]
        assert r["signatures"]["shallow"]["param_fraction"] <= 0.25
        assert p["gain"] >= 5, (name, p["gain"])  # the patch helps the clean model
        assert p["mean"] >= a["bn_reestimation_only"]["mean"], name  # beyond BN alone
        assert p["recovered"] >= 0.3, (name, p["recovered"])
    # Noise is the strong case even at this size.
    noise = results["per_corruption"]["gaussian_noise"]["arms"]
    assert noise["shallow|reestimate"]["mean"] >= noise["bn_reestimation_only"]["mean"] + 5


def test_weak_claim_5_transfer_composition_alpha(tiny_run):
    _, results = tiny_run
    t = results["transfer"]["gaussian_noise"]
    assert t["arms"]["transfer|reestimate"]["gain"] > 0  # a digits signature helps patterns
    for comp in results["composition"]:
        for c, row in comp["policies"]["reestimate"].items():
            assert row["sum_gain"] > 0, (comp["pair"], c)  # the sum still helps both
    for name, r in results["per_corruption"].items():
        rows = r["alpha_sweep"]["policies"]["reestimate"]
        assert rows[-1]["alpha"] == 1.0 and rows[0]["alpha"] == 0.0
        assert rows[-1]["mean"] >= rows[0]["mean"] - 1, name  # α = 1 no worse than α = 0


def test_removal_is_bit_exact_and_4bit_is_small(tiny_run):
    _, results = tiny_run
    for r in results["per_corruption"].values():
        assert all(v["bit_exact"] for v in r["removal"].values())
        sigs = r["signatures"]
        assert sigs["shallow-4bit"]["nbytes"] * 4 < sigs["shallow"]["nbytes"]


def test_claim_2_is_measured_again_on_each_fine_tune_seed(tiny_run):
    _, results = tiny_run
    for name, rep in results["replicates"].items():
        assert [r["seed"] for r in rep["seeds"]] == [0, 1]
        first = results["per_corruption"][name]["arms"]
        # Seed 0 is the main run: the same models, signature and numbers.
        assert rep["seeds"][0]["recovered"] == pytest.approx(
            first["shallow|reestimate"]["recovered"]
        )
        assert rep["seeds"][0]["robust_gain"] == pytest.approx(first["robust"]["gain"])
        # The other seed's twins are other models: its numbers differ.
        assert rep["seeds"][1]["robust_gain"] != rep["seeds"][0]["robust_gain"]
        values = [r["vs_bn_only"] for r in rep["seeds"]]
        assert rep["stats"]["vs_bn_only"]["mean"] == pytest.approx(sum(values) / 2)


def test_mean_ci_is_a_student_t_interval():
    from robustpatch.lab.demo import mean_ci

    st = mean_ci([1.0, 2.0, 3.0])
    assert st["mean"] == 2.0 and st["sd"] == pytest.approx(1.0) and st["n"] == 3
    assert st["ci95"] == pytest.approx(4.303 / 3**0.5, rel=1e-4)
    assert mean_ci([5.0, 5.0])["ci95"] == 0.0
    one = mean_ci([4.0])
    assert one["mean"] == 4.0 and one["ci95"] != one["ci95"]  # NaN: no interval from one
    assert mean_ci([1.0, float("nan")])["mean"] != mean_ci([1.0, float("nan")])["mean"]


def test_run_sets_the_torch_thread_count_it_records(tmp_path, monkeypatch):
    """CPU results depend on the thread count, so ``run(threads=n)`` must apply it before
    any training (checked where training starts, then stopped there)."""
    from robustpatch.lab import demo

    seen = []

    def stop_at_training(ctx, seeds, transfer_on):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    old = torch.get_num_threads()
    monkeypatch.setattr(demo, "_run", stop_at_training)
    try:
        for n in (2, 1):
            with pytest.raises(KeyboardInterrupt):
                demo.run(tmp_path, log=lambda _m: None, config=demo.DemoConfig.tiny(), threads=n)
    finally:
        torch.set_num_threads(old)
    assert seen == [2, 1]
