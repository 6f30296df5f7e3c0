"""``robustpatch inspect``: what a file holds — a signature (per tensor: shape, bits,
scheme, bytes, energy), a patched model (applied signatures, undo record) or an undo
record — as text or one JSON object."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ..errors import FormatError
from .output import fmt_bytes, json_text, print_table


def signature_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The facts ``inspect`` shows about a signature file, as a JSON-able dict."""
    from .._format.safetensors import read_header
    from ..signature import Signature
    from ..signature.codec import FORMAT_VERSION

    sig = Signature.load(path)
    stored = read_header(path).by_name()
    energy = sig.energy()
    total_e = sum(energy.values()) or 1.0
    rows, stored_as = [], {}
    for e in sig:
        row = {k: v for k, v in e.spec().items() if k != "stats"}
        row["bytes"] = e.nbytes
        if e.kind == "delta" and not e.is_quantized:  # compact storage: BF16/F16 if exact
            row["stored"], row["bytes"] = stored[e.name].dtype, stored[e.name].nbytes
            stored_as[row["stored"]] = stored_as.get(row["stored"], 0) + 1
        if e.kind == "delta":
            row["f32_bytes"] = 4 * e.numel
            row["ratio"] = row["bytes"] / (4 * e.numel) if e.numel else 1.0
            row["energy"] = energy[e.name]
            row["energy_share"] = energy[e.name] / total_e
        rows.append(row)
    size = os.path.getsize(path)
    stored_bytes = sum(r["bytes"] for r in rows)
    delta_bytes = sum(r["bytes"] for r in rows if r["kind"] == "delta")
    return {
        "file": str(path),
        "kind": "signature",
        "name": sig.name,
        "format_version": FORMAT_VERSION,
        "method": sig.meta.get("method"),
        "entries": rows,
        "bytes": stored_bytes,
        "dense_stored_as": stored_as,
        "unchanged_skipped": len(sig.meta.get("skipped") or []),
        "file_bytes": size,
        "f32_delta_bytes": sig.dense_nbytes,
        "delta_ratio": delta_bytes / sig.dense_nbytes if sig.dense_nbytes else 1.0,
        "file_ratio": size / sig.dense_nbytes if sig.dense_nbytes else None,
        "model_bytes": sig.meta.get("source", {}).get("model_nbytes"),
        "smaller_than_model": sig.compression_ratio(stored_bytes=stored_bytes),
        "content_hash": sig.content_hash,
        "fingerprints": {
            "architecture": sig.architecture_fingerprint,
            "base": sig.base_fingerprint,
        },
        **{
            k: sig.meta[k]
            for k in ("layers", "quantization", "provenance", "effect", "components", "skipped")
            if sig.meta.get(k)
        },
    }


def model_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``inspect`` shows about a model file: size, tensors, applied signatures."""
    from .._format.safetensors import read_header
    from .._io.journal import journal_path_for
    from ..files import APPLIED_KEY, applied_signatures, undo_path_for

    journal = journal_path_for(path)
    if journal.exists():  # its bytes may be half patched: say so before reading them
        raise FormatError(
            f"{path}: an in-place patch of it was interrupted ({journal}); run "
            f"'robustpatch recover {path}' first"
        )
    h = read_header(path)
    dtypes = _dtype_counts(h.tensors)
    undo = undo_path_for(path)
    applied, applied_from = applied_signatures(h, path), "header"
    recorded, unreadable = _recorded(undo) if undo.exists() else (None, None)
    if not applied and recorded:  # patched in place with no room in the header for it
        applied, applied_from = recorded, "undo record"
    return {
        "file": str(path),
        "kind": "model",
        "bytes": h.file_size,
        "tensors": len(h.tensors),
        "dtypes": dtypes,
        "applied": applied,
        "applied_from": applied_from if applied else None,
        "undo": str(undo) if undo.exists() else None,
        "undo_unreadable": unreadable,
        "metadata": {k: v for k, v in h.metadata.items() if k != APPLIED_KEY},
    }


def _recorded(undo: os.PathLike[str]) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The signatures the undo record beside a model says it removes, or why the file
    there is no undo record: a stray or damaged ``.rpundo`` is not shown as the model's."""
    from pathlib import Path

    from .._format.undo import read_record
    from ..errors import EXPECTED_ERRORS

    try:
        return read_record(Path(undo)).applied(), None
    except EXPECTED_ERRORS as e:
        return None, " ".join(str(e).split())


