"""robustpatch.lab.models: the small CNN, torchvision builders, parameter depth order."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from robustpatch.lab import models as M  # noqa: E402

pytestmark = pytest.mark.torch

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def test_small_cnn_shapes_seed_and_uint8_input():
    a, b = M.SmallCNN(seed=1), M.SmallCNN(seed=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(M.SmallCNN(seed=2).classifier.weight, a.classifier.weight)
    assert any(isinstance(m, nn.BatchNorm2d) for m in a.modules())
    a.eval()
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    out = a(x)
    assert out.shape == (5, 10)
    assert torch.allclose(out, a(x.float() / 255), atol=1e-5)
    grey = M.SmallCNN(num_classes=4, in_channels=1, widths=(8, 8, 8), seed=0).eval()
    assert grey(torch.rand(2, 1, 32, 32)).shape == (2, 4)


def test_small_cnn_reaches_95_percent_on_digits(trained_digits):
    model, acc, seconds = trained_digits
    print(
        f"\nSmallCNN on digits32: test accuracy {acc:.4f} after {seconds:.1f} s"
        " (4 epochs, 1 thread)"
    )
    # Seeds 0-4 (torch 2.15, 1 thread): 0.989, 0.986, 0.986, 0.986, 0.983. Wall time is
    # printed, not asserted: it measures the machine, not the model.
    assert acc >= 0.95


def test_parameters_by_depth_registration_order():
    model = M.SmallCNN(seed=0)
    names = [n for n, _ in M.parameters_by_depth(model)]
    assert names[0] == "features.0.weight"
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    assert len(names) == len(list(model.parameters()))
    convs = [n for n in names if n.endswith(".weight") and n.startswith("features")]
    assert convs == sorted(convs, key=lambda n: int(n.split(".")[1]))


class _HeadFirst(nn.Module):
    """Registers the head before the body, and shares one layer twice."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.unused = nn.Linear(3, 3)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.shared = nn.Linear(8, 8)

    def forward(self, x):
        h = self.body(x)
        h = self.shared(self.shared(h))
        return self.head(h)


def test_parameters_by_depth_follows_execution_with_example_input():
    model = _HeadFirst()
    model.train()
    order = [n for n, _ in M.parameters_by_depth(model, torch.rand(1, 3, 8, 8))]
    assert order == [
        "body.0.weight",
        "body.0.bias",
        "shared.weight",
        "shared.bias",
        "head.weight",
        "head.bias",
        "unused.weight",
        "unused.bias",
    ]
    assert model.training  # mode restored
    assert [n for n, _ in M.parameters_by_depth(model)][0] == "head.weight"


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed")
def test_torchvision_builders_explain_missing_dependency():
    for build in (M.resnet18, M.vgg16):
        with pytest.raises(ImportError, match="pip install torchvision"):
            build(num_classes=10)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")
def test_torchvision_builders():
    net = M.resnet18(num_classes=10, small_input=True).eval()
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    names = [n for n, _ in M.parameters_by_depth(net, torch.rand(1, 3, 32, 32))]
    assert names[0] == "1.conv1.weight" and names[-1] == "1.fc.bias"
    vgg = M.vgg16(num_classes=10, small_input=True).eval()
    assert vgg(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_fit_rejects_empty_data():
    with pytest.raises(ValueError):
        M.fit(
            M.SmallCNN(seed=0),
            torch.zeros(0, 3, 32, 32),
            torch.zeros(0, dtype=torch.int64),
            device="cpu",
        )
