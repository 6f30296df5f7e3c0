"""Overflow policy (issue 17, finding 2): a patch that turns finite weights into ±Inf
(a huge α, a large delta in a narrow dtype) is refused with the count and the first
tensor named, and nothing is written: in memory the model is rolled back, for a file
nothing appears at the destination. ``allow_nonfinite=True`` / ``--allow-nonfinite``
writes it anyway. Weights that were already Inf or NaN are not overflow: they stay
allowed and are restored exactly."""

from __future__ import annotations

import numpy as np
import pytest

from robustpatch._format.safetensors import read_tensors, write_tensors
from robustpatch.cli import main
from robustpatch.errors import NonFiniteError
from robustpatch.files import apply_file, remove_file, undo_path_for
from robustpatch.signature import Signature
from robustpatch.targets import apply, remove, subtract
from rp_testutil import listing, sha

N = 4640  # the count of Inf values in an f16 model


def f16_case() -> tuple[dict, Signature]:
    """An f16 model and a small f16 signature: fine at α = 1, Inf everywhere at 1e30."""
    w = np.linspace(-1, 1, N).astype(np.float16)
    other = np.arange(16, dtype=np.float16)
    sig = Signature.from_deltas({"w": np.full(N, 0.01, np.float16)}, name="fog")
    return {"other": other, "w": w}, sig


def bits(model: dict) -> dict:
    return {k: v.view(np.uint8).tobytes() for k, v in model.items()}


# The three cases: model, signature, α, elements that overflow.
def _alpha_1e30_on_f16():
    model, sig = f16_case()
    return model, sig, 1e30, N


def _large_dense_delta_on_f16():
    w = np.full(64, 60000.0, np.float16)
    sig = Signature.from_deltas({"w": np.full(64, 30000.0, np.float16)})
    return {"w": w}, sig, 1.0, 64


def _f32_3e38_times_2():
    w = np.array([1.0, 3e38, -3e38, 0.0], np.float32)
    sig = Signature.from_deltas({"w": np.array([0.0, 3e38, -3e38, 1.0], np.float32)})
    return {"w": w}, sig, 2.0, 2


CASES = {
    "alpha_1e30_on_f16": _alpha_1e30_on_f16,
    "large_dense_delta_on_f16": _large_dense_delta_on_f16,
    "f32_3e38_times_alpha_2": _f32_3e38_times_2,
}


@pytest.mark.parametrize("case", CASES)
def test_in_memory_overflow_is_refused_and_rolled_back(case):
    model, sig, alpha, count = CASES[case]()
    before = bits(model)
    with pytest.raises(NonFiniteError, match=rf"^{count} elements overflow .* tensor 'w'"):
        apply(model, sig, alpha)
    assert bits(model) == before


@pytest.mark.parametrize("case", CASES)
def test_in_memory_overflow_allowed_by_flag_and_removed_exactly(case):
    model, sig, alpha, count = CASES[case]()
    before = bits(model)
    undo = apply(model, sig, alpha, allow_nonfinite=True)
    assert int(np.isinf(model["w"]).sum()) == count
    remove(model, undo)
    assert bits(model) == before


def test_message_names_the_first_tensor_and_counts_all():
    a = np.full(8, 60000.0, np.float16)
    b = np.full(8, 60000.0, np.float16)
    sig = Signature.from_deltas({"a": np.full(8, 1e4, np.float16), "b": np.ones(8, np.float16)})
    model = {"a": a, "b": b}
    with pytest.raises(NonFiniteError, match=r"^8 elements overflow .*tensor 'a' \(F16\)"):
        apply(model, sig, 2.0)
    assert (model["a"] == 60000).all()


def test_existing_nonfinite_weights_stay_allowed_and_are_restored_exactly():
    w = np.array([np.inf, -np.inf, np.nan, 1.0, 65504.0], np.float16)
    w[2] = np.frombuffer(np.uint16(0x7E01).tobytes(), np.float16)[0]  # a NaN payload
    model = {"w": w}
    before = bits(model)
    sig = Signature.from_deltas({"w": np.array([1, -1, 1, 1, -1], np.float16)})
    undo = apply(model, sig, 1.0)
    remove(model, undo)
    assert bits(model) == before


