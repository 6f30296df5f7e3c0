"""torch glue: the only module that imports torch, and only when a torch object is passed.

CPU tensors are patched in place by the engine through zero-copy numpy views (bf16 via
an int16 view of the same storage). Tensors elsewhere (CUDA) or non-contiguous ones are
patched with torch operations on their own device, with the same exact undo scheme: the
elements where ``(w + δ) − δ`` does not give ``w`` back are recorded with their
original bits.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from .dtypes import kernel_view
from .errors import FormatError, InvalidArgumentError, MismatchError
from .signature import is_bn_stat
from .targets import EngineRecord

__all__ = [
    "is_torch_object",
    "state_tensors",
    "bn_buffer_names",
    "to_numpy",
    "numpy_state",
    "TorchTarget",
    "TorchRecord",
    "load_torch_file",
]


def _torch():
    import torch

    return torch


def is_torch_object(obj: Any) -> bool:
    """True for a torch module, tensor, or a mapping whose values are torch tensors."""
    if "torch" not in sys.modules:  # no torch object can exist without torch imported
        return False
    torch = sys.modules["torch"]
    if isinstance(obj, (torch.nn.Module, torch.Tensor)):
        return True
    if isinstance(obj, Mapping) and obj:
        kinds = {isinstance(v, torch.Tensor) for v in obj.values() if hasattr(v, "dtype")}
        if kinds == {True, False}:  # the first value decided, and the others then failed
            raise InvalidArgumentError(
                "the state dict mixes torch tensors and numpy arrays: give one kind"
            )
        return isinstance(next(iter(obj.values())), torch.Tensor)
    return False


def state_tensors(obj: Any) -> dict[str, Any]:
    """name → tensor sharing storage with the model (a module's ``state_dict()``)."""
    torch = _torch()
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    return dict(obj)


def bn_buffer_names(obj: Any) -> set[str]:
    """Running mean/var buffer names: by module type for modules, by name otherwise."""
    torch = _torch()
    names = {k for k in state_tensors(obj) if is_bn_stat(k)}
    if isinstance(obj, torch.nn.Module):
        norm = torch.nn.modules.batchnorm._NormBase
        for prefix, mod in obj.named_modules():
            if isinstance(mod, norm) and mod.track_running_stats:
                for b in ("running_mean", "running_var"):
                    names.add(f"{prefix}.{b}" if prefix else b)
    return names


def to_numpy(t: Any) -> np.ndarray | None:
    """A numpy view of a float tensor (zero-copy on CPU; bf16 as uint16 bits); None for
    non-float tensors (e.g. BatchNorm counters)."""
    torch = _torch()
    if not t.is_floating_point():
        return None
    kind = _without_values(t)
    if kind:
        raise InvalidArgumentError(f"{kind} cannot be read as weights")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype not in (torch.float32, torch.float16, torch.float64):
        raise InvalidArgumentError(f"unsupported tensor dtype {t.dtype}")
    return t.numpy()


def _without_values(t: Any) -> str | None:
    """What ``t`` is when its values are not dense memory the engine can use: a tensor
    on the meta device (no values at all) or a sparse one; None for a dense tensor."""
    if t.is_meta:
        return "a tensor on the meta device (it holds no values)"
    if t.layout != _torch().strided:
        return f"a {t.layout} tensor"
    return None


def numpy_state(obj: Any) -> tuple[dict[str, np.ndarray], set[str], dict[str, str]]:
    """Float tensors of a module or state dict as numpy arrays, its BN buffer names, and
    the dtype of each tensor left out (not float: a message says why it is missing)."""
    out, left_out = {}, {}
    for k, t in state_tensors(obj).items():
        if not isinstance(k, str):
            raise InvalidArgumentError(f"state dict key {k!r} is not a name")
        try:
            arr = to_numpy(t)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{k}: {e}") from None
        if arr is not None:
            out[k] = arr
        else:
            left_out[k] = str(t.dtype).removeprefix("torch.")
    return out, bn_buffer_names(obj), left_out


def load_torch_file(path: str) -> dict[str, Any]:
    """A state dict from a ``.pt``/``.pth`` file (``weights_only``: no code is run): a
    mapping of names to dense real tensors (FormatError naming what else it holds)."""
    from ._io.inputs import open_input

    with open_input(path) as f:  # a FIFO or device is refused, not read until it ends
        try:
            torch = _torch()
        except ImportError as e:
            raise InvalidArgumentError(
                f"{path}: reading a torch checkpoint needs torch: pip install "
                f"'robustpatch[torch]' ({e})"
            ) from None
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch reports a damaged file many ways
            _reraise_load_error(path, e)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise FormatError(f"{path}: expected a state dict, found {type(obj).__name__}")
    for name, t in obj.items():
        _check_state_tensor(path, name, t, torch)
    return dict(obj)


def _reraise_load_error(path: str, e: Exception) -> NoReturn:
    """A refused global and a named I/O error as they are (the CLI words the first, the
    second is clear); anything else as a FormatError naming the file."""
    if _refused_global(e) or (isinstance(e, OSError) and e.filename is not None):
        raise e
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FormatError(f"{path}: not a readable torch checkpoint ({first})") from None


def _refused_global(e: Exception) -> bool:
    """``weights_only`` refused a pickled object that is not a tensor (it would run
    code), as opposed to bytes that are no checkpoint at all."""
    import pickle
    import re

    return isinstance(e, pickle.UnpicklingError) and bool(
        re.search("Unsupported (global|class)", str(e))
    )


def _check_state_tensor(path: str, name: Any, t: Any, torch: Any) -> None:
    """A state dict entry is a dense, real tensor: a nested dict, a sparse or a complex
    tensor would otherwise fail deep inside, or be dropped as if it were a counter."""
    if not isinstance(name, str):
        raise FormatError(f"{path}: key {name!r} is not a name (expected a state dict)")
    if not isinstance(t, torch.Tensor):
        raise FormatError(
            f"{path}: {name!r} holds a {type(t).__name__}, not a tensor (expected a state "
            "dict: names to tensors)"
        )
    if t.is_meta:
        raise FormatError(f"{path}: {name!r} is on the meta device: it holds no values")
    if t.layout != torch.strided:
        raise FormatError(f"{path}: {name!r} is a {t.layout} tensor; only dense ones are read")
    if t.is_complex():
        raise FormatError(f"{path}: {name!r} is a complex tensor ({t.dtype}); not supported")


_LABELS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def _label(t: Any) -> str:
    name = str(t.dtype).replace("torch.", "")
    return _LABELS.get(name, name.upper())


def _bits(t: Any) -> Any:
    torch = _torch()
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _dense(d: Any) -> np.ndarray:
    from . import _core

    if isinstance(d, _core.QuantTensor):
        return _core.dequantize(d)
    return np.ascontiguousarray(kernel_view(d).reshape(-1))


def _written(t: Any) -> None:
    """Tell autograd that ``t`` changed in place, as torch's own in-place ops do: the
    engine wrote it through a numpy view, which autograd does not see, so a backward
    pass through a graph that saved ``t`` would silently use the new values. With its
    version moved on, that backward refuses, as after ``t.add_``."""
    _torch().autograd.graph.increment_version(t)


def _acc(deltas: Sequence[Any], alphas: Sequence[float], device: Any, numel: int) -> Any:
    """Σ α·δ in float32 on ``device``, in the engine's order (starting from −0.0)."""
    torch = _torch()
    from .dtypes import widen

    acc = torch.full((numel,), -0.0, dtype=torch.float32, device=device)
    for d, a in zip(deltas, alphas):
        dense = _dense(d)
        if dense.dtype != np.float32:
            dense = widen(dense)
        x = torch.from_numpy(np.ascontiguousarray(dense)).to(device)
        acc.add_(x * torch.tensor(a, dtype=torch.float32, device=device))
    return acc


@dataclass(frozen=True)
class TorchRecord:
    """The exact-undo record of a tensor patched with torch operations (on its device):
    the positions where ``(w + δ) − δ`` does not give ``w`` back, and the originals."""

    positions: Any
    values: Any

    def __len__(self) -> int:
        return int(self.positions.numel())


class TorchTarget:
    """Patch target over a torch module or state dict (see :mod:`robustpatch.targets`).

    ``torch_ops=True`` forces the on-device torch path even for CPU tensors (tests use
    it to check that path on machines without a GPU).
    """

    def __init__(self, obj: Any, torch_ops: bool = False) -> None:
        self.tensors = state_tensors(obj)
        self.torch_ops = torch_ops

    def spec(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        t = self.tensors.get(name)
        if t is None:
            return None
        kind = _without_values(t)
        if kind:
            raise InvalidArgumentError(f"{name}: {kind} cannot be patched")
        return _label(t), tuple(t.shape)

    def span(self, name: str) -> tuple[int, int]:
        """The bytes from the tensor's first element to past its last (strides are
        never negative in torch); empty for an empty tensor."""
        t = self.tensors[name]
        lo = int(t.data_ptr())
        if not t.numel():
            return lo, lo
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        return lo, lo + (last + 1) * t.element_size()

    def check_writable(self, name: str) -> None:
        t = self.tensors[name]
        if t.is_inference() and not _torch().is_inference_mode_enabled():
            raise InvalidArgumentError(
                f"{name}: inference tensors cannot be modified outside inference mode"
            )

    def _kernel_ok(self, t: Any) -> bool:
        return not self.torch_ops and t.device.type == "cpu" and t.is_contiguous()

    def visit(self, names: Sequence[str]) -> Iterator[str]:
        yield from names

    def add(
        self, name: str, deltas: Sequence[Any], alphas: Sequence[float], record: bool
    ) -> tuple[EngineRecord | TorchRecord | None, int]:
        """The undo record (None unless ``record``) and the elements that overflowed."""
        from . import _core

        t = self.tensors[name]
        if self._kernel_ok(t):
            rec, overflowed = _core.apply(to_numpy(t), list(deltas), list(alphas), record)
            _written(t)
            return (None if rec is None else EngineRecord(*rec)), overflowed
        torch = _torch()
        with torch.no_grad():
            acc = _acc(deltas, alphas, t.device, t.numel())
            w = t.detach().reshape(-1)
            new = (w.float() + acc).to(t.dtype)
            overflowed = int((torch.isfinite(w) & ~torch.isfinite(new)).sum())
            kept = None
            if record:
                back = (new.float() - acc).to(t.dtype)
                pos = (_bits(back) != _bits(w)).nonzero().squeeze(1)
                kept = TorchRecord(pos, w[pos].clone())
            t.detach().copy_(new.view(t.shape))
        return kept, overflowed

    def subtract(
        self,
        name: str,
        deltas: Sequence[Any],
        alphas: Sequence[float],
        record: EngineRecord | TorchRecord | None,
    ) -> tuple[int, int]:
        from . import _core

        t = self.tensors[name]
        if isinstance(record, EngineRecord):
            if t.device.type != "cpu" or not t.is_contiguous():
                raise MismatchError(
                    f"{name}: patched on CPU but now on {t.device} or non-contiguous"
                )
            arrays = (record.positions, record.values)
            counts = _core.remove(to_numpy(t), list(deltas), list(alphas), *arrays)
            _written(t)
            return counts
        torch = _torch()
        with torch.no_grad():
            acc = _acc(deltas, alphas, t.device, t.numel())
            w = t.detach().reshape(-1)
            old = (w.float() - acc).to(t.dtype)
            again = (old.float() + acc).to(t.dtype)
            inconsistent = int((_bits(again) != _bits(w)).sum())
            corrected = 0
            if record is not None:
                pos, vals = record.positions.to(t.device), record.values.to(t.device)
                old[pos] = vals
                corrected = len(record)
            t.detach().copy_(old.view(t.shape))
        return corrected, inconsistent

    def snapshot(self, name: str) -> Any:
        return self.tensors[name].detach().clone()

    def restore(self, name: str, snap: Any) -> None:
        torch = _torch()
        with torch.no_grad():
            self.tensors[name].detach().copy_(snap)

    def sample(self, name: str, positions: np.ndarray) -> bytes:
        """The bytes of the elements at ``positions`` (flat indices)."""
        torch = _torch()
        t = self.tensors[name].detach().reshape(-1)
        picked = t[torch.from_numpy(positions).to(t.device)].cpu()
        return picked.view(torch.uint8).numpy().tobytes()

    def read_values(self, name: str) -> np.ndarray:
        return self.tensors[name].detach().double().cpu().numpy()

    def write_values(self, name: str, x: np.ndarray) -> None:
        torch = _torch()
        t = self.tensors[name]
        with torch.no_grad():
            t.detach().copy_(torch.from_numpy(x).to(device=t.device, dtype=t.dtype).view(t.shape))