def _dtype_counts(tensors: Iterable[Any]) -> dict[str, int]:
    """How many of ``tensors`` (header entries) there are of each dtype."""
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return counts


def sharded_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`model_report` for a sharded checkpoint (its index or its folder): every
    shard's tensors, the signatures applied (from the index), the folder's undo record."""
    from .._format.shards import load_index
    from ..sharded import APPLIED_KEY, RECORD_NAME, applied_in_index

    index = load_index(path)
    dtypes = _dtype_counts(t for h in index.headers.values() for t in h.tensors)
    applied = applied_in_index(index)
    record = index.folder / RECORD_NAME
    return {
        "file": str(index.path),
        "kind": "model",
        "shards": len(index.shards),
        "bytes": sum(h.file_size for h in index.headers.values()),
        "tensors": sum(dtypes.values()),
        "dtypes": dtypes,
        "applied": applied,
        "undo": str(record) if record.exists() else None,
        "metadata": {k: v for k, v in index.metadata.items() if k != APPLIED_KEY},
    }


def undo_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``inspect`` shows about an undo record."""
    from pathlib import Path

    from .._format.undo import read_record

    return {
        "file": str(path),
        "kind": "undo",
        "bytes": os.path.getsize(path),
        "signatures": read_record(Path(path)).applied(),
    }


