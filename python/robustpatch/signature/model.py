"""The signature data model: :class:`Signature` (stored entries times a weight) and
:class:`SignatureSum` (several weighted signatures kept apart until applied).

Algebra keeps the form: ``α * sig`` shares ``sig``'s entries (quantized ones stay
quantized, their stats survive) and multiplies its ``weight``; ``a + b`` and ``a - b``
are a :class:`SignatureSum` of terms that apply fuses per tensor, rounding once. Only
:meth:`Signature.materialize` (and :func:`~robustpatch.signature.algebra.combine`)
decode and add the values into one dense signature. Files hold weight-1 signatures:
saving a scaled signature or a sum is refused with a pointer to ``materialize()``.

>>> sig = Signature.from_deltas({"w": np.ones(4, np.float32)}, name="fog")
>>> half = 0.5 * sig
>>> half.weight, half["w"] is sig["w"]
(0.5, True)
>>> [(s.name, a) for s, a in (half - 2 * sig).terms()]
[('fog', 0.5), ('fog', -2.0)]
"""

from __future__ import annotations

import copy
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Union

import numpy as np

from .. import validate
from ..errors import FormatError, InvalidArgumentError, shown
from . import codec
from .entry import Entry, bn_entry, dense_entry, quantize_entry, warn_if_groups_cost_more

__all__ = ["Signature", "SignatureSum", "SignatureLike", "as_signature", "as_signatures"]

#: What a term list holds: a weight-1 signature and the coefficient it is applied with.
Term = tuple["Signature", float]


class _Linear:
    """``+``, ``-``, ``*``, unary ``-`` and :meth:`quantize` for a class with ``terms()``,
    ``scaled()`` and ``_quantized()``: sums keep their terms, scaling multiplies a
    weight, arguments are checked here, once."""

    # numpy would take a signature for a sequence of entries: ``np.float64(0.5) * sig``
    # multiplied each entry (a TypeError). None makes numpy defer to __rmul__.
    __array_ufunc__ = None

    def __add__(self, other: Any) -> SignatureSum:
        if not isinstance(other, _Linear):
            return NotImplemented
        return SignatureSum(self.terms() + other.terms())  # type: ignore[attr-defined]

    def __sub__(self, other: Any) -> SignatureSum:
        if not isinstance(other, _Linear):
            return NotImplemented
        return self + other.scaled(-1.0)  # type: ignore[attr-defined]

    def __mul__(self, factor: Any) -> Any:
        if not isinstance(factor, numbers.Real) or isinstance(factor, (bool, np.bool_)):
            return NotImplemented
        return self.scaled(factor)  # type: ignore[attr-defined]

    __rmul__ = __mul__

    def __neg__(self) -> Any:
        return self.scaled(-1.0)  # type: ignore[attr-defined]

    def quantize(
        self,
        bits: int = 4,
        scheme: str = "affine",
        granularity: str = "group",
        group: int = 128,
    ) -> Signature:
        """A quantized copy: every delta entry coded with ``bits`` bits (1–8).

        ``scheme``: affine (min/max), symmetric (absmax), log or tanh companding;
        ``granularity``: one scale per ``tensor``, per output ``channel``, or per
        ``group`` of ``group`` contiguous elements. BN replacements stay float32; a
        signature's weight is kept; a sum is materialized first. Re-quantizing a
        quantized signature decodes it first. Every argument is checked before any
        work, whatever the signature holds.
        """
        return self._quantized(  # type: ignore[attr-defined]
            validate.bits(bits),
            validate.scheme(scheme),
            validate.granularity(granularity),
            validate.group(group),
        )


