"""Properties of robustpatch.lab.corruptions: API, shape/dtype/range, determinism, severity."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from robustpatch.lab import corruptions as C  # noqa: E402
from robustpatch.lab.corruptions import ops as O  # noqa: E402

pytestmark = pytest.mark.torch

# Types whose output is a deterministic function of the image.
DETERMINISTIC = {
    "defocus_blur",
    "zoom_blur",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
    "gaussian_blur",
    "saturate",
}

# Adjacent severities whose published parameters do not increase the pixel distance to the
# clean image (measured on real photographs; the tables are the benchmark's, not ours).
NOT_MONOTONE = {
    # sigma 0.05 -> 0.25 -> 0.4 at one shuffle pass: the blur smooths the shuffle away as fast
    # as it adds blur; sev 4 -> 5 likewise at two passes
    ("cifar", "glass_blur"): {(1, 2), (2, 3), (4, 5)},
    # radius 6 -> 8 at sigma 2: the extra taps weigh < 0.3%, the two are nearly identical
    ("cifar", "motion_blur"): {(3, 4)},
    # the image weight drops (0.9 -> 0.85 -> 0.75) as fast as the frost weight grows
    # (0.4 -> 0.4 -> 0.45): the image fades rather than the distance growing
    ("cifar", "frost"): {(3, 4), (4, 5)},
    # the random affine jitter shrinks (0.08 -> 0.03 x 32 px) as the elastic part grows
    ("cifar", "elastic_transform"): {(1, 2), (2, 3), (3, 4), (4, 5)},
    # severity 4 switches from water drops to mud
    ("cifar", "spatter"): {(3, 4)},
    # severities 1-2 desaturate, 3-5 oversaturate
    ("cifar", "saturate"): {(2, 3)},
    ("imagenet", "saturate"): {(2, 3)},
    # (sigma 1, delta 2, 3 passes) -> (1.1, 3, 2)
    ("imagenet", "glass_blur"): {(3, 4)},
    # different loc / zoom / threshold at once; the snow cover is about equal
    ("imagenet", "snow"): {(2, 3)},
    ("imagenet", "frost"): {(3, 4)},
    # same strength 2.5, only the fractal's decay changes
    ("imagenet", "fog"): {(3, 4)},
    # severities 1-2 are large smooth affine warps, 3-5 local elastic ones
    ("imagenet", "elastic_transform"): {(2, 3)},
}


def test_name_lists():
    assert len(C.STANDARD) == 15 and len(C.EXTRA) == 4
    assert C.CORRUPTIONS == C.STANDARD + C.EXTRA
    assert len(set(C.CORRUPTIONS)) == 19
    for name in C.CORRUPTIONS:
        for scale in C.SCALES:
            assert len(C._TABLES[name][scale]) == 5
            C.corruption_parameters(name, 5, scale)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"name": "not_a_corruption"}, ValueError),
        ({"severity": 0}, ValueError),
        ({"severity": 6}, ValueError),
        ({"severity": 2.5}, ValueError),
        ({"severity": True}, ValueError),
        ({"severity": "3"}, ValueError),
        ({"scale": "tiny"}, ValueError),
        ({"images": np.zeros((2, 3, 32, 32), np.uint8)}, TypeError),
        ({"images": torch.zeros(2, 3, 32, 32, dtype=torch.int32)}, TypeError),
        ({"images": torch.zeros(2, 2, 32, 32)}, ValueError),
        ({"images": torch.zeros(3, 32, 32).flatten()}, ValueError),
        ({"seed": 1, "generator": torch.Generator()}, ValueError),
    ],
)
def test_invalid_arguments(kwargs, error):
    args = {"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "name": "fog", "severity": 3}
    args.update(kwargs)
    with pytest.raises(error):
        C.corrupt(**args)


def test_unknown_name_message_lists_names():
    with pytest.raises(ValueError, match="gaussian_noise"):
        C.corrupt(torch.zeros(1, 3, 32, 32), "gausian_noise", 1)
    with pytest.raises(ValueError, match="1 to 5"):
        C.corruption_parameters("fog", 7)


def test_scale_follows_image_size():
    assert C.resolve_scale(32, 32) == "cifar"
    assert C.resolve_scale(224, 224) == "imagenet"
    assert C.resolve_scale(32, 32, "imagenet") == "imagenet"


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_shape_dtype_range_kept(name, photos32):
    x8 = photos32[:6]
    for images in (x8, x8.float() / 255, x8.double() / 255, x8.half() / 255):
        out = C.corrupt(images, name, 5, seed=0)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.device == images.device and out is not images
        if images.dtype == torch.uint8:
            assert int(out.min()) >= 0 and int(out.max()) <= 255
        else:
            assert torch.isfinite(out).all()
            assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # a single (C, H, W) image and a grey batch
    single = C.corrupt(x8[0], name, 3, seed=0)
    assert single.shape == x8[0].shape and single.dtype == torch.uint8
    grey = C.corrupt(x8[:, :1], name, 3, seed=0)
    assert grey.shape == x8[:, :1].shape and grey.dtype == torch.uint8
    # non-square, odd-sized, larger images
    odd = torch.randint(
        0, 256, (2, 3, 45, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    assert C.corrupt(odd, name, 4, seed=0).shape == odd.shape
    assert C.corrupt(x8[:0], name, 1, seed=0).shape == x8[:0].shape


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_same_seed_same_output(name, photos32):
    x = photos32[:8]
    a = C.corrupt(x, name, 4, seed=7)
    b = C.corrupt(x, name, 4, seed=7)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(C.corrupt(x, name, 4, generator=g1), C.corrupt(x, name, 4, generator=g2))
    other = C.corrupt(x, name, 4, seed=8)
    if name in DETERMINISTIC:
        assert torch.equal(a, other)
    else:
        assert not torch.equal(a, other)
    assert not torch.equal(a, x)  # it did something


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_uint8_and_float_paths_agree(name, photos32):
    x = photos32[:8]
    as_u8 = C.corrupt(x, name, 3, seed=1)
    as_float = C.corrupt(x.float() / 255, name, 3, seed=1)
    assert torch.equal(torch.floor(as_float * 255 + 1e-3).to(torch.uint8), as_u8)


def _distances(images, name, scale):
    x = images.float()
    return [
        float((C.corrupt(images, name, s, seed=0, scale=scale).float() - x).abs().mean())
        for s in range(1, 6)
    ]


@pytest.mark.parametrize("scale", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_distance_grows_with_severity(name, scale, photos32, photos224):
    if scale == "cifar":
        images = photos32
    else:
        images = torch.from_numpy(np.ascontiguousarray(photos224[:4].transpose(0, 3, 1, 2)))
    d = _distances(images, name, scale)
    assert all(v > 0.1 for v in d), d
    exempt = NOT_MONOTONE.get((scale, name), set())
    for s in range(1, 5):
        if (s, s + 1) not in exempt:
            assert d[s] > d[s - 1], f"{name}/{scale}: distance {d} falls at severity {s + 1}"
    if name == "elastic_transform":
        # the affine part shrinks / changes regime with severity (see NOT_MONOTONE)
        assert len({round(v, 3) for v in d}) == 5  # every severity is a different corruption
    else:
        assert d[4] > d[0], d


def _reference_glass_scan(
    image: np.ndarray, delta: int, dy: np.ndarray, dx: np.ndarray
) -> np.ndarray:
    """The reference's loop, verbatim semantics (numpy views: a copy, not a swap)."""
    x = image.transpose(1, 2, 0).copy()
    h, w = x.shape[:2]
    for r in range(h - delta, delta, -1):
        for c in range(w - delta, delta, -1):
            rp, cp = r + dy[r, c], c + dx[r, c]
            x[r, c], x[rp, cp] = x[rp, cp], x[r, c]
    return x.transpose(2, 0, 1)