@pytest.mark.parametrize("case", CASES)
def test_in_memory_subtract_refuses_overflow_and_rolls_back(case):
    model, sig, alpha, count = CASES[case]()
    before = bits(model)
    with pytest.raises(NonFiniteError, match=rf"^{count} elements overflow .* tensor 'w'"):
        subtract(model, sig, -alpha)
    assert bits(model) == before


def test_in_memory_subtract_allow_nonfinite_writes_the_overflow():
    model, sig = f16_case()
    report = subtract(model, sig, -1e30, allow_nonfinite=True)
    assert int(np.isinf(model["w"]).sum()) == N
    assert report["tensors"] == 1


def test_in_memory_subtract_counts_inconsistent_elements_exactly():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(4096).astype(np.float16)
    delta = (rng.standard_normal(4096) * 3).astype(np.float16)
    d = delta.astype(np.float32) * np.float32(0.7)
    old = (w.astype(np.float32) - d).astype(np.float16)
    again = (old.astype(np.float32) + d).astype(np.float16)
    expected = int((again.view(np.uint16) != w.view(np.uint16)).sum())
    model = {"w": w.copy()}
    report = subtract(model, Signature.from_deltas({"w": delta}), 0.7)
    assert expected > 0
    assert report["inconsistent"] == expected
    assert bits(model) == bits({"w": old})


def test_torch_ops_path_refuses_and_rolls_back():
    torch = pytest.importorskip("torch")
    model, sig = f16_case()
    from robustpatch.torch_bridge import TorchTarget

    state = {k: torch.from_numpy(v.copy()) for k, v in model.items()}
    with pytest.raises(NonFiniteError, match=rf"^{N} elements overflow"):
        apply(TorchTarget(state, torch_ops=True), sig, 1e30)
    assert bits({k: v.numpy() for k, v in state.items()}) == bits(model)


# ---------------------------------------------------------------------------- files


@pytest.fixture
def files(tmp_path):
    model, sig = f16_case()
    write_tensors(tmp_path / "model.safetensors", model)
    sig.save(tmp_path / "fog.rws")
    return tmp_path


@pytest.mark.parametrize("undo", [True, False])
def test_apply_file_refuses_and_writes_nothing(files, undo):
    src, out = files / "model.safetensors", files / "out.safetensors"
    before = listing(files)
    with pytest.raises(NonFiniteError, match=rf"^{N} elements overflow .* tensor 'w' \(F16\)"):
        apply_file(src, files / "fog.rws", 1e30, out, undo=undo)
    assert listing(files) == before


def test_apply_file_allow_nonfinite_writes_and_removes_exactly(files):
    src, out = files / "model.safetensors", files / "out.safetensors"
    apply_file(src, files / "fog.rws", 1e30, out, allow_nonfinite=True)
    assert int(np.isinf(read_tensors(out)[1]["w"]).sum()) == N
    remove_file(out, files / "back.safetensors")
    assert sha(files / "back.safetensors") == sha(src)


@pytest.mark.parametrize("command,alpha", [("apply", "1e30"), ("subtract", "-1e30")])
def test_cli_refuses_in_one_line_and_writes_nothing(files, capsys, command, alpha):
    before = listing(files)
    out = files / "out.safetensors"
    code = main(
        [
            command,
            str(files / "model.safetensors"),
            str(files / "fog.rws"),
            f"--alpha={alpha}",
            "-o",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("robustpatch: error: ") and err.count("\n") == 1
    assert f"{N} elements overflow" in err and "--allow-nonfinite" in err
    assert listing(files) == before


def test_cli_allow_nonfinite_writes(files, capsys):
    out = files / "out.safetensors"
    code = main(
        [
            "apply",
            str(files / "model.safetensors"),
            str(files / "fog.rws"),
            "--alpha=1e30",
            "--allow-nonfinite",
            "-o",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert out.exists() and undo_path_for(out).exists()
    assert int(np.isinf(read_tensors(out)[1]["w"]).sum()) == N