class Signature(_Linear):
    """A robust weight signature: named delta/BN entries plus metadata.

    Build one with :func:`robustpatch.extract`, :meth:`from_deltas` or
    :meth:`load`; compress with :meth:`quantize`; combine with ``+``, ``-`` and ``*``.
    """

    def __init__(
        self,
        entries: Iterable[Entry],
        *,
        name: str = "signature",
        meta: Mapping[str, Any] | None = None,
        weight: float = 1.0,
    ) -> None:
        self.entries: dict[str, Entry] = {}
        for e in entries:
            if e.name in self.entries:
                raise InvalidArgumentError(f"duplicate entry {e.name!r}")
            self.entries[e.name] = e
        if not isinstance(name, str):
            raise InvalidArgumentError(f"a signature's name must be a string, got {name!r}")
        self.name = name
        if meta is not None and not isinstance(meta, Mapping):
            raise InvalidArgumentError(f"meta must be a mapping, got {shown(meta)}")
        self.meta: dict[str, Any] = dict(meta or {})
        try:  # the keys robustpatch reads back (combine, inspect) have the types it writes
            codec.check_described(self.meta, "meta")
        except FormatError as e:
            raise InvalidArgumentError(str(e)) from None
        self.weight = validate.alpha(weight, "weight")
        # A signature loaded from an older file keeps the algorithm its hash was made with.
        self.hash_algorithm = codec.HASH_ALGORITHMS[0]
        self._check_file_names()

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_deltas(
        cls,
        deltas: Mapping[str, np.ndarray],
        *,
        bn: Mapping[str, np.ndarray] | None = None,
        dtypes: Mapping[str, str] | None = None,
        name: str = "signature",
        meta: Mapping[str, Any] | None = None,
    ) -> Signature:
        """A signature from plain arrays: ``deltas`` name → delta, ``bn`` name → replacement.

        ``dtypes`` gives the target dtype per name (default: the array's own dtype, so
        float32 deltas target float32 tensors). The signature keeps copies: the caller's
        arrays may change afterwards (a removal subtracts what was added, not what an
        array holds by then).
        """
        dtypes = dtypes or {}
        entries = [dense_entry(k, _own(v), dtypes.get(k)) for k, v in deltas.items()]
        entries += [bn_entry(k, _own(v), dtypes.get(k)) for k, v in (bn or {}).items()]
        return cls(entries, name=name, meta=meta)

    def _check_file_names(self) -> None:
        seen: dict[str, str] = {}
        for e in self.entries.values():
            for t in e.file_tensors():
                if t in seen:
                    raise InvalidArgumentError(
                        f"entries {seen[t]!r} and {e.name!r} both need the file tensor {t!r}"
                    )
                seen[t] = e.name

    # -- views ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> Entry:
        return self.entries[name]

    def __repr__(self) -> str:
        nq = sum(e.is_quantized for e in self.entries.values())
        weight = f", weight {self.weight:g}" if self.weight != 1 else ""
        return (
            f"Signature({self.name!r}{weight}, {len(self.entries)} entries, {nq} quantized, "
            f"{self.nbytes} bytes)"
        )

    @property
    def deltas(self) -> dict[str, Entry]:
        """The delta entries (not BatchNorm replacements)."""
        return {k: e for k, e in self.entries.items() if e.kind == "delta"}

    @property
    def bn(self) -> dict[str, Entry]:
        """The BatchNorm replacement entries."""
        return {k: e for k, e in self.entries.items() if e.kind == "bn"}

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the signature stores."""
        return sum(e.nbytes for e in self.entries.values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes the delta entries would take as float32 (the unquantized delta)."""
        return sum(4 * e.numel for e in self.deltas.values())

    @property
    def delta_ratio(self) -> float:
        """Stored bytes of the delta entries ÷ their float32 size (≈ 0.14 at 4 bits, G=128)."""
        stored = sum(e.nbytes for e in self.deltas.values())
        return stored / self.dense_nbytes if self.dense_nbytes else 1.0

    def compression_ratio(
        self, model_nbytes: int | None = None, stored_bytes: int | None = None
    ) -> float | None:
        """How many times smaller than the model it came from (``model_nbytes`` or the
        size recorded at extraction) its stored tensors are (``stored_bytes``, or
        :attr:`nbytes`); below 1 where the signature is the larger; None when unknown."""
        model_nbytes = model_nbytes or self.meta.get("source", {}).get("model_nbytes")
        stored = stored_bytes or self.nbytes
        if not model_nbytes or not stored:
            return None
        return float(model_nbytes) / stored

    def energy(self) -> dict[str, float]:
        """‖weight·δ‖² per delta entry."""
        w2 = self.weight * self.weight
        return {k: w2 * e.energy() for k, e in self.deltas.items()}

    @property
    def architecture_fingerprint(self) -> str:
        """sha256 over the names, shapes and dtypes of the tensors the signature touches."""
        return codec.architecture_fingerprint([e.spec() for e in self])

    @property
    def base_fingerprint(self) -> str | None:
        """Hash over the pretrained tensors the signature was extracted against, if known."""
        return self.meta.get("fingerprints", {}).get("base")

    # -- transforms -------------------------------------------------------------------

    def _quantized(self, bits: int, scheme: str, granularity: str, group: int) -> Signature:
        for e in self:
            warn_if_groups_cost_more(e, bits, granularity, group)
        entries = [quantize_entry(e, bits, scheme, granularity, group) for e in self]
        meta = copy.deepcopy(self.meta)
        meta["quantization"] = {
            "bits": bits,
            "scheme": scheme,
            "granularity": granularity,
            "group": group,
        }
        return Signature(entries, name=self.name, meta=meta, weight=self.weight)

    def dequantize(self) -> Signature:
        """An unquantized copy (dense float32 deltas), same weight."""
        entries = [
            replace(e, values=np.asarray(e.dense(), order="C"), quant=None) if e.quant else e
            for e in self
        ]
        meta = copy.deepcopy(self.meta)
        meta.pop("quantization", None)
        return Signature(entries, name=self.name, meta=meta, weight=self.weight)

    def materialize(self) -> Signature:
        """One dense weight-1 signature equal to this one (``weight`` folded into the
        values, as :func:`~robustpatch.signature.algebra.combine` does)."""
        if self.weight == 1:
            return self.dequantize()
        return SignatureSum([(self, 1.0)]).materialize()

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    def select(self, names: Iterable[str]) -> Signature:
        """A signature holding only the named entries (same weight)."""
        keep = set(names)
        return Signature(
            [e for e in self if e.name in keep],
            name=self.name,
            meta=copy.deepcopy(self.meta),
            weight=self.weight,
        )

    # -- algebra ----------------------------------------------------------------------

    def unit(self) -> Signature:
        """This signature with weight 1 (the same entries)."""
        return self if self.weight == 1 else self._with_weight(1.0)

    def scaled(self, factor: float) -> Signature:
        """``factor · self``: the same entries, the weight multiplied by ``factor``."""
        return self._with_weight(self.weight * validate.alpha(factor, "factor"))

    def _with_weight(self, weight: float) -> Signature:
        out = copy.copy(self)
        out.entries = dict(self.entries)
        out.meta = copy.deepcopy(self.meta)
        out.weight = validate.alpha(weight, f"weight of {self.name!r}")
        return out

    def terms(self) -> list[Term]:
        """``[(weight-1 signature, weight)]``: what apply adds, and at which α."""
        return [(self.unit(), self.weight)]

    # -- files ------------------------------------------------------------------------

    def file_tensors(self) -> dict[str, np.ndarray]:
        """Every tensor the file holds, by file name, in entry order."""
        out: dict[str, np.ndarray] = {}
        for e in self:
            out.update(e.file_tensors())
        return out

    def header_meta(self) -> dict[str, Any]:
        """The JSON object stored under ``__metadata__["robustpatch"]``."""
        return codec.header_meta(self)

    @property
    def content_hash(self) -> str:
        """``tensors-blake3`` (or, loaded from an older file, that file's algorithm) over
        the entry specs and the tensors as a file stores them: names, dtypes, shapes and
        bytes (not the weight: a scaled signature names the stored one it scales). See
        :mod:`robustpatch.signature.codec`."""
        return codec.signature_hash(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the signature file atomically (format: :mod:`robustpatch.signature.codec`).

        A file holds a weight-1 signature; a scaled one is refused (call
        :meth:`materialize` first, or apply the stored one with ``alphas``).
        """
        path = validate.output_file(path, "signature path")
        if self.weight != 1:
            raise InvalidArgumentError(
                f"signature {self.name!r} is scaled by {self.weight:g} and a file stores "
                "weight 1: save sig.materialize() (dense), or save the unscaled signature "
                "and apply it with alphas"
            )
        return codec.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Signature:
        """Read and validate a signature file (FormatError / NonFiniteError if bad)."""
        return codec.load(validate.path(path, "signature path"))


def _own(values: Any) -> np.ndarray:
    """A private copy of the caller's values (their dtype kept: the target's default); a
    torch tensor read as the torch bridge reads a model's (detached, bf16 as its bits)."""
    from ..torch_bridge import is_torch_object, to_numpy

    if is_torch_object(values):
        array = to_numpy(values)
        if array is None:
            raise InvalidArgumentError(f"a {values.dtype} tensor holds no float deltas")
        values = array
    return np.array(values, copy=True)


