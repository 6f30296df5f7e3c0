"""The demo pipeline end to end at a miniature size: the report's files, weakened forms of
claims 2 (a shallow patch helps, beyond BN re-estimation) and 5 (transfer, composition,
α), and exact removal."""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import shutil
import subprocess
from pathlib import Path

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
        results = demo.run(out, log=lambda _m: None, config=demo.DemoConfig.tiny())
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
    assert "## 1. Claims" in report and "BN-only" in report
    for c in saved["claims"]:
        assert f"- **{c['id']}** ({c['verdict']}): " in report
    # The BN-only baseline is always there, per corruption and severity.
    for name in ("gaussian_noise", "contrast"):
        arms = saved["per_corruption"][name]["arms"]
        for arm in ("clean", "bn_reestimation_only", "robust", "shallow|reestimate"):
            assert len(arms[arm]["severity"]) == 5
            assert all(0.0 <= a <= 100.0 for a in arms[arm]["severity"])
    # The CLI's summary lines read these keys.
    s = results["summary"][0]
    assert {"clean", "bn_reestimation_only", "robust"} <= set(s["mean"]) and s["recovered"]


FIXTURES = Path(__file__).parent / "fixtures"


def test_report_carries_the_robustifier_comparison(tiny_run, tmp_path):
    """A tiny comparison (``ComparisonConfig.tiny()``, recorded once) in the results: the
    report gets its table as the last numbered section."""
    from robustpatch.lab import demo

    comparison = json.loads((FIXTURES / "robustifiers_comparison_tiny.json").read_text())
    results = dict(tiny_run[1], robustifiers=comparison)
    demo.write_report(tmp_path, results)
    report = (tmp_path / "report.md").read_text()
    last = re.findall(r"^## (\d+)\. (.*)$", report, flags=re.M)[-1]
    assert last[1] == "Robustifiers compared (lab.robustifiers)"
    section = report.split(f"## {last[0]}. {last[1]}")[1]
    for row in comparison["rows"].values():
        assert f"| {row['method']} | " in section


def test_demo_runs_the_comparison_at_its_configured_size(tmp_path, monkeypatch):
    from robustpatch.lab import robustifiers as R
    from robustpatch.lab.demo import config as demo_config
    from robustpatch.lab.demo import runner

    seen = []
    monkeypatch.setattr(R, "compare_methods", lambda cfg, **kw: seen.append((cfg, kw)) or {})

    def ctx(size):
        cfg = dataclasses.replace(demo_config.DemoConfig.tiny(), robustifiers=size)
        return runner._Run(cfg, torch.device("cpu"), tmp_path, runner._Progress(1, False, print))

    runner._compare_robustifiers(ctx("tiny"))
    runner._compare_robustifiers(ctx("default"))
    assert seen[0][0] == R.ComparisonConfig.tiny() and seen[1][0] == R.ComparisonConfig()
    assert seen[0][1]["out"] == tmp_path / "robustifiers"
    with pytest.raises(ValueError, match="'tiny', 'default' or None"):
        runner._compare_robustifiers(ctx("huge"))


def test_weak_claim_2_shallow_patch_helps(tiny_run):
    _, results = tiny_run
    # Seeds 0-4 of DemoConfig.tiny (seed and fine-tune seed), torch 2.15, 1 thread.
    # gain, noise: 54.5, 29.0, 21.6, 24.2, 38.9; contrast: 28.9, 19.9, 23.8, 14.3, 25.7.
    # recovered, noise: 1.30, 1.19, 1.04, 1.75, 1.39; contrast: 1.26, 0.71, 0.98, 0.84, 1.72.
    for name, r in results["per_corruption"].items():
        p = r["arms"]["shallow|reestimate"]
        assert r["signatures"]["shallow"]["param_fraction"] <= 0.25
        assert p["gain"] >= 5, (name, p["gain"])  # the patch helps the clean model
        assert p["recovered"] >= 0.3, (name, p["recovered"])
    # Beyond BN re-estimation alone: noise is the strong case at this size (seeds 0-4:
    # +34.3, +15.2, +11.5, +17.7, +10.7); contrast is not (+6.3, -13.4, +3.0, -3.1, -5.8).
    noise = results["per_corruption"]["gaussian_noise"]["arms"]
    assert noise["shallow|reestimate"]["mean"] >= noise["bn_reestimation_only"]["mean"] + 5


