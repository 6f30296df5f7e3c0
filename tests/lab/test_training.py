"""robustpatch.lab.training: the one loop and the helpers every trainer shares."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from torch import nn  # noqa: E402

from robustpatch.lab import models, recipes, training  # noqa: E402
from robustpatch.lab import robustifiers as R  # noqa: E402


class _Constant(nn.Module):
    """Predicts class 0 for every image."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), 2)


def test_accuracy_is_counted_exactly():
    x = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    y = torch.tensor([0, 1, 1])
    # 1/3 exactly, not the float32 mean 0.3333333432674408.
    assert training.accuracy(_Constant(), x, y, device="cpu") == 1 / 3
    with pytest.raises(ValueError, match="no images"):
        training.accuracy(_Constant(), x[:0], y[:0], device="cpu")


def _data(n: int = 40):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("per_batch", [False, True])
def test_the_schedule_steps_per_epoch_or_per_batch(per_batch):
    x, y = _data()
    steps = []

    def optimizer(params, config, batches):
        opt = torch.optim.SGD(params, lr=config.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: steps.append(i) or 1.0)
        return opt, sched, per_batch

    config = training.TrainConfig(epochs=2, batch_size=16, lr=0.01)
    training.train(models.SmallCNN(seed=0), x, y, config, device="cpu", optimizer=optimizer)
    batches = 3  # 40 images in batches of 16
    # LambdaLR calls the lambda once when built, then once per scheduler step.
    assert len(steps) - 1 == (config.epochs * batches if per_batch else config.epochs)


def test_recipes_robustifiers_and_fit_share_the_loop():
    """recipes.train and the robustifiers' trainer are the loop itself (same weights, bit for
    bit); fit is the loop with AdamW, one-cycle and one generator for order and augmentation."""
    x, y = _data()
    config = training.TrainConfig(epochs=2, batch_size=16, lr=0.05, milestones=[1])
    a, b = models.SmallCNN(seed=0), models.SmallCNN(seed=0)
    recipes.train(a, x, y, config, device=torch.device("cpu"))
    R.train_with_loss(b, x, y, config, R.cross_entropy_loss(), device="cpu")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name

    c, d = models.SmallCNN(seed=0), models.SmallCNN(seed=0)
    history = models.fit(c, x, y, epochs=2, batch_size=16, lr=3e-3, seed=5, device="cpu")
    gen = torch.Generator().manual_seed(5)
    fit_config = training.TrainConfig(epochs=2, batch_size=16, lr=3e-3, seed=5)
    training.train(
        d,
        x,
        y,
        fit_config,
        device="cpu",
        optimizer=models._adamw_one_cycle,
        generators=(gen, gen),
    )
    for (name, p), q in zip(c.state_dict().items(), d.state_dict().values()):
        assert torch.equal(p, q), name
    assert len(history["loss"]) == len(history["accuracy"]) == 2
    assert all(0 <= a <= 1 and a * len(y) == round(a * len(y)) for a in history["accuracy"])


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_evaluation_gives_every_layer_back_its_own_mode():
    # model.train(was) set every layer alike: a BatchNorm frozen in eval mode came back
    # in train mode and updated its statistics at the next step
    from robustpatch.lab import evaluate

    x, y = _data(8)
    net = _bn_net()
    net(x)  # materialise the lazy layer
    net.train()
    net[1].eval()
    training.predict(net, x, device="cpu")
    evaluate.corruption_accuracy(
        net, (x * 255).to(torch.uint8), y % 2, evaluate.CorruptionGrid(("contrast",), (1,))
    )
    evaluate.fgsm(net, x, y % 2, 0.01, device="cpu")
    evaluate.pgd_linf(net, x, y % 2, 0.01, steps=1, device="cpu")
    assert [m.training for m in net] == [True, False, True, True]


def test_images_and_labels_of_different_lengths_are_refused():
    # one label was broadcast against every prediction: an "accuracy" of 20.0
    from robustpatch.lab import evaluate

    x, y = _data(20)
    with pytest.raises(ValueError, match="20 images but 1 labels"):
        training.accuracy(_Constant(), x, y[:1], device="cpu")
    with pytest.raises(ValueError, match="20 images but 5 labels"):
        evaluate.robust_accuracy(_Constant(), x, y[:5], attack="fgsm", device="cpu")
    with pytest.raises(ValueError, match="no images"):
        evaluate.robust_accuracy(_Constant(), x[:0], y[:0], attack="fgsm", device="cpu")
    config = training.TrainConfig(epochs=1, batch_size=8)
    for labels in (y[:5], torch.cat([y, y])):  # a prefix trained silently / an IndexError
        with pytest.raises(ValueError, match="training images but"):
            training.train(models.SmallCNN(seed=0), x, labels, config, device="cpu")


def test_reestimating_batchnorm_on_no_images_is_refused_and_changes_nothing():
    # the statistics were reset before the first batch: none left mean 0, variance 1
    x, _ = _data(8)
    net = _bn_net()
    net.train()
    net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="no images"):
        recipes.reestimate_bn(net, x[:0], device=torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_torch_threads_gives_the_callers_count_back():
    before = torch.get_num_threads()
    with training.torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