class SignatureSum(_Linear):
    """``Σ coef_k · sig_k`` kept as its terms: each ``sig_k`` keeps its stored (possibly
    quantized) entries and apply fuses them per tensor. Build one with ``+``/``-``.

    It has no file form: :meth:`materialize` fuses it into one dense signature.
    """

    def __init__(self, terms: Iterable[Term]) -> None:
        self._terms: list[Term] = []
        for sig, coef in terms:
            self._terms += [(s, validate.alpha(coef * c, "coefficient")) for s, c in sig.terms()]

    def terms(self) -> list[Term]:
        """``[(weight-1 signature, coefficient), ...]`` in the order they were summed."""
        return list(self._terms)

    @property
    def name(self) -> str:
        """The sum written out, e.g. ``fog+0.5*noise``."""
        return sum_name(self._terms)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the terms store (an entry shared by terms counts once)."""
        return sum({id(e): e.nbytes for s, _ in self._terms for e in s}.values())

    def __len__(self) -> int:
        return len(self._terms)

    def __repr__(self) -> str:
        return f"SignatureSum({self.name!r}, {len(self)} terms, {self.nbytes} bytes)"

    def scaled(self, factor: float) -> SignatureSum:
        """``factor · self``: every coefficient multiplied by ``factor``."""
        factor = validate.alpha(factor, "factor")
        return SignatureSum((s, c * factor) for s, c in self._terms)

    def materialize(self, name: str | None = None) -> Signature:
        """One dense weight-1 signature equal to the sum (see
        :func:`~robustpatch.signature.algebra.combine`)."""
        from .algebra import combine

        return combine([s for s, _ in self._terms], [c for _, c in self._terms], name=name)

    def _quantized(self, bits: int, scheme: str, granularity: str, group: int) -> Signature:
        return self.materialize()._quantized(bits, scheme, granularity, group)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Refused: a sum has no file form."""
        raise InvalidArgumentError(
            f"{self.name!r} is a sum of signatures kept as its terms: save "
            "sum.materialize() (one dense signature) or sum.quantize(bits)"
        )