def test_weak_claim_5_transfer_composition_alpha(tiny_run):
    _, results = tiny_run
    # Seeds 0-4 as in claim 2. A digits signature on patterns, gain: +5.6, +5.3, -2.5,
    # +0.3, +4.7 -- no direction at this size, so only a bound on the harm.
    t = results["transfer"]["gaussian_noise"]
    assert t["arms"]["transfer|reestimate"]["gain"] > -10
    # The sum of both signatures, gain (noise, contrast), seeds 0-4: (15.4, 16.6),
    # (3.4, 13.9), (16.7, 10.0), (1.4, 2.6), (14.3, 2.0) -- positive on every seed but too
    # thinly to gate on its sign; the other signature does not undo the help.
    for comp in results["composition"]:
        for c, row in comp["policies"]["reestimate"].items():
            assert row["sum_gain"] > -5, (comp["pair"], c)
    # The α sweep's ends are the arms: α = 0 is BN re-estimation alone, α = 1 the patch.
    for name, r in results["per_corruption"].items():
        rows = r["alpha_sweep"]["policies"]["reestimate"]
        arms = r["arms"]
        assert rows[-1]["alpha"] == 1.0 and rows[0]["alpha"] == 0.0
        assert rows[0]["mean"] == pytest.approx(arms["bn_reestimation_only"]["mean"]), name
        assert rows[-1]["mean"] == pytest.approx(arms["shallow|reestimate"]["mean"]), name


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
    from robustpatch.lab.demo import runner

    seen = []

    def stop_at_training(ctx, seeds, transfer_on):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    old = torch.get_num_threads()
    monkeypatch.setattr(runner, "_run", stop_at_training)
    try:
        for n in (2, 1):
            with pytest.raises(KeyboardInterrupt):
                demo.run(tmp_path, log=lambda _m: None, config=demo.DemoConfig.tiny(), threads=n)
    finally:
        torch.set_num_threads(old)
    assert seen == [2, 1]


# ---------------------------------------------------------------------------- report format


def _claim_table(report: str) -> list[list[str]]:
    """The claims table's rows (header first), cells stripped."""
    lines = report.split("\n")
    start = lines.index("| claim | measured | threshold | verdict |")
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_report_starts_with_a_five_line_summary(tiny_run):
    from robustpatch.lab import demo

    out, results = tiny_run
    lines = (out / "report.md").read_text().split("\n")
    assert lines[:4] == ["# robustpatch demo report", "", "## Summary", ""]
    summary = lines[4:9]
    assert [ln.split("**")[1] for ln in summary] == [
        "Run",
        "Software",
        "Pre-registered arm",
        "Robust gain recovered",
        "Claims",
    ]
    assert lines[9:11] == ["", "## 1. Claims"]
    # The headline numbers are the pre-registered arm's, averaged over corruptions.
    arms = [r["arms"] for r in results["per_corruption"].values()]
    patched = sum(a["shallow|reestimate"]["mean"] for a in arms) / len(arms)
    assert "`shallow|reestimate`" in summary[2] and f"patched {patched:.1f}%" in summary[2]
    n = demo.verdict_counts(results["claims"])
    assert (
        f"{n['holds']} hold, {n['near miss']} near miss (within 10% of the threshold), "
        f"{n['fails']} fail"
    ) in summary[4]
    prov = results["provenance"]
    assert f"robustpatch {prov['robustpatch']} (commit {prov['commit']})" in summary[1]


def test_claim_table_has_one_row_per_sub_claim_with_four_columns(tiny_run):
    from robustpatch.lab import demo

    out, results = tiny_run
    header, *rows = _claim_table((out / "report.md").read_text())
    assert header == ["claim", "measured", "threshold", "verdict"]
    checks = [(c["id"], k) for c in results["claims"] for k in c["checks"]]
    assert len(rows) == len(checks)
    for row, (cid, check) in zip(rows, checks):
        assert len(row) == 4, row
        assert row[0] == f"{cid} · {check['claim']}"
        assert row[1:] == [check["measured"], check["threshold_text"], check["verdict"]]
        assert row[3] in demo.VERDICTS
    for c in results["claims"]:
        verdicts = {k["verdict"] for k in c["checks"]}
        assert c["passed"] == (verdicts == {"holds"}), c["id"]
    # The rule is written down where the verdicts are.
    assert demo.NEAR_MISS_RULE in (out / "report.md").read_text()


