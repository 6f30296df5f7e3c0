"""Fixtures shared by the lab tests (torch extra)."""

from __future__ import annotations

import time

import numpy as np
import pytest

try:
    import torch
except ImportError:  # the lab tests skip themselves without torch
    torch = None


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Run lab tests with one torch thread.

    The lab tests use many small tensors. On a busy 2-core machine, torch's two OpenMP threads
    wait on each other at every operation: an element-wise op on 400k floats took 12 ms with
    2 threads against 0.1 ms with 1 (measured). The setting is restored after each module.
    """
    if torch is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Seed torch's global generator before each test. The lab draws from its own seeded
    generators; this makes any draw outside them (a test's own, a library default)
    reproducible too, at a fixed thread count."""
    if torch is not None:
        torch.manual_seed(0)


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory):
    """A private cache folder for the embedded datasets."""
    return tmp_path_factory.mktemp("robustpatch-cache")


@pytest.fixture(scope="session")
def photos224():
    """Eight real photographs, 224x224 uint8 (N, H, W, 3)."""
    pytest.importorskip("skimage")
    from robustpatch.lab._reference import sample_images

    return sample_images(224)


@pytest.fixture(scope="session")
def photos32():
    """32 real 32x32 photo crops as a uint8 tensor (N, 3, 32, 32)."""
    if torch is None:
        pytest.skip("needs torch")
    pytest.importorskip("skimage")
    from robustpatch.lab._reference import sample_images

    big = sample_images(64)  # (8, 64, 64, 3)
    crops = [big[:, y : y + 32, x : x + 32] for y in (0, 32) for x in (0, 32)]
    arr = np.concatenate(crops).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


@pytest.fixture(scope="session")
def trained_digits(lab_cache):
    """The small CNN trained once on the embedded digits: (model, test accuracy, seconds)."""
    if torch is None:
        pytest.skip("needs torch")
    from robustpatch.lab.models import train_digits_cnn

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        model, acc = train_digits_cnn(epochs=4, seed=0, device="cpu", cache=lab_cache)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(old)
    return model, acc, seconds
