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


def test_miniature_bn_run_judges_the_official_route_with_ours_beside_it(tmp_path):
    splits = fm.load_embedded().head(32)
    cfg = replace(MINI, backbones=("bn_cnn",), seeds=(0,))
    results = run.run_paper(tmp_path, config=cfg, splits=splits, progress=lambda _: None)
    bb = results["backbones"]["bn_cnn"]
    assert bb["has_bn"]
    arms = set(bb["per_seed"][0]["per_corruption"]["contrast"]["corrupted"])
    assert {"paper", "paper_shipped_bn", "bn_only", "sig_only", "swap_only"} <= arms
    assert "sig_and_swap" not in arms  # it is the judged paper arm now
    labels = [r["arm"] for r in bb["controls"] if r["where"] == "contrast"]
    assert any("official BN route" in a for a in labels)
    assert any("shipped first-k robust BN statistics" in a and "(ours)" in a for a in labels)
    assert any("robust-BN swap alone" in a for a in labels)  # the null's row
    assert "This backbone has BatchNorm" in (tmp_path / "paper.md").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seeds": ()}, "at least one fine-tune seed"),
        ({"seeds": (0, 0)}, "distinct"),
        ({"seeds": (-1,)}, "non-negative"),
        (
            {"corruptions": ("fog", "contrast"), "transfer": "fog"},
            "pair must be two different corruptions",
        ),
        ({"pair": ("fog", "fog")}, "pair must be two different corruptions"),
        ({"transfer": "fog"}, "transfer corruption 'fog' is not among"),
        ({"severity": 6}, "severity must be an integer from 1 to 5"),
        ({"severity": 2.0}, "severity must be an integer from 1 to 5"),
        ({"corruptions": "gaussian_noise"}, "non-empty tuple of names"),
        ({"corruptions": ("gaussian_noise", "fgo")}, "unknown corruption 'fgo'"),
        ({"bits": 0}, "bits from 1 to 8"),
        ({"layers": 0}, "layers must be a positive integer"),
    ],
)
def test_bad_configs_are_refused_before_any_training(change, message):
    from robustpatch.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=message):
        replace(MINI, **change)


def test_bad_schedule_is_refused():
    from robustpatch.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="schedule.batch_size"):
        protocol.Schedule(batch_size=0)
    with pytest.raises(InvalidArgumentError, match="schedule.lr"):
        protocol.Schedule(lr=-0.1)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_cli_seeds_must_be_positive(value, capsys, tmp_path, monkeypatch):
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("run_paper reached with a bad --seeds")

    monkeypatch.setattr(run, "run_paper", must_not_run)
    with pytest.raises(SystemExit) as e:
        run.main(["--seeds", value, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err


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


def test_batchnorm_fidelity_row_names_the_route_the_bn_arms_take():
    from pathlib import Path

    import robustpatch

    root = Path(robustpatch.__file__).parent.parent
    point, official, ours, where = next(
        r for r in report.fidelity_rows(protocol.FULL, "embedded") if r[0] == "BatchNorm"
    )
    file, line = where.rsplit(":", 1)
    assert "def official_patch" in (root / file).read_text().splitlines()[int(line) - 1]
    # swap, then patch, then re-estimate: the official order, the one the code follows
    assert ours.index("swapped in") < ours.index("added") < ours.index("re-estimated")
    assert "(ours)" in ours and "statistics it ships, not re-estimated" in ours
    null = next(
        r for r in report.fidelity_rows(protocol.FULL, "embedded") if r[0] == "null control"
    )
    assert "same BN route" in null[2]
