"""Degenerate inputs to the lab are refused where they enter, with a message that names
the input, instead of a ZeroDivisionError, an empty torch.cat or a silently wrong run."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from robustpatch.errors import InvalidArgumentError  # noqa: E402
from robustpatch.lab import datasets, recipes, training  # noqa: E402
from robustpatch.lab import evaluate as E  # noqa: E402
from robustpatch.lab.corruptions import corrupt  # noqa: E402
from robustpatch.lab.models import SmallCNN  # noqa: E402


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"epochs": -1}, "epochs must be an integer >= 0"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"lr": -0.1}, "lr must be a finite number >= 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"milestones": [1, -2]}, "milestones must be an integer >= 0"),
    ],
)
def test_train_config_refuses_degenerate_values(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        training.TrainConfig(**kwargs)


def test_train_checks_a_config_changed_after_it_was_built():
    cfg = training.TrainConfig(epochs=1)
    cfg.batch_size = 0
    x, y = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        training.train(SmallCNN(3, widths=(4, 4, 4), seed=0), x, y, cfg, device="cpu")


def test_corruption_grid_refuses_a_string_and_a_zero_batch():
    with pytest.raises(InvalidArgumentError, match=r"one corruption: \('fog',\)"):
        E.CorruptionGrid(corruptions="fog")
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        E.CorruptionGrid(corruptions=["fog"], batch_size=0)


def test_attacks_refuse_a_negative_eps_and_a_zero_batch():
    net = SmallCNN(3, widths=(4, 4, 4), seed=0)
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    with pytest.raises(InvalidArgumentError, match="eps must be >= 0"):
        E.robust_accuracy(net, x, y, attack="fgsm", eps=-1, device="cpu")
    with pytest.raises(InvalidArgumentError, match="eps must be >= 0"):
        E.fgsm(net, x, y, -0.1, device="cpu")
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        E.robust_accuracy(net, x, y, batch_size=0, device="cpu")


def test_recipe_helpers_check_their_cells_up_front():
    x = torch.rand(8, 3, 32, 32)
    with pytest.raises(InvalidArgumentError, match="n must be an integer >= 1"):
        recipes.unlabeled_corrupted(x, "fog", 0)
    with pytest.raises(ValueError, match="at least one corruption and one severity"):
        recipes.unlabeled_corrupted(x, [], 4)
    with pytest.raises(ValueError, match="at least one corruption and one severity"):
        recipes.corruption_transform("fog", [])
    with pytest.raises(ValueError, match="severity must be an integer from 1 to 5"):
        recipes.corruption_transform("fog", [7])  # at build time, not at the first batch
    with pytest.raises(ValueError, match="unknown corruption 'fgo'"):
        recipes.corruption_transform("fgo")


def test_float_images_outside_unit_range_warn():
    x = torch.rand(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"should lie in \[0, 1\]"):
        corrupt(255 * x, "contrast", 1, seed=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corrupt(x, "contrast", 1, seed=0)  # [0, 1] floats: no warning


def test_cifar_c_severity_must_be_an_integer(tmp_path):
    np.save(tmp_path / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros(10, np.int64))
    assert len(datasets.load_cifar_c(tmp_path, "fog", severity=2).labels) == 2
    with pytest.raises(ValueError, match="severity must be an integer from 1 to 5"):
        datasets.load_cifar_c(tmp_path, "fog", severity=2.0)