@settings(max_examples=25, deadline=None)
@given(
    delta=st.integers(1, 4),
    h_extra=st.integers(1, 12),
    w_extra=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_glass_wavefronts_equal_the_sequential_scan(delta, h_extra, w_extra, seed):
    h, w = 2 * delta + 1 + h_extra, 2 * delta + 1 + w_extra
    rs = np.random.RandomState(seed)
    img = rs.randint(0, 256, (2, 3, h, w)).astype(np.float32)
    dy = rs.randint(-delta, delta, (2, h, w))
    dx = rs.randint(-delta, delta, (2, h, w))
    ours = O._glass_shuffle(
        torch.from_numpy(img), delta, torch.from_numpy(dy), torch.from_numpy(dx)
    )
    for n in range(2):
        assert np.array_equal(ours[n].numpy(), _reference_glass_scan(img[n], delta, dy[n], dx[n]))


@pytest.mark.parametrize(
    "size_in, size_out", [(32, 19), (224, 134), (224, 56), (19, 32), (134, 224), (50, 50)]
)
def test_box_resize_matches_pillow(size_in, size_out):
    from PIL import Image

    rs = np.random.RandomState(size_in * 1000 + size_out)
    img = rs.randint(0, 256, (size_in, size_in + 3, 3)).astype(np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((size_out + 2, size_out), Image.BOX)).astype(int)
    x = torch.from_numpy(img.transpose(2, 0, 1)[None].copy()).float() / 255
    ours = (
        (O._pil_box_resize(x, size_out, size_out + 2) * 255)
        .round()
        .int()[0]
        .permute(1, 2, 0)
        .numpy()
    )
    diff = np.abs(ours - ref)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


def test_jpeg_quality_scaling():
    assert np.array_equal(O._jpeg_table(O._JPEG_LUMA, 50), O._JPEG_LUMA)
    assert (O._jpeg_table(O._JPEG_LUMA, 100) == 1).all()
    q10 = O._jpeg_table(O._JPEG_LUMA, 10)  # scale 500%, clamped to baseline's 255
    assert q10[0, 0] == 80 and q10.max() == 255
    assert np.array_equal(
        O._jpeg_table(O._JPEG_CHROMA, 80), np.clip((O._JPEG_CHROMA * 40 + 50) // 100, 1, 255)
    )


def test_jpeg_flat_image_matches_pillow_and_detail_is_lost(photos32):
    import io

    from PIL import Image

    colour = np.array([204, 102, 51], dtype=np.uint8)
    flat = np.broadcast_to(colour, (32, 32, 3)).copy()
    for quality, sev in ((25, 1), (7, 5)):
        buf = io.BytesIO()
        Image.fromarray(flat).save(buf, "JPEG", quality=quality)
        ref = np.asarray(Image.open(buf)).astype(int)
        x = torch.from_numpy(flat.transpose(2, 0, 1)[None].copy())
        ours = C.corrupt(x, "jpeg_compression", sev, scale="imagenet")[0].permute(1, 2, 0).numpy()
        assert np.abs(ours.astype(int) - ref).max() <= 1
        assert (ours == ours[0, 0]).all()  # a flat image stays flat
    x = photos32.float()
    lo = (C.corrupt(photos32, "jpeg_compression", 5, scale="imagenet").float() - x).abs().mean()
    hi = (C.corrupt(photos32, "jpeg_compression", 1, scale="cifar").float() - x).abs().mean()
    assert float(lo) > 2 * float(hi)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_cuda_runs_on_the_input_device(name, photos32):
    x = photos32[:8]
    out = C.corrupt(x.cuda(), name, 3, seed=0)
    assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, C.corrupt(x.cuda(), name, 3, seed=0))
    if name in DETERMINISTIC:
        cpu = C.corrupt(x, name, 3, seed=0)
        assert int((out.cpu().int() - cpu.int()).abs().max()) <= 1