def test_near_miss_rule_on_synthetic_numbers():
    from robustpatch.lab.demo.claims import _check, _claim, verdict

    # ≥ 70: a near miss down to 63 (10% of 70), below that a failure.
    assert verdict(70.0, "≥", 70) == "holds"
    assert verdict(63.0, "≥", 70) == "near miss"
    assert verdict(62.9, "≥", 70) == "fails"
    assert verdict(100 * 0.63, "≥", 70) == "near miss"  # float noise at the edge
    assert verdict(float("nan"), "≥", 70) == "fails"
    # ≤ 2 points: a near miss up to 2.2.
    assert verdict(1.0, "≤", 2) == "holds"
    assert verdict(2.2, "≤", 2) == "near miss"
    assert verdict(2.3, "≤", 2) == "fails"
    # A negative threshold scales by its magnitude.
    assert verdict(-1.1, "≥", -1) == "near miss" and verdict(-1.2, "≥", -1) == "fails"
    # Exact checks have no near miss; a strict order is not met by equality.
    assert verdict(3, "≥", 4, near=False) == "fails"
    assert verdict(0.0, ">", 0, near=False) == "fails" and verdict(0.01, ">", 0) == "holds"
    # A claim is as good as its worst sub-claim.
    ok, near, bad = (_check("x", v, "≥", 70, "%") for v in (80.0, 65.0, 10.0))
    assert [near["measured"], near["threshold_text"]] == ["65.0%", "≥ 70%"]
    # A shown number never lands on the other side of its threshold.
    assert _check("x", 2.04, "≤", 2, " points")["measured"] == "2.04 points"
    assert _check("x", 2.0, "≤", 2, " points")["measured"] == "2.0 points"
    assert _check("x", 4.996, "≥", 5, spec="+.1f")["measured"] == "+4.996"
    assert _check("x", float("nan"), "≥", 70, "%")["measured"] == "n/a"
    assert _claim(1, "c", [ok, ok])["verdict"] == "holds"
    assert _claim(1, "c", [ok, near])["verdict"] == "near miss"
    assert not _claim(1, "c", [ok, near])["passed"]
    assert _claim(1, "c", [near, bad])["verdict"] == "fails"


def test_section_numbers_strictly_increase(tiny_run):
    out, _ = tiny_run
    report = (out / "report.md").read_text()
    headings = re.findall(r"^## (.*)$", report, flags=re.M)
    numbers = [int(h.split(".")[0]) for h in headings[1:]]
    assert headings[0] == "Summary"
    assert numbers == list(range(1, len(headings)))
    figures = [int(n) for n in re.findall(r"^\*Figure (\d+)\. ", report, flags=re.M)]
    assert figures == list(range(1, 9))  # one caption under each of the eight figures


def test_results_json_records_what_produced_it(tiny_run):
    import numpy as np

    import robustpatch

    out, _ = tiny_run
    prov = json.loads((out / "results.json").read_text())["provenance"]
    assert prov["robustpatch"] == robustpatch.__version__
    assert prov["torch"] == torch.__version__ and prov["numpy"] == np.__version__
    assert prov["python"] == platform.python_version()
    assert prov["torch_threads"] == 1 and prov["device"] == "cpu"  # the fixture's
    assert prov["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", prov["commit"])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_names_the_checkout_or_unknown(tmp_path):
    from robustpatch.lab.demo import git_commit

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    assert git_commit(tmp_path) == "unknown"  # not a checkout
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("x = 1\n")
    git("init", "-q")
    assert git_commit(pkg) == "unknown"  # in a repository, but not tracked
    git("add", "pkg/__init__.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    head = git("rev-parse", "HEAD")
    assert git_commit(pkg) == head
    (pkg / "__init__.py").write_text("x = 2\n")
    assert git_commit(pkg) == f"{head}-dirty"


def test_console_prints_the_pre_registered_arm_not_the_best():
    from robustpatch.lab.demo import console_lines
    from robustpatch.lab.demo.claims import _check, _claim

    mean = {
        "clean": 40.0,
        "bn_reestimation_only": 50.0,
        "robust": 80.0,
        "shallow|reestimate": 61.0,
        "full|reestimate": 79.0,  # better, but not the arm fixed in advance
    }
    results = {
        "summary": [
            {
                "corruption": "fog",
                "mean": mean,
                "recovered": {"shallow|reestimate": 0.525, "full|reestimate": 0.975},
            }
        ],
        "claims": [_claim(2, "c", [_check("a", 80.0, "≥", 70), _check("b", 64.0, "≥", 70)])],
    }
    header, row, counts = console_lines(results)
    assert "pre-registered arm shallow|reestimate" in header
    assert "patched  61.0%" in row and "recovered 52%" in row and "79.0" not in row
    assert "clean model  40.0%" in row and "robust twin  80.0%" in row
    assert counts == "claims: 1 sub-claims hold, 1 near miss, 0 fail"


# ---------------------------------------------------------------------------- figures


@pytest.fixture(scope="module")
def demo_figures(tiny_run, tmp_path_factory):
    """The demo's figures as matplotlib objects, drawn again from the tiny run."""
    from robustpatch.lab import plots as P
    from robustpatch.lab.demo import report

    figs = {}
    save = P._save

    def keep(fig, path):
        figs[Path(path).stem] = fig
        return save(fig, path)

    mp = pytest.MonkeyPatch()
    mp.setattr(P, "_save", keep)
    try:
        report._figures(tmp_path_factory.mktemp("figures"), tiny_run[1])
    finally:
        mp.undo()
    assert len(figs) == 8
    return figs


def test_figures_use_at_least_10_pt_type(demo_figures):
    from matplotlib.text import Text

    from robustpatch.lab import plots as P

    assert P.MIN_FONT_PT >= 10
    for name, fig in demo_figures.items():
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
        assert len(texts) > 5, name
        small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 10]
        assert not small, (name, small)