def _term_name(sig: Signature) -> str:
    return f"({sig.name})" if any(c in sig.name for c in "+-*") else sig.name


def sum_name(terms: Sequence[Term]) -> str:
    """``Σ c·s`` written out: ``fog+0.5*noise-snow``."""
    out = ""
    for k, (sig, c) in enumerate(terms):
        sign = "-" if c < 0 else ("+" if k else "")
        mag = abs(c)
        out += sign + (_term_name(sig) if mag == 1 else f"{mag:g}*{_term_name(sig)}")
    return out


#: What the patch functions take for a signature: one, a sum of them, or a file's path
#: (the classes themselves, not their names: hints resolve in any module).
SignatureLike = Union[Signature, SignatureSum, str, os.PathLike[str]]


def as_signature(x: Any) -> Signature | SignatureSum:
    """A Signature (or sum), loading it if ``x`` is a path."""
    if isinstance(x, (Signature, SignatureSum)):
        return x
    if isinstance(x, (str, os.PathLike)):
        return Signature.load(x)
    raise InvalidArgumentError(f"expected a Signature or a path, got {type(x).__name__}")


def as_signatures(sigs: Any) -> list[Signature | SignatureSum]:
    """A list of Signatures (or sums) from one or several signatures or paths."""
    if isinstance(sigs, (Signature, SignatureSum, str, os.PathLike)):
        return [as_signature(sigs)]
    if isinstance(sigs, Mapping):  # its keys would be read as paths
        raise InvalidArgumentError(
            "a dict of deltas is not a signature: make one with Signature.from_deltas(deltas)"
        )
    if not isinstance(sigs, Iterable):
        raise InvalidArgumentError(
            f"expected a Signature, a path or a list of them, got {type(sigs).__name__}"
        )
    out = [as_signature(s) for s in sigs]
    if not out:  # a patch of nothing would still copy the model and write a record
        raise InvalidArgumentError("no signatures given: at least one signature is needed")
    return out
