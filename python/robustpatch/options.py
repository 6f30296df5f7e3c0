"""The keyword options of a patch, declared once.

``apply_file``, ``onnx.apply``, ``apply``/``subtract`` and a pipeline ``Job`` take
them as keywords (``force=True``...), each entry point naming the ones it takes; the
command line sets them with the flags of :mod:`robustpatch.cli.patch_flags`, and the
writers behind ``apply_file`` (one file, sharded, in place) receive them as one
:class:`PatchOptions` inside a :class:`robustpatch.files.PatchCall`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields

from .errors import InvalidArgumentError
from .validate import is_bool

__all__ = ["PatchOptions", "FILE_OPTIONS", "MEMORY_OPTIONS", "EXECUTORS"]

#: Where a pipeline runs its jobs (:func:`robustpatch.pipeline.run`, ``robustpatch batch
#: --executor``): a local process pool or Ray tasks.
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class PatchOptions:
    """How a patch is checked and written.

    ``force``: accept a dtype or a shape (of the same element count) other than the
    signature's. ``allow_dtype_change``: accept a float tensor of another dtype than the
    signature was made for. ``undo``: write an undo record. ``durable``: fsync the
    outputs before they are renamed into place. ``allow_nonfinite``: write a result that
    overflows the tensor's dtype (±Inf) instead of refusing it (NonFiniteError).
    """

    force: bool = False
    allow_dtype_change: bool = False
    undo: bool = True
    durable: bool = False
    allow_nonfinite: bool = False

    @classmethod
    def of(cls, options: Mapping[str, object], fn: str, allowed: Collection[str]) -> PatchOptions:
        """The options a call to ``fn`` passed as keywords, each one of ``allowed``: another
        name is a TypeError (as Python gives for any function), a value other than True or
        False an InvalidArgumentError naming it."""
        for name, value in options.items():
            if name not in allowed:
                raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}")
            if not is_bool(value):
                raise InvalidArgumentError(f"{name} must be true or false, got {value!r}")
        return cls(**{k: bool(v) for k, v in options.items()})


#: What a model file on disk takes (``apply_file``, ``onnx.apply``).
FILE_OPTIONS = frozenset(f.name for f in fields(PatchOptions))
#: What a model in memory takes (``apply``, ``subtract``): nothing is written.
MEMORY_OPTIONS = frozenset({"force", "allow_dtype_change", "allow_nonfinite"})