def test_figure_legends_lie_outside_every_panel(demo_figures):
    legends = 0
    for name, fig in demo_figures.items():
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
        found = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        for legend in found:
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(b) for b in boxes), name
        legends += len(found)
    assert legends == 7  # every figure but the heatmap has one


def test_each_corruption_has_one_colour_in_every_figure(demo_figures, tiny_run):
    import matplotlib.colors

    names = list(tiny_run[1]["per_corruption"])
    colours: dict[str, set] = {c: set() for c in names}
    for fig in demo_figures.values():
        for ax in fig.axes:
            for line in ax.get_lines():
                label = line.get_label().split(" (")[0]
                if label in colours:
                    colours[label].add(line.get_color())
            for text in ax.get_xticklabels() + [ax.title]:
                if text.get_text() in colours:
                    colours[text.get_text()].add(text.get_color())
    assert all(len(v) == 1 for v in colours.values()), colours
    assert len({next(iter(v)) for v in colours.values()}) == len(names)
    # Arms are grey or, patched, in their panel's corruption colour.
    for ax in demo_figures["patch_gain"].axes:
        for line in ax.get_lines():
            rgb = matplotlib.colors.to_rgb(line.get_color())
            assert len(set(rgb)) == 1 or line.get_color() == ax.title.get_color(), ax.title
    # Bars stand for arms, not corruptions: they are grey.
    for name in ("transfer", "composition"):
        bars = demo_figures[name].axes[0].patches
        assert bars and all(len(set(bar.get_facecolor()[:3])) == 1 for bar in bars), name


