"""robustpatch.lab.datasets: embedded sets, cache, loaders on fake folders, corrupted views."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from robustpatch.lab import datasets as D  # noqa: E402

pytestmark = pytest.mark.torch


def test_digits32_split_shapes_and_cache(tmp_path, monkeypatch):
    train = D.load_digits32("train", cache=tmp_path)
    test = D.load_digits32("test", cache=tmp_path)
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == np.uint8
    assert len(train) + len(test) == 1797
    assert 0.18 < len(test) / 1797 < 0.22
    # stratified: every class in both splits, in about the same share
    for c in range(10):
        share = (test.labels == c).sum() / ((train.labels == c).sum() + (test.labels == c).sum())
        assert 0.15 < share < 0.25
    # disjoint: no test image is a training image
    train_keys = {img.tobytes() for img in train.images}
    assert (
        sum(img.tobytes() in train_keys for img in test.images) <= 2
    )  # sklearn has a few duplicates
    # upsampled, not blank: strokes are bright, background dark
    assert train.images.max() >= 250
    assert (train.images < 20).mean() > 0.4 and (train.images > 128).mean() > 0.15
    grey = D.load_digits32("all", channels=1, cache=tmp_path)
    assert grey.images.shape == (1797, 1, 32, 32)
    assert grey.images.max() >= 250
    # the cache is used: a second load does not call scikit-learn
    assert list(tmp_path.glob("digits32-*.npy"))
    import sklearn.datasets

    monkeypatch.setattr(
        sklearn.datasets, "load_digits", lambda *a, **k: (_ for _ in ()).throw(AssertionError)
    )
    again = D.load_digits32("train", cache=tmp_path)
    assert np.array_equal(again.images, train.images)


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTPATCH_CACHE", str(tmp_path / "c"))
    assert D.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


@pytest.mark.parametrize("make", [D.procedural_shapes, D.procedural_patterns])
def test_procedural_sets_are_deterministic_balanced_and_prefix_stable(make, tmp_path):
    a = make(300, seed=3, cache=tmp_path)
    b = make(300, seed=3, cache=False)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.images.shape == (300, 3, 32, 32) and a.images.dtype == np.uint8
    assert np.bincount(a.labels, minlength=10).tolist() == [30] * 10
    assert a.num_classes == 10 and len(a.classes) == 10
    longer = make(450, seed=3, cache=False)
    assert np.array_equal(longer.images[:300], a.images)
    other = make(300, seed=4, cache=False)
    assert not np.array_equal(other.images, a.images)
    # images vary: not constant, and no two identical
    assert a.images.std() > 20
    assert len({img.tobytes() for img in a.images}) == 300
    small = make(20, seed=0, size=16, cache=False)
    assert small.images.shape == (20, 3, 16, 16)


def test_procedural_classes_are_separable():
    """A nearest-class-mean classifier on orientation energy tells the gratings apart."""
    p = D.procedural_patterns(400, seed=1, cache=False)
    g = p.images.astype(np.float32).mean(axis=1)
    spec = np.abs(np.fft.fft2(g - g.mean(axis=(1, 2), keepdims=True)))
    feats = spec[:, :8, :8].reshape(len(g), -1)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    train, test = slice(0, 300), slice(300, 400)
    means = np.stack([feats[train][p.labels[train] == c].mean(0) for c in range(10)])
    pred = np.argmax(feats[test] @ means.T, axis=1)
    assert (pred == p.labels[test]).mean() > 0.5  # chance is 0.1
    assert p.classes != D.procedural_shapes(10, cache=False).classes


def _write_cifar10(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rs = np.random.RandomState(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rs.randint(0, 256, (n_per_batch, 3, 32, 32)).astype(np.uint8)
        labels = rs.randint(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": imgs.reshape(n_per_batch, -1), b"labels": labels}, f)
        expected.append((imgs, labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return expected


def test_load_cifar10(tmp_path):
    expected = _write_cifar10(tmp_path)
    train = D.load_cifar(tmp_path, "train")
    test = D.load_cifar(tmp_path / "cifar-10-batches-py", "test")
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert np.array_equal(train.images[:4], expected[0][0])  # R, G, B planes in that order
    assert train.labels.tolist()[:4] == expected[0][1]
    assert np.array_equal(test.images, expected[5][0])
    assert train.classes == [f"c{i}" for i in range(10)]
    with pytest.raises(FileNotFoundError):
        D.load_cifar(tmp_path, num_classes=100)
    with pytest.raises(ValueError):
        D.load_cifar(tmp_path, "val")


class _RunsCode:
    """Pickles to a call of os.system: what a hostile dataset file would contain."""

    def __reduce__(self):
        return (os.system, ("touch hacked",))


def test_a_hostile_cifar_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    _write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as f:
        pickle.dump({b"data": _RunsCode(), b"labels": [0]}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*system"):
        D.load_cifar(tmp_path, "train")
    assert not (tmp_path / "hacked").exists()


def test_load_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rs = np.random.RandomState(1)
    for split, n in (("train", 6), ("test", 3)):
        imgs = rs.randint(0, 256, (n, 3 * 32 * 32)).astype(np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": imgs, "fine_labels": list(range(n)), "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    train = D.load_cifar(tmp_path, "train")
    assert train.images.shape == (6, 3, 32, 32) and train.labels.tolist() == list(range(6))
    assert len(train.classes) == 100
    assert len(D.load_cifar(tmp_path, "test", num_classes=100)) == 3


def test_load_cifar_c(tmp_path):
    rs = np.random.RandomState(2)
    data = rs.randint(0, 256, (5 * 4, 32, 32, 3)).astype(np.uint8)
    labels = np.tile(np.arange(4), 5).astype(np.uint8)
    np.save(tmp_path / "fog.npy", data)
    np.save(tmp_path / "labels.npy", labels)
    sev3 = D.load_cifar_c(tmp_path, "fog", 3)
    assert sev3.images.shape == (4, 3, 32, 32)
    assert np.array_equal(sev3.images, data[8:12].transpose(0, 3, 1, 2))
    assert sev3.labels.tolist() == [0, 1, 2, 3]
    assert len(D.load_cifar_c(tmp_path, "fog")) == 20
    with pytest.raises(FileNotFoundError):
        D.load_cifar_c(tmp_path, "snow", 1)
    with pytest.raises(ValueError):
        D.load_cifar_c(tmp_path, "fog", 6)


def test_image_folder(tmp_path):
    from PIL import Image

    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for cls, colour in colours.items():
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i, size in enumerate([(300, 200), (64, 80)]):
            img = np.zeros((size[1], size[0], 3), np.uint8)
            img[:] = colour
            img[: size[1] // 10] = 255  # a white band at the top, cropped away
            Image.fromarray(img).save(tmp_path / cls / ("sub" if i else ".") / f"im{i}.png")
    (tmp_path / "notes.txt").write_text("not a class")
    folder = D.ImageFolder(tmp_path, size=32, resize=40)
    assert folder.classes == ["cat", "dog"] and len(folder) == 4
    img, label = folder[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 0
    assert tuple(int(v) for v in img[:, 16, 16]) == colours["cat"]
    assert [folder[i][1] for i in range(4)] == [0, 0, 1, 1]
    loaded = D.load_image_folder(tmp_path, size=32, resize=40, limit=3)
    assert loaded.images.shape == (3, 3, 32, 32) and loaded.classes == ["cat", "dog"]
    assert np.array_equal(loaded.images[0], img.numpy())
    with pytest.raises(FileNotFoundError):
        D.ImageFolder(tmp_path / "cat" / "sub")


def test_corrupted_view_lazy_cached_and_order_independent(tmp_path):
    data = D.procedural_shapes(70, seed=0, cache=False)
    lazy = D.CorruptedView(data, "gaussian_noise", 3, seed=5, chunk_size=32, device="cpu")
    # item 65 first, then 0: results do not depend on the access order
    late = lazy[65][0].clone()
    first = lazy[0][0].clone()
    fresh = D.CorruptedView(data, "gaussian_noise", 3, seed=5, chunk_size=32, device="cpu")
    assert torch.equal(fresh[0][0], first) and torch.equal(fresh[65][0], late)
    assert fresh[-1][1] == int(data.labels[-1])
    cached = D.CorruptedView(
        data,
        "gaussian_noise",
        3,
        seed=5,
        chunk_size=32,
        mode="cached",
        cache=tmp_path,
        device="cpu",
    )
    assert list(tmp_path.glob("corrupted-*.npy"))
    x_lazy, y_lazy = lazy.tensors()
    x_cached, y_cached = cached.tensors()
    assert torch.equal(x_lazy, x_cached) and torch.equal(y_lazy, y_cached)
    assert x_lazy.shape == (70, 3, 32, 32) and x_lazy.dtype == torch.uint8
    assert not torch.equal(x_lazy, torch.from_numpy(data.images))
    assert sum(len(b[1]) for b in lazy.batches()) == 70
    other_seed = D.CorruptedView(data, "gaussian_noise", 3, seed=6, chunk_size=32, device="cpu")
    assert not torch.equal(other_seed[0][0], first)
    # a second cached view reads the file instead of corrupting again
    again = D.CorruptedView(
        (torch.from_numpy(data.images), torch.from_numpy(data.labels)),
        "gaussian_noise",
        3,
        seed=5,
        chunk_size=32,
        mode="cached",
        cache=tmp_path,
        device="cpu",
    )
    assert torch.equal(again.tensors()[0], x_cached)
    with pytest.raises(IndexError):
        lazy[70]
    with pytest.raises(ValueError):
        D.CorruptedView(data, "fog", 0)


def test_a_corrupted_view_of_images_and_labels_that_differ_in_number_is_refused():
    # it kept as many images as labels, silently
    x = np.zeros((4, 3, 32, 32), np.uint8)
    with pytest.raises(ValueError, match="4 images but 2 labels"):
        D.CorruptedView((x, np.array([0, 1])), "contrast", 1, device="cpu")
    with pytest.raises(ValueError, match="chunk_size"):
        D.CorruptedView((x, np.zeros(4)), "contrast", 1, device="cpu", chunk_size=0)


@pytest.mark.parametrize("fraction", [-0.1, 0, 1, 1.5])
def test_a_test_fraction_outside_zero_to_one_is_refused(fraction):
    # -0.1 turned the split around: 1618 test images, 179 training ones
    with pytest.raises(ValueError, match="test_fraction"):
        D.load_digits32("test", test_fraction=fraction, cache=False)
