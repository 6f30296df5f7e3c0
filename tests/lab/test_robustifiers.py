"""robustpatch.lab.robustifiers: the three papers' robustifiers and the comparison table.

Sizes are small (8-16-32 / 16-32-64 CNNs, a few hundred to two thousand 32-px images, 2-3
epochs) and seeds fixed; every property below held with a wide margin at these sizes (see
docs/robustifiers.md for the measured numbers).
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from robustpatch.lab import recipes  # noqa: E402
from robustpatch.lab import robustifiers as R  # noqa: E402
from robustpatch.lab.models import SmallCNN  # noqa: E402
from robustpatch.lab.recipes import TrainConfig  # noqa: E402

pytestmark = pytest.mark.torch

# The studies' seed (data subsets, initialisation, data order). Their margins hold on seeds
# 0-4, measured as noted beside each.
SEED = 0


def _ft(epochs: int, lr: float = 0.05) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, lr=lr, batch_size=64, milestones=[max(epochs - 1, 1)], seed=SEED
    )


# ------------------------------------------------------------------------ building blocks


def test_pgd_maximize_stays_in_the_ball_and_increases_the_objective():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 8, 8, generator=gen)
    w = torch.randn(3 * 8 * 8, generator=gen)

    def objective(a):
        return (a.flatten(1) @ w).sum()

    adv = R.pgd_maximize(objective, x, 4 / 255, 5, generator=gen)
    assert (adv - x).abs().max() <= 4 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert objective(adv) > objective(x)
    assert torch.equal(R.pgd_maximize(objective, x, 0.0, 5), x)


def test_train_with_loss_follows_recipes_train_batch_for_batch():
    x = torch.rand(96, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(96) % 10
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=32, milestones=[1])
    a = SmallCNN(10, widths=(4, 4, 4), seed=3)
    b = SmallCNN(10, widths=(4, 4, 4), seed=3)
    recipes.train(a, x, y, cfg, device=torch.device("cpu"))
    R.train_with_loss(b, x, y, cfg, R.cross_entropy_loss(), device="cpu")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_partial_training_leaves_frozen_parameters_bit_identical():
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.arange(64) % 10
    model = SmallCNN(10, widths=(4, 4, 4), seed=0)
    names = R.select_parameters(model, ["norm"], x[:2])
    assert names and all(n.startswith("features.") for n in names)
    before = {k: v.clone() for k, v in model.named_parameters()}
    named = dict(model.named_parameters())
    R.train_with_loss(
        model, x, y, _ft(1), R.cross_entropy_loss(), params=[named[n] for n in names], device="cpu"
    )
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in names), n
        assert p.requires_grad  # restored
    first = R.select_parameters(model, ["first:1"], x[:2])
    assert first == ["features.0.weight", "features.1.weight", "features.1.bias"]
    assert R.select_parameters(model, ["head"]) == ["classifier.weight", "classifier.bias"]
    with pytest.raises(ValueError):
        R.select_parameters(model, ["nothing\\.matches"])


def test_augmix_and_domains_are_deterministic_images():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = R.augmix(x, torch.Generator().manual_seed(5))
    b = R.augmix(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    u8 = (x * 255).to(torch.uint8)
    for name in R.DOMAINS:
        d = R.render_domain(u8, name, seed=1)
        assert d.dtype == torch.uint8 and d.shape == u8.shape
        assert torch.equal(d, R.render_domain(u8, name, seed=1))
    assert torch.equal(R.render_domain(u8, "inverted"), 255 - u8)
    with pytest.raises(ValueError):
        R.render_domain(u8, "sepia")


@pytest.mark.parametrize("space", ["feature", "input"])
def test_adversarial_head_trains_only_the_head_of_a_copy(space):
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    y = torch.arange(64) % 10
    teacher = SmallCNN(10, widths=(4, 4, 4), seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = R.HeadConfig(space=space, epochs=2, steps=2, eps=0.1 if space == "feature" else 4 / 255)
    robust = R.adversarial_head(teacher, x, y, cfg, device="cpu")
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # the original is untouched
    for k, v in robust.state_dict().items():
        assert torch.equal(v, before[k]) == (not k.startswith("classifier.")), k


# ------------------------------------------------------------------------ the three papers


def test_discrepancy_mitigation_beats_plain_finetuning_under_pgd():
    cfg = R.TransferConfig(
        widths=(8, 16, 32),
        source_images=1000,
        pretrain=_ft(2),
        finetune=_ft(3),
        discrepancy=R.DiscrepancyConfig(beta=1.0, eps=8 / 255, steps=2),
        starts=("pretrained",),
        test_images=300,
        eval_eps=8 / 255,
        eval_steps=10,
        seed=SEED,
    )
    r = R.nonrobustness_transfer(cfg, device="cpu")
    plain, disc = r["models"]["pretrained"], r["models"]["pretrained+discrepancy"]
    # Same start, same data order: only the regulariser differs. Discrepancy minus plain,
    # seeds 0-4: PGD +73.0, +64.7, +49.3, +69.3, +47.0; FGSM +53.7, +34.3, +25.7, +42.0,
    # +18.0; clean -2.0, -13.3, -11.0, -7.7, 0.0. Plain clean: 92.7, 94.3, 94.0, 93.7, 89.3.
    assert disc["pgd"] > plain["pgd"] + 20, (plain, disc)
    assert disc["fgsm"] > plain["fgsm"]
    assert plain["clean"] > 80 and disc["clean"] > plain["clean"] - 25, (plain, disc)
    json.dumps(r)


def test_daft_student_beats_plain_distillation_and_keeps_up_with_erm_held_out():
    cfg = R.DomainConfig(
        domains=("clean", "tinted", "noise", "blur"),
        held_out=("blur",),
        images_per_domain=600,
        test_images=300,
        daft=R.DAFTConfig(
            teacher_widths=(16, 32, 64),
            student_widths=(8, 16, 32),
            teacher=_ft(3),
            head=R.HeadConfig(epochs=10, seed=SEED),
            student=_ft(3),
        ),
        seed=SEED,
    )
    r = R.domain_generalization(cfg, device="cpu")
    row = r["held_out"]["blur"]
    daft = row["daft"]["held_out"]
    # DAFT minus plain distillation from the same teacher, seeds 0-4: +20.0, +7.0, +16.7,
    # +9.0, +17.0. Minus ERM: +20.7, +5.3, +2.0, +3.7, +15.3 -- too close to call "beats"
    # at this size, so ERM only bounds it from below.
    assert daft > row["distill"]["held_out"], row
    assert daft >= row["erm"]["held_out"] - 3, row
    assert r["average"]["daft"] == row["daft"]["held_out"]
    json.dumps(r)


def test_small_teacher_tuning_raises_corruption_accuracy_cheaply():
    cfg = R.SmallTeacherConfig(
        large_widths=(16, 32, 64),
        small_widths=(8, 16, 32),
        pretrain_images=1000,
        pretrain_epochs=2,
        finetune=_ft(3),
        teacher=_ft(3),
        partial=R.PartialTuneConfig(train=_ft(2, lr=0.02)),
        severities=(1, 3, 5),
        test_images=300,
        transfer_images=500,
        seed=SEED,
    )
    r = R.small_teacher_study(cfg, device="cpu")
    m = r["models"]
    partial, large = m["large_partial"], m["large_clean"]
    # partial minus large, seeds 0-4 (torch 2.15, 1 thread): corruption +17.9, +13.1, +17.3,
    # +9.0, +16.9; clean -1.0, -1.3, -3.7, -3.7, +0.3; transfer +6.8, +1.2, +10.8, +12.8, -0.2.
    assert partial["corruption"] > large["corruption"] + 4, m
    # Kept: clean accuracy and linear-probe transfer accuracy of the large model.
    assert partial["clean"] >= large["clean"] - 8, m
    assert partial["transfer"] >= large["transfer"] - 8, m
    # Cheaper than fully fine-tuning the large model robustly: the full run takes the same
    # optimizer steps (``full`` None reuses partial's TrainConfig), each updating every
    # parameter, against a fifth or fewer here. Counted on the model, not timed.
    assert r["config"]["full"] is None
    sizes = {n: p.numel() for n, p in SmallCNN(10, widths=cfg.large_widths).named_parameters()}
    assert r["partial"]["total_params"] == sum(sizes.values())
    assert r["partial"]["tuned_params"] == sum(sizes[n] for n in r["partial"]["tuned"])
    assert r["partial"]["fraction"] <= 0.20
    json.dumps(r)


# ------------------------------------------------------------------------ the comparison


def test_tiny_comparison_has_every_row_and_column_and_signature_gains(tmp_path):
    from robustpatch.signature import Signature

    results = R.compare_methods(R.ComparisonConfig.tiny(), device="cpu", out=tmp_path)
    assert list(results["rows"]) == list(R.METHODS)
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved == json.loads(json.dumps(results))
    md = (tmp_path / "comparison.md").read_text()
    assert md == R.comparison_markdown(results)
    for header in R.COLUMNS.values():
        assert header in md
    for name, row in results["rows"].items():
        assert f"| {R.METHODS[name]} |" in md
        for key in R.COLUMNS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (name, key)
        twin = results["baselines"][row["twin"]]
        for method, prefix in (("projection", "patched"), ("difference", "difference")):
            sig = row["signatures"][method]
            # The signature file exists, is what the table reports, and is 4-bit group-128.
            path = tmp_path / f"{name}.{method}.rws"
            key = "signature_bytes" if method == "projection" else "difference_bytes"
            assert path.stat().st_size == sig["file_bytes"] == row[key]
            meta = Signature.load(path).meta["quantization"]
            assert (meta["bits"], meta["granularity"], meta["group"]) == (4, "group", 128)
            # The gain in the table is the patched clean twin minus the clean twin.
            gain = sig["patched"]["corruption_accuracy"] - twin["corruption_accuracy"]
            assert row[f"{prefix}_corruption_gain"] == pytest.approx(gain)
            pgd = sig["patched"]["pgd_accuracy"] - twin["pgd_accuracy"]
            assert row[f"{prefix}_pgd_gain"] == pytest.approx(pgd)
        # A difference signature covering every changed tensor turns the clean twin into the
        # robust model up to 4-bit rounding: its corruption accuracy comes back. Patched
        # minus robust over the five rows, seeds 0-4: 24 of 25 within 2.5 points, one -4.0.
        layers = row["signatures"]["difference"]["layers"]
        if layers.get("mode") == "names" or layers.get("units") == layers.get("of"):
            patched = row["signatures"]["difference"]["patched"]["corruption_accuracy"]
            assert abs(patched - row["corruption_accuracy"]) <= 8, (name, patched, row)
    st = results["rows"]["small_teacher"]["details"]
    assert st["tuned_fraction"] <= 0.20