def test_compression_figure_tells_coinciding_size_lines_apart(tmp_path, monkeypatch):
    from robustpatch.lab import plots as P

    def result(kept, nbytes):
        rows = [{"bits": b, "kept": kept, "nbytes": nbytes * b} for b in (2, 4, 8)]
        return {"rows": rows, "model_nbytes": 10**6}

    figs = []
    save = P._save
    monkeypatch.setattr(P, "_save", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    same = {"fog": result(0.9, 100), "contrast": result(0.8, 100)}
    different = {"fog": result(0.9, 100), "contrast": result(0.8, 120)}
    assert P.same_sizes(same) and not P.same_sizes(different)
    P.plot_compression(same, tmp_path / "same.png")
    P.plot_compression(different, tmp_path / "different.png")

    def labels(ax):
        return [line.get_label() for line in ax.get_lines() if line.get_label()[0] != "_"]

    kept, size = figs[0].axes[:2]
    assert labels(kept) == ["fog", "contrast"]
    assert labels(size) == [P.SAME_SIZE_LABEL, "fp32 robust model"]
    assert labels(figs[1].axes[1]) == ["fog", "contrast", "fp32 robust model"]
    # Lines that may coincide differ in colour, marker and line style.
    fog, contrast = kept.get_lines()[:2]
    assert fog.get_color() != contrast.get_color()
    assert fog.get_marker() != contrast.get_marker()
    assert fog.get_linestyle() != contrast.get_linestyle()


# ---------------------------------------------------------------------------- CLI routing


def _paper_results(verdicts: dict[str, list[str]]) -> dict:
    return {
        "config": {"severity": 5, "seeds": [0, 1, 2]},
        "data": "embedded Fashion-MNIST subset",
        "backbones": {
            name: {"claims": [{"id": str(i), "verdict": v} for i, v in enumerate(vs)]}
            for name, vs in verdicts.items()
        },
    }


def test_paper_console_lines_count_verdicts_per_backbone():
    from robustpatch.lab.demo import paper_console_lines

    results = _paper_results(
        {"vgg": ["holds", "fails", "inconclusive", "holds"], "bn_cnn": ["fails"] * 3}
    )
    head, vgg, bn = paper_console_lines(results)
    assert "severity 5, 3 fine-tune seeds" in head and "embedded" in head
    assert vgg.startswith("vgg ") and "2 hold, 1 inconclusive, 1 fail" in vgg
    assert bn.startswith("bn_cnn ") and "0 hold, 0 inconclusive, 3 fail" in bn


def test_cli_demo_runs_the_paper_protocol_by_default(tmp_path, capsys, monkeypatch):
    from robustpatch.cli import main
    from robustpatch.lab import demo
    from robustpatch.lab.paper import run as paper

    seen = {}

    def fake_paper(out, **kwargs):
        seen.update(kwargs, out=out)
        return _paper_results({"vgg": ["holds"]})

    def digits_must_not_run(*_a, **_k):
        raise AssertionError("the digits pipeline ran")

    monkeypatch.setattr(paper, "run_paper", fake_paper)
    monkeypatch.setattr(demo, "run", digits_must_not_run)
    data = tmp_path / "idx"
    out = tmp_path / "report"
    argv = ["-q", "demo", "--quick", "--data", str(data), "--threads", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert seen["out"] == out and seen["data"] == data and seen["quick"] is True
    assert seen["threads"] == 2 and seen["device"] is None
    assert "vgg" in printed and f"report: {out / 'paper.md'}" in printed


def test_cli_demo_digits_runs_the_digits_pipeline(tmp_path, capsys, monkeypatch):
    from robustpatch.cli import main
    from robustpatch.lab import demo
    from robustpatch.lab.paper import run as paper

    seen = {}

    def fake_digits(out, **kwargs):
        seen.update(kwargs, out=out)
        return {"summary": [], "claims": []}

    monkeypatch.setattr(demo, "run", fake_digits)
    monkeypatch.setattr(paper, "run_paper", lambda *_a, **_k: pytest.fail("paper ran"))
    assert main(["-q", "demo", "--dataset", "digits", "-o", str(tmp_path / "r")]) == 0
    assert seen["out"] == tmp_path / "r" and seen["quick"] is False  # -o as every command
    assert f"report: {tmp_path / 'r' / 'report.md'}" in capsys.readouterr().out


def test_cli_demo_refuses_data_for_digits_and_a_missing_data_folder(tmp_path, capsys):
    from robustpatch.cli import main

    out = tmp_path / "report"
    argv = ["demo", "--dataset", "digits", "--data", str(tmp_path), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustpatch demo: error: --data reads Fashion-MNIST IDX files")
    assert err.count("\n") == 1 and not out.exists()
    # The real protocol: a folder that is not there fails before anything is written.
    missing = tmp_path / "no-such-folder"
    assert main(["demo", "--quick", "--data", str(missing), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("robustpatch: error: ") and str(missing) in err
    assert err.count("\n") == 1 and not out.exists()


def test_the_demo_never_writes_into_a_folder_holding_files_unless_told(tmp_path, capsys):
    # it replaced a report's files silently, and wrote through a link in the folder to
    # the file it named
    from robustpatch.cli import main
    from robustpatch.lab import outputs

    out = tmp_path / "report"
    out.mkdir()
    (out / "paper.md").write_text("my notes")
    assert main(["demo", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{out}: already holds paper.md" in err and "--overwrite" in err
    assert err.count("\n") == 1 and (out / "paper.md").read_text() == "my notes"
    with pytest.raises(FileExistsError):
        outputs.check_report_folder(out, overwrite=False)
    assert outputs.check_report_folder(out, overwrite=True) == out
    assert outputs.check_report_folder(tmp_path / "new", overwrite=False) == tmp_path / "new"
    elsewhere = tmp_path / "precious.png"
    elsewhere.write_bytes(b"mine")
    (out / "paper_gains.png").symlink_to(elsewhere)
    outputs.write_text(out / "paper_gains.png", "the report's")
    assert elsewhere.read_bytes() == b"mine" and not (out / "paper_gains.png").is_symlink()
    assert (out / "paper_gains.png").read_text() == "the report's"
