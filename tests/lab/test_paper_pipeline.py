"""A miniature paper-protocol run (tiny data, one epoch) writes every report file."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from robustpatch.lab.data import fashion_mnist as fm  # noqa: E402
from robustpatch.lab.paper import protocol, report, run  # noqa: E402
from robustpatch.lab.paper.verdicts import CLAIMS  # noqa: E402

MINI = replace(
    protocol.QUICK,
    seeds=(0, 1),
    corruptions=("gaussian_noise", "contrast"),
    pair=("gaussian_noise", "contrast"),
    schedule=protocol.Schedule(pretrain_epochs=1, finetune_epochs=1),
)


def _strict(text: str) -> dict:
    def refuse(token: str):
        raise AssertionError(f"non-standard JSON number {token}")

    return json.loads(text, parse_constant=refuse)


def test_miniature_run_writes_every_report_file(tmp_path):
    splits = fm.load_embedded().head(48)
    results = run.run_paper(tmp_path, config=MINI, splits=splits, progress=lambda _: None)
    for name in report.REPORT_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    saved = _strict((tmp_path / "paper.json").read_text())
    assert saved == json.loads(json.dumps(results))
    vgg = saved["backbones"]["vgg"]
    assert {r["id"] for r in vgg["claims"]} == {c.id for c in CLAIMS}
    assert all(r["verdict"] in ("holds", "fails", "inconclusive") for r in vgg["claims"])
    assert len(vgg["per_seed"]) == 2
    null = [r for r in vgg["controls"] if "verdict" in r]
    assert {r["where"] for r in null} == set(MINI.corruptions)
    md = (tmp_path / "paper.md").read_text()
    order = [
        "## Fidelity",
        "## Verdicts",
        "## Controls",
        "## Projection",
        "## Secondary",
        "## Figure",
    ]
    positions = [md.index(h) for h in order]
    assert positions == sorted(positions)
    assert md.count("\n| ") > len(vgg["claims"]) + len(results["fidelity"])


def test_unknown_backbone_is_refused_before_anything_is_written(tmp_path):
    from robustpatch.errors import InvalidArgumentError

    out = tmp_path / "out"
    with pytest.raises(InvalidArgumentError, match="unknown backbone 'resnet'"):
        run.run_paper(out, config=replace(MINI, backbones=("vgg", "resnet")))
    assert not out.exists()


def test_fidelity_rows_point_at_the_code_that_does_it():
    from pathlib import Path

    import robustpatch

    root = Path(robustpatch.__file__).parent.parent
    rows = report.fidelity_rows(protocol.QUICK, "embedded")
    assert len(rows) == 11
    for point, _official, _ours, where in rows:
        file, line = where.rsplit(":", 1)
        text = (root / file).read_text().splitlines()[int(line) - 1]
        assert text.strip().startswith(("def ", "class ", "#: ", "pretrain_lr", "CLAIMS")), point
    alpha = next(r for r in rows if r[0] == "α and composition")[3]
    file, line = alpha.rsplit(":", 1)
    assert "def official_alphas" in (root / file).read_text().splitlines()[int(line) - 1]
