"""Robust weight signatures: entries, the data model and its algebra, the file format.

- :mod:`.entry`: one tensor's delta (dense or quantized) or BatchNorm replacement;
- :mod:`.model`: :class:`Signature` (entries × weight) and :class:`SignatureSum`;
- :mod:`.codec`: the signature file, its validating parser and content hash;
- :mod:`.algebra`: terms for patching, :func:`combine`, BatchNorm blending,
  :func:`similarity` and :func:`detect`.
"""

from .algebra import (
    blend_bn,
    blend_bn_array,
    bn_blend_weights,
    combine,
    detect,
    similarity,
    terms,
)
from .codec import (
    FORMAT_VERSION,
    META_KEY,
    content_hash,
    from_parts,
    json_default,
    parse_meta_json,
)
from .entry import (
    Entry,
    Quantized,
    bn_entry,
    dense_entry,
    group_len_for,
    is_bn_stat,
    quantize_entry,
)
from .model import Signature, SignatureLike, SignatureSum, as_signature, as_signatures

__all__ = [
    "FORMAT_VERSION",
    "META_KEY",
    "Entry",
    "Quantized",
    "Signature",
    "SignatureLike",
    "SignatureSum",
    "as_signature",
    "as_signatures",
    "blend_bn",
    "blend_bn_array",
    "bn_blend_weights",
    "bn_entry",
    "combine",
    "content_hash",
    "dense_entry",
    "detect",
    "from_parts",
    "group_len_for",
    "is_bn_stat",
    "json_default",
    "parse_meta_json",
    "quantize_entry",
    "similarity",
    "terms",
]