def sharded_undo_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`undo_report` for a sharded checkpoint's folder record: its shards, the
    patched ones, and the signatures a removal takes out (None in a record of an earlier
    release, which did not keep them; each patched shard's record embeds its part)."""
    from ..sharded import load_folder_record

    doc, index = load_folder_record(path)
    applied = doc.get("applied")
    return {
        "file": str(path),
        "kind": "undo",
        "bytes": os.path.getsize(path),
        "index": str(index.path),
        "shards": len(doc["shards"]),
        "patched_shards": sum("undo" in e for e in doc["shards"].values()),
        "signatures": None if applied is None else [dict(a, embedded=True) for a in applied],
    }


def inspect_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Dispatch on what the file holds (signature, undo record or model; a sharded
    checkpoint by its index or its folder)."""
    from .._format.safetensors import read_header
    from .._format.shards import RECORD_NAME, is_sharded
    from ..files import UNDO_KEY
    from ..signature import META_KEY

    if is_sharded(path):
        return sharded_report(path)
    if os.fspath(path).endswith(RECORD_NAME):
        return sharded_undo_report(path)
    if os.fspath(path).endswith(".onnx"):  # read as safetensors, a "header length" error
        raise FormatError(f"{os.fspath(path)}: an ONNX model: robustpatch onnx check describes it")
    meta = read_header(path).metadata
    if META_KEY in meta:
        return signature_report(path)
    if UNDO_KEY in meta:
        return undo_report(path)
    return model_report(path)


def _print_signature(rep: dict[str, Any]) -> None:
    print(
        f"{rep['file']}: signature {rep['name']!r} (format {rep['format_version']}, "
        f"method {rep['method'] or 'not recorded (made from deltas)'}, "
        f"{len(rep['entries'])} entries)"
    )
    rows = []
    for e in rep["entries"]:
        q = e["encoding"] == "quantized"
        rows.append(
            [
                e["name"],
                e["kind"],
                "x".join(map(str, e["shape"])) or "scalar",
                e["dtype"],
                e.get("bits", "-") if q else e.get("stored", "f32").lower(),
                e.get("scheme", "-"),
                e.get("group_len", "-"),
                e["bytes"],
                f"{e['ratio']:.3f}" if "ratio" in e else "-",
                f"{e['energy']:.3g} ({100 * e['energy_share']:.1f}%)" if "energy" in e else "-",
            ]
        )
    print_table(
        rows,
        ["tensor", "kind", "shape", "dtype", "bits", "scheme", "group", "bytes", "ratio", "energy"],
    )
    file_ratio = f" (whole file {rep['file_ratio']:.3f})" if rep["file_ratio"] else ""
    print(
        f"stored {fmt_bytes(rep['bytes'])} (file {fmt_bytes(rep['file_bytes'])}); "
        f"float32 delta {fmt_bytes(rep['f32_delta_bytes'])}; "
        f"compression ratio vs the float32 delta {rep['delta_ratio']:.3f}{file_ratio}"
    )
    ratio = rep.get("smaller_than_model")
    if ratio:
        than = f"{ratio:.1f}x smaller than" if ratio >= 1 else f"{1 / ratio:.2f}x the size of"
        print(f"{than} the model it came from ({fmt_bytes(rep['model_bytes'])})")
    if rep["dense_stored_as"] or rep["unchanged_skipped"]:
        kinds = ", ".join(f"{n} as {d}" for d, n in sorted(rep["dense_stored_as"].items()))
        print(
            f"dense deltas stored {kinds or 'none'} (BF16/F16 only where exact); "
            f"{rep['unchanged_skipped']} tensors skipped (unchanged, or not in the pretrained "
            "checkpoint)"
        )
    print(f"content hash {rep['content_hash']}")
    print(f"architecture fingerprint {rep['fingerprints']['architecture']}")
    print(f"base fingerprint {rep['fingerprints']['base']}")
    for key in ("layers", "quantization", "provenance", "effect", "components", "skipped"):
        if key in rep:
            print(f"{key}: {json_text(rep[key])}")


def _print_model(rep: dict[str, Any]) -> None:
    dt = ", ".join(f"{n} {d}" for d, n in sorted(rep["dtypes"].items()))
    shards = f" in {rep['shards']} shards" if "shards" in rep else ""
    print(
        f"{rep['file']}: model, {rep['tensors']} tensors ({dt}){shards}, {fmt_bytes(rep['bytes'])}"
    )
    if not rep["applied"]:
        print("no robustpatch signatures applied")
    where = " (from the undo record)" if rep.get("applied_from") == "undo record" else ""
    for a in rep["applied"]:
        print(f"applied {a.get('name')!r} alpha={a.get('alpha')} hash={a.get('hash')}{where}")
    if rep.get("undo_unreadable"):
        print(f"not an undo record: {rep['undo']} ({rep['undo_unreadable']})")
    else:
        print(f"undo record: {rep['undo'] or 'none'}")


def _print_undo(rep: dict[str, Any]) -> None:
    of = ""
    if "index" in rep:  # a sharded checkpoint's folder record
        of = f" of {rep['index']} ({rep['patched_shards']} of {rep['shards']} shards patched)"
    print(f"{rep['file']}: undo record{of}, {fmt_bytes(rep['bytes'])}")
    if rep["signatures"] is None:
        print("  the signatures it removes are not recorded (a record of an earlier release)")
    for s in rep["signatures"] or []:
        kept = "embedded" if s["embedded"] else "by reference"
        print(f"  {s['name']!r} alpha={s['alpha']} hash={s['hash']} ({kept})")


PRINTERS = {"signature": _print_signature, "model": _print_model, "undo": _print_undo}


def run_inspect(args: Any) -> None:
    """describe a signature (per tensor: shape, bits, scheme, bytes, energy), a patched
    model or an undo record

    example:
    robustpatch inspect fog.rws --json
    """
    rep = inspect_report(args.file)
    if args.json:
        print(json_text(rep, indent=2))
    else:
        PRINTERS[rep["kind"]](rep)


def inspect_arguments(p: Any) -> None:
    p.add_argument(
        "file", help="signature, model or .rpundo file; a sharded model by its index or folder"
    )
