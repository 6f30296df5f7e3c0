"""The paper's protocol steps: the official (α/n)² scaling, the controls, the recipe."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from robustpatch.lab.backbones.vgg import PAPER_LAYERS, VGGNoBN, conv_weight_names  # noqa: E402
from robustpatch.lab.models import SmallCNN  # noqa: E402
from robustpatch.lab.paper import arms, bn, controls  # noqa: E402
from robustpatch.lab.paper import protocol as P  # noqa: E402
from robustpatch.lab.recipes import reestimate_bn  # noqa: E402
from robustpatch.lab.training import accuracy  # noqa: E402


def _moved(model, seed: int, scale: float):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


@pytest.fixture(scope="module")
def trio():
    pre = VGGNoBN(5, seed=0)
    clean = _moved(pre, 1, 0.05)
    return pre, clean, [_moved(clean, 2, 0.05), _moved(clean, 3, 0.05)]


def test_official_alphas_are_alpha_over_n_squared():
    assert P.official_alphas([1.0, 1.0]) == [0.25, 0.25]
    assert P.official_alphas([2.0, 1.0, 3.0]) == pytest.approx([4 / 9, 1 / 9, 1.0])
    assert P.official_alphas([0.5]) == [0.25]


@pytest.mark.parametrize("alphas", [[1.0], [1.0, 1.0], [2.0, 0.5]])
def test_patch_with_official_alphas_equals_the_official_route(trio, alphas):
    pre, clean, robusts = trio
    robusts = robusts[: len(alphas)]
    sigs = [P.extract_paper(pre, clean, r, PAPER_LAYERS) for r in robusts]
    names = sorted(sigs[0].deltas)
    ours = P.patched_copy(clean, sigs, P.official_alphas(alphas)).state_dict()
    reference = P.official_patch_reference(pre, clean, robusts, alphas, names)
    linear = P.patched_copy(clean, sigs, alphas).state_dict()
    for n in names:
        np.testing.assert_allclose(ours[n].numpy(), reference[n], rtol=0, atol=1e-6)
    if alphas != [1.0]:  # linear α differs from the official strength
        assert max(np.abs(linear[n].numpy() - reference[n]).max() for n in names) > 1e-3


def test_paper_signature_is_the_first_k_conv_tensors_and_biases(trio):
    pre, clean, robusts = trio
    sig = P.extract_paper(pre, clean, robusts[0], PAPER_LAYERS)
    convs = conv_weight_names(clean)[:PAPER_LAYERS]
    assert sorted(sig.deltas) == sorted(convs + [c.replace("weight", "bias") for c in convs])
    assert set(P.coefficients(sig)) == set(sig.deltas)


def test_random_direction_keeps_each_tensor_norm_not_its_direction(trio):
    pre, clean, robusts = trio
    sig = P.extract_paper(pre, clean, robusts[0], PAPER_LAYERS)
    null = controls.random_direction(sig, seed=0)
    assert sorted(null.deltas) == sorted(sig.deltas)
    for n, e in sig.deltas.items():
        a, b = e.dense().ravel(), null[n].dense().ravel()
        assert np.linalg.norm(b) == pytest.approx(np.linalg.norm(a), rel=1e-5)
        if a.size > 100:
            assert abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)) < 0.5
    again = controls.random_direction(sig, seed=0)
    assert all(np.array_equal(again[n].dense(), null[n].dense()) for n in sig.deltas)


def test_per_tensor_linear_quantization_has_one_scale_per_tensor(trio):
    pre, clean, robusts = trio
    sig = P.extract_paper(pre, clean, robusts[0], PAPER_LAYERS)
    q = P.quantize_official(sig, 4)
    for e in q.deltas.values():
        assert e.quant.granularity == "tensor" and e.quant.scale.size == 1
    assert P.quantize_ours(sig, 4)[conv_weight_names(clean)[2]].quant.granularity == "group"


def test_robust_bn_swap_takes_the_robust_affine_and_reestimates_statistics():
    clean = SmallCNN(5, seed=0)
    robust = _moved(clean, 4, 0.1)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    swapped = controls.robust_bn_swap(clean, robust, images)
    bn = "features.1"
    for p in ("weight", "bias"):
        assert torch.equal(swapped.state_dict()[f"{bn}.{p}"], robust.state_dict()[f"{bn}.{p}"])
    conv = "features.0.weight"
    assert torch.equal(swapped.state_dict()[conv], clean.state_dict()[conv])
    fresh = controls.bn_only(clean, images).state_dict()[f"{bn}.running_mean"]
    assert not torch.equal(fresh, clean.state_dict()[f"{bn}.running_mean"])
    assert controls.has_bn(clean) and not controls.has_bn(VGGNoBN(5))


def test_deltas_only_drops_the_batchnorm_replacements():
    pre = SmallCNN(5, seed=0)
    clean, robust = _moved(pre, 5, 0.05), _moved(pre, 6, 0.05)
    with torch.no_grad():
        robust.features[1].running_mean.add_(1.0)
    sig = P.extract_paper(pre, clean, robust, 2)
    assert sig.bn and not controls.deltas_only(sig).bn
    assert sorted(controls.deltas_only(sig).deltas) == sorted(sig.deltas)


@pytest.fixture(scope="module")
def bn_trio():
    """A BN CNN pretrained start, clean and robust twins whose BN affine, statistics and
    conv weights all differ, and corrupted-looking images to re-estimate on."""
    pre = SmallCNN(5, seed=0)
    clean, robust = _moved(pre, 5, 0.05), _moved(pre, 6, 0.05)
    with torch.no_grad():
        for m in robust.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(0.5)
                m.running_var.mul_(2.0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=_gen(7))
    return pre, clean, robust, images


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bn_stats(model) -> dict:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    }


def _assert_bn_route(model, clean, robust, images, weights: set[str]) -> None:
    """``model`` is the official route: every BN affine tensor the robust twin's, the
    weights outside BN the clean model's except ``weights``, and BN statistics those of
    its own final weights (re-estimating again changes nothing)."""
    state, c, r = model.state_dict(), clean.state_dict(), robust.state_dict()
    norms = bn.bn_modules(clean)
    for k, v in state.items():
        module, leaf = k.rsplit(".", 1)
        if module in norms and leaf in ("weight", "bias"):
            assert torch.equal(v, r[k]), k
        elif k.endswith(("weight", "bias")) and k not in weights:
            assert torch.equal(v, c[k]), k
    again = _bn_stats(reestimate_bn(copy.deepcopy(model), images))
    for k, v in _bn_stats(model).items():
        torch.testing.assert_close(v, again[k], rtol=1e-5, atol=1e-6, msg=k)


def test_official_route_reestimates_bn_after_the_weights_change(bn_trio):
    # model_patching.py: decompose (robust BN swapped in, signature added), then bn_update
    pre, clean, robust, images = bn_trio
    sig = P.extract_paper(pre, clean, robust, 2)
    weights = bn.weight_deltas(sig, clean)
    assert sorted(weights.deltas) == ["features.0.weight", "features.3.weight"]
    model = bn.official_patch(clean, [bn.bn_state(robust)], [sig], [1.0], images)
    _assert_bn_route(model, clean, robust, images, set(weights.deltas))
    for k in weights.deltas:
        assert not torch.equal(model.state_dict()[k], clean.state_dict()[k])
    # the other order (re-estimate, then patch) leaves statistics stale for the weights
    stale = P.patched_copy(controls.robust_bn_swap(clean, robust, images), weights, 1.0)
    late = _bn_stats(model)
    assert any(not torch.allclose(v, late[k], atol=1e-4) for k, v in _bn_stats(stale).items())


def test_official_route_of_a_sum_swaps_in_the_mean_of_the_robust_bn(bn_trio):
    pre, clean, robust, images = bn_trio
    other = _moved(robust, 8, 0.05)
    states = [bn.bn_state(robust), bn.bn_state(other)]
    model = bn.swap_bn(clean, states)
    w = "features.4.weight"
    expected = (robust.state_dict()[w] + other.state_dict()[w]) / 2
    torch.testing.assert_close(model.state_dict()[w], expected)
    with pytest.raises(ValueError, match="at least one"):
        bn.swap_bn(clean, [])


def test_every_signature_arm_and_the_null_take_the_official_bn_route(bn_trio):
    pre, clean, robust, images = bn_trio
    ctx = arms._Ctx(pre, None, None, P.QUICK, torch.device("cpu"), 2, 6)
    patch = arms._patcher(clean, [bn.bn_state(robust)], images)
    models, sigs = arms._patch_models(ctx, clean, robust, 0, patch)
    assert set(sigs) <= set(models)
    for name in sigs:  # paper (judged), full, difference, null, both quantized
        applied = set(bn.weight_deltas(sigs[name], clean).deltas)
        _assert_bn_route(models[name], clean, robust, images, applied)
    beside = arms._bn_models(clean, robust, sigs["paper"], images)
    assert set(beside) == {"paper_shipped_bn", "bn_only", "sig_only", "swap_only"}
    shipped = beside["paper_shipped_bn"].state_dict()  # ours: first-k stats as shipped
    for k, e in sigs["paper"].bn.items():
        np.testing.assert_array_equal(shipped[k].numpy(), e.dense())
    last_bn = "features.18.running_mean"  # beyond the first k: the clean model's
    assert torch.equal(shipped[last_bn], clean.state_dict()[last_bn])


def test_route_size_counts_weight_deltas_and_the_robust_bn_affine(bn_trio):
    pre, clean, robust, _ = bn_trio
    sig = P.quantize_official(P.extract_paper(pre, clean, robust, 2), 4)
    affine = sum(4 * (m.weight.numel() + m.bias.numel()) for m in bn.bn_modules(clean).values())
    assert bn.route_nbytes(sig, clean) == bn.weight_deltas(sig, clean).nbytes + affine
    assert affine == 4 * 2 * (16 + 16 + 32 + 32 + 64 + 64)  # every BN layer, not the first k


def test_without_batchnorm_signatures_are_applied_plainly(trio):
    pre, clean, robusts = trio
    patch = arms._patcher(clean, None, torch.zeros(0))
    sig = P.extract_paper(pre, clean, robusts[0], PAPER_LAYERS)
    a, b = patch([sig], [1.0]).state_dict(), P.patched_copy(clean, sig, 1.0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_best_ends_on_the_best_validation_checkpoint():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 5, (96,), generator=gen)
    model = VGGNoBN(5, seed=0)
    cfg = P.recipe(3, 0, P.QUICK, lr=0.05)
    info = P.fit_best(model, x, y, cfg, (x[:48], y[:48]), torch.device("cpu"))
    assert 0 <= info["epoch"] < 3
    assert accuracy(model, x[:48], y[:48]) == info["val_accuracy"]


def test_recipe_is_the_official_one_scaled_to_the_epochs():
    cfg = P.recipe(50, 7, P.QUICK)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == (0.01, 0.9, 5e-4, 128)
    assert cfg.milestones == [20, 40] and cfg.gamma == 0.1 and cfg.seed == 7


def test_crop_flip_is_seeded_and_keeps_the_shape():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = P.crop_flip(x, torch.Generator().manual_seed(1))
    b = P.crop_flip(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert not torch.equal(a, x)
