"""The paper's protocol steps: the official (α/n)² scaling, the controls, the recipe."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from robustpatch.lab.backbones.vgg import PAPER_LAYERS, VGGNoBN, conv_weight_names  # noqa: E402
from robustpatch.lab.models import SmallCNN  # noqa: E402
from robustpatch.lab.paper import controls  # noqa: E402
from robustpatch.lab.paper import protocol as P  # noqa: E402
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
