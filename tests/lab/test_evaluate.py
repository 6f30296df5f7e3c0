"""robustpatch.lab.evaluate: mCE arithmetic, end-to-end evaluation, FGSM / PGD."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from robustpatch.lab import evaluate as E  # noqa: E402
from robustpatch.lab.datasets import load_digits32  # noqa: E402

pytestmark = pytest.mark.torch


def test_mce_against_alexnet():
    # AlexNet itself scores exactly 1 (100%)
    errs = {name: [e] * 5 for name, e in E.ALEXNET_ERRORS.items()}
    res = E.mean_corruption_error(errs)
    assert res["mCE"] == pytest.approx(1.0)
    # half AlexNet's error on one corruption, AlexNet's on the rest
    errs["fog"] = [E.ALEXNET_ERRORS["fog"] / 2] * 5
    res = E.mean_corruption_error(errs)
    assert res["CE"]["fog"] == pytest.approx(0.5)
    assert res["mCE"] == pytest.approx((14 + 0.5) / 15)
    # per-severity baseline: sum over severities / sum over severities
    res = E.mean_corruption_error(
        {"fog": [0.1, 0.2, 0.3, 0.4, 0.5]}, {"fog": [0.2, 0.2, 0.4, 0.4, 0.8]}
    )
    assert res["mCE"] == pytest.approx(1.5 / 2.0)
    with pytest.raises(KeyError):
        E.mean_corruption_error({"speckle_noise": [0.5] * 5})


def test_relative_mce():
    base = {"fog": 0.6, "snow": [0.5, 0.6, 0.7, 0.8, 0.9]}
    errs = {"fog": [0.3] * 5, "snow": [0.2, 0.3, 0.4, 0.5, 0.6]}
    res = E.relative_mean_corruption_error(errs, 0.1, base, 0.4)
    assert res["relative_CE"]["fog"] == pytest.approx((0.3 - 0.1) / (0.6 - 0.4))
    assert res["relative_CE"]["snow"] == pytest.approx((2.0 - 0.5) / (3.5 - 2.0))
    assert res["relative_mCE"] == pytest.approx((1.0 + 1.0) / 2)
    res = E.relative_mean_corruption_error(
        {n: [e] * 5 for n, e in E.ALEXNET_ERRORS.items()},
        E.ALEXNET_CLEAN_ERROR,
        E.ALEXNET_ERRORS,
        E.ALEXNET_CLEAN_ERROR,
    )
    assert res["relative_mCE"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def digits_test(lab_cache):
    return load_digits32("test", cache=lab_cache).tensors()


def test_end_to_end_train_evaluate_json_heatmap(trained_digits, digits_test, tmp_path):
    model, clean_acc, _ = trained_digits
    x, y = digits_test
    names = ["gaussian_noise", "defocus_blur", "contrast"]
    res = E.evaluate_corruptions(
        model, x, y, tmp_path / "out", E.CorruptionGrid(names, device="cpu")
    )
    saved = json.loads((tmp_path / "out" / "corruptions.json").read_text())
    assert saved["clean"] == pytest.approx(clean_acc)
    assert set(saved["accuracy"]) == set(names)
    for name in names:
        assert sorted(saved["accuracy"][name]) == ["1", "2", "3", "4", "5"]
        for v in saved["accuracy"][name].values():
            assert 0.0 <= v <= 1.0
    noise = [saved["accuracy"]["gaussian_noise"][str(s)] for s in range(1, 6)]
    print(f"\nclean {clean_acc:.3f}; gaussian noise by severity: {noise}")
    # noise accuracy falls as severity rises (2 of 359 images slack between neighbours);
    # severity 1 minus 5 on training seeds 0-4: 0.33, 0.23, 0.28, 0.48, 0.67
    assert all(b <= a + 2 / len(y) for a, b in zip(noise, noise[1:])), noise
    assert noise[-1] < noise[0] - 0.02
    assert saved["mCE"]["mCE"] > 0 and set(saved["mCE"]["CE"]) == set(names)
    png = (tmp_path / "out" / "corruptions.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert res["files"]["heatmap"].endswith("corruptions.png")
    # reproducible
    again = E.corruption_accuracy(model, x, y, E.CorruptionGrid(names[:1], device="cpu"))
    assert again["accuracy"]["gaussian_noise"] == saved["accuracy"]["gaussian_noise"]


def test_pgd_fgsm_clean_ordering_and_budget(trained_digits, digits_test):
    model, _, _ = trained_digits
    x, y = digits_test
    x, y = x[:200], y[:200]
    eps = 0.1
    clean = E.accuracy(model, x, y, device="cpu")
    fgsm = E.robust_accuracy(model, x, y, attack="fgsm", eps=eps, device="cpu")
    pgd = E.robust_accuracy(model, x, y, attack="pgd", eps=eps, steps=10, device="cpu")
    print(f"\nclean {clean:.3f}  FGSM {fgsm:.3f}  PGD {pgd:.3f}  (eps {eps})")
    # Training seeds 0-4: clean 0.995, 0.995, 0.990, 0.995, 0.985; FGSM 0.175, 0.10, 0.01,
    # 0.12, 0.135; PGD 0.0 on all five.
    assert pgd <= fgsm <= clean
    assert pgd < clean - 0.05  # the attack does something
    xf = x.float() / 255
    for adv in (
        E.fgsm(model, x, y, eps, device="cpu"),
        E.pgd_linf(model, x, y, eps, steps=5, device="cpu"),
        E.pgd_linf(model, x, y, eps, steps=3, random_start=False, device="cpu"),
    ):
        assert adv.shape == xf.shape and adv.dtype == torch.float32
        assert float((adv - xf).abs().max()) <= eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    zero = E.pgd_linf(model, x[:8], y[:8], 0.0, device="cpu")
    assert torch.equal(zero, xf[:8])
    assert model.training is False


def _tiny_net_and_batch():
    from robustpatch.lab.models import SmallCNN

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=gen)
    return SmallCNN(10, widths=(4, 4, 4), seed=0), x, torch.tensor([0, 1, 2, 3])


def test_attacks_run_inside_no_grad_as_outside():
    # evaluation code is often wrapped in torch.no_grad(); the attacks need input gradients
    net, x, y = _tiny_net_and_batch()
    outside = (E.fgsm(net, x, y, 0.05), E.pgd_linf(net, x, y, 0.05, steps=2))
    with torch.no_grad():
        inside = (E.fgsm(net, x, y, 0.05), E.pgd_linf(net, x, y, 0.05, steps=2))
        acc = E.robust_accuracy(net, x, y, attack="pgd", eps=0.05, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(outside, inside))
    assert acc == E.robust_accuracy(net, x, y, attack="pgd", eps=0.05, steps=2)
    assert not torch.is_grad_enabled() or all(p.grad is None for p in net.parameters())


def test_attacks_refuse_inference_mode_with_a_clear_error():
    net, x, y = _tiny_net_and_batch()
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="outside torch.inference_mode"):
            E.fgsm(net, x, y, 0.05)
    with torch.inference_mode():
        frozen = x.clone()  # an inference tensor, attacked outside inference mode
    assert E.fgsm(net, frozen, y, 0.05).shape == x.shape


def test_predict_accuracy_and_errors(trained_digits, digits_test):
    model, acc, _ = trained_digits
    x, y = digits_test
    assert E.accuracy(model, x, y, batch_size=50, device="cpu") == pytest.approx(acc)
    assert E.predict(model, x[:7], device="cpu").shape == (7,)
    with pytest.raises(ValueError):
        E.corruption_accuracy(model, x[:4], y[:4], E.CorruptionGrid(["fog"], [6], device="cpu"))
    with pytest.raises(ValueError):
        E.robust_accuracy(model, x[:4], y[:4], attack="cw", device="cpu")
    errs = E.corruption_errors({"accuracy": {"fog": {"1": 0.9, "2": 0.8}}})
    assert errs == {"fog": [pytest.approx(0.1), pytest.approx(0.2)]}


def test_default_device():
    from robustpatch.lab.models import default_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device().type == expected
    assert default_device("cpu").type == "cpu"
