"""robustpatch.lab.experiments (and the recipes they rest on) at a tiny size."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from robustpatch._format.safetensors import read_header  # noqa: E402
from robustpatch.lab import experiments as X  # noqa: E402
from robustpatch.lab import models, recipes  # noqa: E402
from robustpatch.signature import Signature  # noqa: E402

pytestmark = pytest.mark.torch

WIDTHS = (4, 8, 8)
CPU = torch.device("cpu")


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes: class 1 has a bright square; 32 px so corruptions apply."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.5
    x[y == 1, :, 8:24, 8:24] += 0.5
    return x, y


@pytest.fixture(scope="module")
def trio():
    """(task, pretrained state, clean model, robust model) trained in a few seconds."""
    x, y = _images(160, 0)
    xt, yt = _images(60, 1)
    task = X.Task("toy", x, y, xt, yt, bn_images=80)
    pre_model = models.SmallCNN(num_classes=2, widths=WIDTHS, seed=0)
    cfg = recipes.TrainConfig(epochs=1, lr=0.05, batch_size=32, milestones=[1])
    recipes.train(pre_model, x, y, cfg, device=CPU)
    pre = {k: v.clone() for k, v in pre_model.state_dict().items()}

    def finetune(transform):
        m = models.SmallCNN(num_classes=2, widths=WIDTHS, seed=0)
        m.load_state_dict(pre)
        return recipes.train(m, x, y, cfg, transform, device=CPU)

    clean = finetune(None)
    robust = finetune(recipes.corruption_transform("gaussian_noise"))
    return task, pre, clean, robust


def _arrays(trio):
    task, pre, clean, robust = trio
    return X.state_arrays(pre), X.state_arrays(clean), X.state_arrays(robust)


# ---------------------------------------------------------------------------- recipes


def test_transform_randomness_does_not_change_the_data_order():
    """A transform that draws random numbers but returns its input unchanged leaves the
    run bit-identical to one without a transform: clean and robust twins see the same
    batches in the same order."""
    x, y = _images(64, 0)
    cfg = recipes.TrainConfig(epochs=2, lr=0.05, batch_size=16, milestones=[1], seed=3)

    def draws(xb, gen):
        torch.rand(5, generator=gen)
        return xb

    a = recipes.train(models.SmallCNN(2, widths=WIDTHS, seed=0), x, y, cfg, None, CPU)
    b = recipes.train(models.SmallCNN(2, widths=WIDTHS, seed=0), x, y, cfg, draws, CPU)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_checkpoint_metadata_and_model_order(tmp_path):
    model = models.SmallCNN(num_classes=2, widths=WIDTHS, seed=0)
    cfg = recipes.TrainConfig(epochs=2)
    meta = recipes.checkpoint_metadata(
        recipe="corruption", dataset="digits32", corruption="fog", seed=4, config=cfg
    )
    path = recipes.save_checkpoint(model, tmp_path / "m.safetensors", **meta)
    # Tensors stay in model order (classifier last), which extract relies on.
    names = [t.name for t in read_header(path).tensors]
    assert names == list(model.state_dict())
    other = models.SmallCNN(num_classes=2, widths=WIDTHS, seed=1)
    got = recipes.load_checkpoint(other, path)
    assert got["recipe"] == "corruption" and got["dataset"] == "digits32"
    assert got["corruption"] == "fog" and got["seed"] == 4
    assert got["config"]["epochs"] == 2 and got["config"]["momentum"] == 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    clean_meta = recipes.checkpoint_metadata(recipe="clean", dataset="digits32", seed=0)
    assert clean_meta["corruption"] == "none"


def test_unlabeled_corrupted_pool_covers_corruptions_and_severities():
    x, _ = _images(50, 0)
    pool = recipes.unlabeled_corrupted(x, ["gaussian_noise", "contrast"], 40)
    assert pool.shape == (40, 3, 32, 32)
    again = recipes.unlabeled_corrupted(x, ["gaussian_noise", "contrast"], 40)
    assert torch.equal(pool, again)
    # First half noisy (differs from the source), second half lower contrast.
    assert not torch.equal(pool[:20], x[:20])
    assert pool[20:].std() < x[20:40].std()


# ---------------------------------------------------------------------------- layers


def test_layer_profile_coefficient_and_location():
    rs = np.random.RandomState(0)
    pre, clean, robust = {}, {}, {}
    for i, n in enumerate(["a.weight", "b.weight", "c.weight"]):
        p = rs.randn(4, 6).astype(np.float32)
        d = rs.randn(4, 6).astype(np.float32)
        o = rs.randn(4, 6).astype(np.float32)
        o -= (o.ravel() @ d.ravel()) / (d.ravel() @ d.ravel()) * d  # orthogonal to d
        scale = 3.0 if i == 0 else 0.3  # the first layer moves most
        pre[n], clean[n], robust[n] = p, p + d, p + 2 * d + scale * o
    pre["bn.running_mean"] = clean["bn.running_mean"] = robust["bn.running_mean"] = np.zeros(4)
    prof = X.layer_profile(pre, clean, robust)
    assert prof["layers"] == ["a.weight", "b.weight", "c.weight"]
    assert np.allclose(prof["coefficient"], 2.0, atol=1e-5)
    assert prof["largest_index"] == 0 and prof["largest_in_first_third"]
    assert abs(sum(prof["signature_energy_share"]) - 1) < 1e-9
    rd = np.linalg.norm(robust["a.weight"] - clean["a.weight"]) / np.linalg.norm(clean["a.weight"])
    assert prof["relative_difference"][0] == pytest.approx(rd, rel=1e-6)


def test_depth_units_budget_and_selection():
    model = models.SmallCNN(seed=0)  # default widths: about 73k parameters
    units = X.depth_units(model)
    assert len(units) == 7
    assert units[0].modules == ("features.0", "features.1")
    assert units[-1].modules == ("classifier",)
    assert sum(u.params for u in units) == sum(p.numel() for p in model.parameters())
    k = X.units_within(units, 0.25)
    assert k == 4 and X.param_fraction(units, k) <= 0.25 < X.param_fraction(units, k + 1)
    assert X.units_within(units, 0.0) == 1
    # By difference: the largest first, within the budget, returned in depth order.
    prof = {
        "layers": [f"{u.modules[0]}.weight" for u in units],
        "relative_difference": [0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.7],
    }
    chosen = X.units_by_difference(units, prof, 0.25)
    assert chosen[-1].modules == ("classifier",)  # big layers 5, 6 do not fit
    assert sum(u.params for u in chosen) <= 0.25 * sum(u.params for u in units)


def test_signature_of_units_is_orthogonal_to_the_clean_update(trio):
    P, C, R = _arrays(trio)
    units = X.depth_units(trio[2])
    sig = X.make_signature(P, C, R, units[:2])
    assert set(sig.deltas) == {
        "features.0.weight",
        "features.1.weight",
        "features.1.bias",
        "features.3.weight",
        "features.4.weight",
        "features.4.bias",
    }
    assert set(sig.bn) == {
        "features.1.running_mean",
        "features.1.running_var",
        "features.4.running_mean",
        "features.4.running_var",
    }
    for n, e in sig.deltas.items():
        d = (C[n] - P[n]).ravel().astype(np.float64)
        assert abs(e.dense().ravel() @ d) <= 1e-4 * np.linalg.norm(e.dense()) * np.linalg.norm(d)
    diff = X.make_signature(P, C, R, units[:2], method="difference")
    assert np.allclose(
        diff["features.0.weight"].dense(), R["features.0.weight"] - C["features.0.weight"]
    )


# ---------------------------------------------------------------------------- patching


def test_patch_arms_baselines_and_alpha_zero(trio):
    task, pre, clean, robust = trio
    P, C, R = _arrays(trio)
    units = X.depth_units(clean)
    sig = X.make_signature(P, C, R, units[:3])
    r = X.patch_arms(task, "gaussian_noise", clean, robust, {"s": sig})
    arms = r["arms"]
    assert set(arms) == {"clean", "bn_reestimation_only", "robust", "s|signature", "s|reestimate"}
    assert arms["clean"]["gain"] == 0 and arms["robust"]["recovered"] == pytest.approx(1.0)
    for v in arms.values():
        assert len(v["severity"]) == 5 and 0 <= v["mean"] <= 100
    # α = 0 with re-estimated statistics is BN re-estimation alone, number for number.
    sweep = X.alpha_sweep(task, "gaussian_noise", clean, sig, (0.0, 1.0), ("reestimate",))
    rows = sweep["policies"]["reestimate"]
    assert rows[0]["severity"] == arms["bn_reestimation_only"]["severity"]
    assert rows[1]["severity"] == arms["s|reestimate"]["severity"]
    # α = 0 with the shipped statistics is the clean model.
    zero = task.evaluate_patched(clean, sig, 0.0, "signature", "gaussian_noise")
    assert zero["severity"] == arms["clean"]["severity"]
    # A full patch of the difference with the robust statistics is the robust model.
    full = X.make_signature(P, C, R, None, method="difference")
    same = task.evaluate_patched(clean, full, 1.0, "signature", "gaussian_noise")
    assert np.allclose(same["severity"], arms["robust"]["severity"], atol=100 / 60 + 1e-9)


def test_depth_sweep_and_compression_rows(trio):
    task, pre, clean, robust = trio
    P, C, R = _arrays(trio)
    units = X.depth_units(clean)
    ds = X.depth_sweep(task, "gaussian_noise", P, C, R, clean, units, ks=[1, len(units)])
    assert [r["units"] for r in ds["rows"]] == [1, len(units)]
    assert ds["rows"][-1]["param_fraction"] == pytest.approx(1.0)
    sig = X.make_signature(P, C, R, units[:3])
    comp = X.compression(task, "gaussian_noise", clean, sig, (2, 4, 8), model_nbytes=40000)
    sizes = [r["nbytes"] for r in comp["rows"]]
    assert sizes == sorted(sizes) and sizes[-1] < comp["unquantized"]["nbytes"]
    for r in comp["rows"]:
        assert r["times_smaller"] == pytest.approx(40000 / r["nbytes"])
    assert json.dumps(comp)


def test_removal_is_exact_and_composition(trio):
    task, pre, clean, robust = trio
    P, C, R = _arrays(trio)
    units = X.depth_units(clean)
    a = X.make_signature(P, C, R, units[:2], name="a")
    b = X.make_signature(P, C, R, units[:2], method="difference", name="b")
    for sigs, alpha in ((a, 1.0), (a.quantize(3), 0.7), ([a, b], [1.0, 0.5])):
        r = X.removal_is_exact(clean, sigs, alpha)
        assert r["bit_exact"] and r["tensors_changed_by_apply"] > 0
    comp = X.composition(task, "gaussian_noise", "contrast", clean, a, b, ("reestimate",))
    rows = comp["policies"]["reestimate"]
    assert set(rows) == {"gaussian_noise", "contrast"}
    for row in rows.values():
        assert row["sum_gain"] == pytest.approx(row["sum_mean"] - row["clean_mean"])
        if row["alone_gain"] > 0:
            assert row["kept"] == pytest.approx(row["sum_gain"] / row["alone_gain"])


def test_transfer_ratio_is_gain_over_robust_gain(trio):
    task, pre, clean, robust = trio
    P, C, R = _arrays(trio)
    sig = X.make_signature(P, C, R, X.depth_units(clean)[:2])
    t = X.transfer(task, "gaussian_noise", clean, robust, sig, policies=("reestimate",))
    a = t["arms"]
    expected = (a["transfer|reestimate"]["mean"] - a["clean"]["mean"]) / (
        a["robust"]["mean"] - a["clean"]["mean"]
    )
    assert t["ratio"]["reestimate"] == pytest.approx(expected)


# ---------------------------------------------------------------------------- similarity


def test_similarity_nearest_and_detection():
    rs = np.random.RandomState(1)
    base = {k: rs.randn(8, 8).astype(np.float32) for k in ("fog", "noise", "blur")}
    lib = {k: Signature.from_deltas({"w": v}, name=k) for k, v in base.items()}
    twin = {
        f"{k}/s1": Signature.from_deltas({"w": v + 0.3 * rs.randn(8, 8).astype(np.float32)})
        for k, v in base.items()
    }
    sim = X.similarity_matrix({**{f"{k}/s0": s for k, s in lib.items()}, **twin})
    near = X.nearest(sim)
    for k in base:
        assert near[f"{k}/s0"]["nearest"] == f"{k}/s1"
    queries = {k: {"w": 2 * v + 0.5 * rs.randn(8, 8).astype(np.float32)} for k, v in base.items()}
    det = X.detection(queries, lib)
    assert det["accuracy"] == 1.0 and det["queries"]["fog"]["predicted"] == "fog"


def test_non_decreasing():
    assert X.non_decreasing([10, 12, 11.5, 13], 1.0)
    assert not X.non_decreasing([10, 12, 10.5, 13], 1.0)
    assert X.non_decreasing([], 1.0)


def test_plots_write_pngs(trio, tmp_path):
    task, pre, clean, robust = trio
    P, C, R = _arrays(trio)
    units = X.depth_units(clean)
    sig = X.make_signature(P, C, R, units[:2], name="gaussian_noise")
    arms = X.patch_arms(task, "gaussian_noise", clean, robust, {"shallow": sig}, ("reestimate",))
    res = {"gaussian_noise": arms}
    prof = {"gaussian_noise": X.layer_profile(P, C, R)}
    depth = {"gaussian_noise": X.depth_sweep(task, "gaussian_noise", P, C, R, clean, units, [1])}
    alpha = {
        "gaussian_noise": X.alpha_sweep(task, "gaussian_noise", clean, sig, (0, 1), ("reestimate",))
    }
    comp = {
        "gaussian_noise": X.compression(task, "gaussian_noise", clean, sig, (4,), model_nbytes=1)
    }
    sim = X.similarity_matrix({"a": sig, "b": sig * 0.5})
    pair = [X.composition(task, "gaussian_noise", "contrast", clean, sig, sig, ("reestimate",))]
    tr = {
        "gaussian_noise": X.transfer(
            task, "gaussian_noise", clean, robust, sig, sig, ("reestimate",)
        )
    }
    paths = [
        X.plot_patch_arms(res, tmp_path / "arms.png", ["clean", "shallow|reestimate"]),
        X.plot_layer_profile(prof, tmp_path / "layers.png"),
        X.plot_depth_sweep(depth, tmp_path / "depth.png", 0.25),
        X.plot_alpha_sweep(alpha, tmp_path / "alpha.png"),
        X.plot_compression(comp, tmp_path / "comp.png"),
        X.plot_similarity(sim, tmp_path / "sim.png"),
        X.plot_composition(pair, tmp_path / "pair.png"),
        X.plot_transfer(tr, tmp_path / "transfer.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
