"""The embedded Fashion-MNIST subset: its checksum, its splits, the rule that made it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from robustpatch.errors import FormatError  # noqa: E402
from robustpatch.lab.data import fashion_mnist as fm  # noqa: E402
from robustpatch.lab.data.idx import read_idx  # noqa: E402

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
HERE = Path(fm.__file__).parent


def test_embedded_files_match_recorded_sha256():
    import hashlib

    for name, digest in fm.EMBEDDED_SHA256.items():
        assert hashlib.sha256((HERE / name).read_bytes()).hexdigest() == digest


def test_changed_checksum_is_refused(monkeypatch):
    name = "fashion_subset-labels-idx1-ubyte.gz"
    monkeypatch.setitem(fm.EMBEDDED_SHA256, name, "0" * 64)
    with pytest.raises(FormatError, match=f"embedded {name}: sha256 .* differs"):
        fm.load_embedded()


def test_embedded_splits_have_the_documented_sizes_and_classes():
    s = fm.load_embedded()
    per_class = {
        "pretrain": (fm.EMBEDDED_SIZES.pretrain, 10),
        "a_train": (fm.EMBEDDED_SIZES.task_train, 5),
        "a_val": (fm.EMBEDDED_SIZES.task_val, 5),
        "b_train": (fm.EMBEDDED_SIZES.task_train, 5),
        "b_val": (fm.EMBEDDED_SIZES.task_val, 5),
        "a_test": (fm.EMBEDDED_SIZES.test, 5),
        "b_test": (fm.EMBEDDED_SIZES.test, 5),
    }
    for split, (n, classes) in per_class.items():
        x, y = s[split]
        assert x.shape == (n * classes, 3, 32, 32) and x.dtype == torch.uint8
        assert torch.bincount(y, minlength=classes).tolist() == [n] * classes
        assert int(x[:, :, :2].max()) == 0 and torch.equal(x[:, 0], x[:, 2])


def test_embedded_splits_are_disjoint_images_of_the_original_files():
    meta = read_idx(HERE / "fashion_subset-meta-idx2-int.gz")
    train_rows = meta[np.isin(meta[:, 0], [0, 1, 2, 3, 4])]
    test_rows = meta[np.isin(meta[:, 0], [5, 6])]
    assert len(np.unique(train_rows[:, 1])) == len(train_rows)
    assert len(np.unique(test_rows[:, 1])) == len(test_rows)


def test_split_rule_takes_each_class_in_file_order():
    labels = np.array([0, 5, 0, 5, 0, 5, 0, 5, 1, 1, 1, 1, 2, 3, 4, 6, 7, 8, 9] * 4, np.uint8)
    picks = fm.assign_splits(labels, labels, fm.SplitSizes(1, 1, 1, 1))
    zeros = np.flatnonzero(labels == 0)
    assert zeros[0] in picks["pretrain"][1] and zeros[1] in picks["a_train"][1]
    assert zeros[2] in picks["a_val"][1]
    with pytest.raises(FormatError, match="class 2 has too few images for a_val"):
        fm.assign_splits(labels, labels, fm.SplitSizes(3, 1, 1, 1))


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="dataset-fashion-mnist not installed")
def test_embedded_subset_is_the_rule_applied_to_the_full_files():
    full, emb = fm.load_folder(DEBIAN, fm.EMBEDDED_SIZES), fm.load_embedded()
    for split in fm.SPLITS:
        assert torch.equal(full.images[split], emb.images[split])
        assert torch.equal(full.labels[split], emb.labels[split])
