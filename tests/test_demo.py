"""The demo pipeline end to end at a tiny size: files written, numbers sane, removal exact."""

import json

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def test_tiny_demo_writes_a_complete_report(tmp_path):
    from robustpatch.lab import demo

    results = demo.run(tmp_path, log=lambda _m: None, config=demo.DemoConfig.tiny())
    for name in ("results.json", "report.md", "contrast.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    arms = saved["per_corruption"]["contrast"]["arms"]
    for arm in ("clean", "bn_reestimation_only", "robust", "patched_projection_4bit+bn"):
        assert len(arms[arm]) == len(demo.SEVERITIES)
        assert all(0.0 <= a <= 100.0 for a in arms[arm])
    sigs = saved["per_corruption"]["contrast"]["signatures"]
    assert all(s["removal_bit_exact"] for s in sigs.values())
    # A 4-bit signature is several times smaller than its unquantized twin.
    assert sigs["projection_4bit"]["nbytes"] * 4 < sigs["projection"]["nbytes"]
    assert "## contrast" in (tmp_path / "report.md").read_text()
    assert results["summary"][0]["corruption"] == "contrast"
