"""The ``robustpatch`` command line.

Each subcommand is registered by one small function decorated with :func:`command`
(it adds its parser and sets ``func``); more can be added the same way. Expected errors
(bad files, mismatched models, I/O) are printed as one line ``robustpatch: error: ...``
with exit code 1; usage errors exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EXPECTED_ERRORS

PROG = "robustpatch"
Register = Callable[[Any], None]

#: Functions that add one subcommand each to the subparsers object, in --help order.
COMMANDS: list[Register] = []


def command(fn: Register) -> Register:
    """Register a function that adds a subcommand (``fn(subparsers)``)."""
    COMMANDS.append(fn)
    return fn


def add_command(sub: Any, name: str, help: str, example: str, run: Callable[[Any], int]):
    """Add a subparser with a description, an ``Example:`` epilog and a handler."""
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="example:\n  " + example.strip().replace("\n", "\n  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=run)
    return p


@contextmanager
def progress_bar(args: Any, desc: str, total: int | None = None, unit: str = "B"):
    """A tqdm bar on stderr (hidden with --quiet or when stderr is not a terminal);
    yields a callable taking increments."""
    from tqdm import tqdm

    disable = True if getattr(args, "quiet", False) else None
    with tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=disable,
        file=sys.stderr,
        leave=False,
    ) as bar:
        yield bar.update


def _say(args: Any, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text)


# ---------------------------------------------------------------------------- extract


def _layers_arg(values: list[str] | None) -> Any:
    if not values:
        return "auto"
    if len(values) == 1:
        v = values[0]
        if v in ("auto", "all"):
            return v
        if v.isdigit():
            return int(v)
    return values


def _kv(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _add_quant_args(p: Any, required: bool) -> None:
    note = "" if required else " (default: no quantization)"
    p.add_argument(
        "--bits", type=int, default=4 if required else None, help="bits per weight, 1-8" + note
    )
    p.add_argument("--scheme", default="affine", choices=["affine", "symmetric", "log", "tanh"])
    p.add_argument("--granularity", default="group", choices=["tensor", "channel", "group"])
    p.add_argument("--group", type=int, default=128, help="group size (default 128)")


def run_extract(args: Any) -> int:
    from .extract import extract

    with progress_bar(args, "extract", unit="tensor") as tick:
        sig = extract(
            None if args.pretrained == "-" else args.pretrained,
            args.clean,
            args.robust,
            layers=_layers_arg(args.layers),
            method=args.method,
            energy=args.energy,
            name=args.name or Path(args.output).stem,
            provenance=_kv(args.provenance),
            progress=tick,
        )
    if args.bits:
        sig = sig.quantize(args.bits, args.scheme, args.granularity, args.group)
    sig.save(args.output)
    layers = sig.meta["layers"]
    _say(
        args,
        f"wrote {args.output}: {len(sig)} entries, {sig.nbytes} bytes "
        f"({layers.get('units', '?')} of {layers.get('of', '?')} layers)",
    )
    return 0


@command
def add_extract(sub: Any) -> None:
    p = add_command(
        sub,
        "extract",
        "extract a robust weight signature from pretrained, clean and robust checkpoints",
        "robustpatch extract pre.safetensors clean.safetensors fog.safetensors -o fog.rws "
        "--bits 4 --provenance corruption=fog",
        run_extract,
    )
    p.add_argument("pretrained", help="pretrained checkpoint ('-' with --method difference)")
    p.add_argument("clean", help="clean fine-tune (.safetensors, *.index.json or .pt)")
    p.add_argument("robust", help="robust fine-tune, same architecture")
    p.add_argument("-o", "--output", required=True, help="signature file to write")
    p.add_argument(
        "--layers",
        action="append",
        help="auto (default), all, a number of leading layers, or regexes (repeat)",
    )
    p.add_argument("--energy", type=float, default=0.9, help="energy share for --layers auto")
    p.add_argument("--method", default="projection", choices=["projection", "difference"])
    p.add_argument("--name", help="signature name (default: the output file's stem)")
    p.add_argument(
        "--provenance", action="append", metavar="KEY=VALUE", help="provenance to record (repeat)"
    )
    _add_quant_args(p, required=False)


# ---------------------------------------------------------------------------- quantize


def run_quantize(args: Any) -> int:
    from .signature import Signature

    sig = Signature.load(args.input)
    q = sig.quantize(args.bits, args.scheme, args.granularity, args.group)
    q.save(args.output)
    _say(args, f"wrote {args.output}: {q.nbytes} bytes ({q.delta_ratio:.3f} of the float32 delta)")
    return 0


@command
def add_quantize(sub: Any) -> None:
    p = add_command(
        sub,
        "quantize",
        "compress a signature's deltas to a few bits per weight",
        "robustpatch quantize fog.rws -o fog4.rws --bits 4 --scheme affine --group 128",
        run_quantize,
    )
    p.add_argument("input", help="signature file")
    p.add_argument("-o", "--output", required=True, help="quantized signature file to write")
    _add_quant_args(p, required=True)


# ---------------------------------------------------------------------------- apply / remove


def _alphas(values: list[float] | None, n: int) -> list[float]:
    if not values:
        return [1.0] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{n} signatures but {len(values)} --alpha values")
    return values


def run_apply(args: Any) -> int:
    from .files import apply_file

    alphas = _alphas(args.alpha, len(args.signatures))
    total = os.path.getsize(args.model)
    with progress_bar(args, "apply", total) as tick:
        rep = apply_file(
            args.model,
            args.signatures,
            alphas,
            args.output,
            force=args.force,
            undo=not args.no_undo,
            durable=args.durable,
            progress=tick,
        )
    undo = f"; undo record {rep.undo}" if rep.undo else ""
    _say(
        args,
        f"wrote {rep.out}: {rep.tensors} tensors patched, "
        f"{rep.bn_buffers} BatchNorm buffers blended{undo}",
    )
    return 0


@command
def add_apply(sub: Any) -> None:
    p = add_command(
        sub,
        "apply",
        "patch a safetensors model with one or more signatures (atomic, with undo record)",
        "robustpatch apply model.safetensors fog.rws noise.rws --alpha 1 --alpha 0.5 "
        "-o robust.safetensors",
        run_apply,
    )
    p.add_argument("model", help="safetensors model file (left untouched)")
    p.add_argument("signatures", nargs="+", help="signature files")
    p.add_argument("-o", "--output", required=True, help="patched model to write")
    p.add_argument(
        "--alpha",
        type=float,
        action="append",
        help="strength per signature (repeat; one value applies to all; default 1)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="apply despite dtype/shape mismatches (same element count)",
    )
    p.add_argument("--no-undo", action="store_true", help="do not write the .rpundo record")
    add_durable_flag(p)


def run_remove(args: Any) -> int:
    from .files import remove_file

    total = os.path.getsize(args.patched)
    with progress_bar(args, "remove", total) as tick:
        rep = remove_file(
            args.patched, args.output, undo=args.undo, durable=args.durable, progress=tick
        )
    _say(
        args,
        f"wrote {rep.out}: {rep.tensors} tensors and {rep.bn_buffers} BatchNorm "
        "buffers restored bit for bit",
    )
    return 0


@command
def add_remove(sub: Any) -> None:
    p = add_command(
        sub,
        "remove",
        "restore the original of a patched model, bit for bit, from its undo record",
        "robustpatch remove robust.safetensors -o original.safetensors",
        run_remove,
    )
    p.add_argument("patched", help="model written by 'robustpatch apply'")
    p.add_argument("-o", "--output", required=True, help="restored model to write")
    p.add_argument("--undo", help="undo record (default: PATCHED.rpundo)")
    add_durable_flag(p)


def add_durable_flag(p: Any) -> None:
    p.add_argument(
        "--durable",
        action="store_true",
        help="fsync the output before renaming it into place, so that it survives a power "
        "cut (runs at disk speed)",
    )


# ---------------------------------------------------------------------------- inspect


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def signature_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The facts ``inspect`` shows about a signature file, as a JSON-able dict."""
    from .signature import Signature

    sig = Signature.load(path)
    energy = sig.energy()
    total_e = sum(energy.values()) or 1.0
    rows = []
    for e in sig:
        row = {k: v for k, v in e.spec().items() if k != "stats"}
        row["bytes"] = e.nbytes
        if e.kind == "delta":
            row["f32_bytes"] = 4 * e.numel
            row["ratio"] = e.nbytes / (4 * e.numel) if e.numel else 1.0
            row["energy"] = energy[e.name]
            row["energy_share"] = energy[e.name] / total_e
        rows.append(row)
    size = os.path.getsize(path)
    return {
        "file": str(path),
        "kind": "signature",
        "name": sig.name,
        "format_version": 1,
        "method": sig.meta.get("method"),
        "entries": rows,
        "bytes": sig.nbytes,
        "file_bytes": size,
        "f32_delta_bytes": sig.dense_nbytes,
        "delta_ratio": sig.delta_ratio,
        "file_ratio": size / sig.dense_nbytes if sig.dense_nbytes else None,
        "model_bytes": sig.meta.get("source", {}).get("model_nbytes"),
        "smaller_than_model": sig.compression_ratio(),
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
    from .container import read_header
    from .files import APPLIED_KEY, applied_signatures, undo_path_for

    h = read_header(path)
    dtypes: dict[str, int] = {}
    for t in h.tensors:
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
    undo = undo_path_for(path)
    return {
        "file": str(path),
        "kind": "model",
        "bytes": h.file_size,
        "tensors": len(h.tensors),
        "dtypes": dtypes,
        "applied": applied_signatures(h),
        "undo": str(undo) if undo.exists() else None,
        "metadata": {k: v for k, v in h.metadata.items() if k != APPLIED_KEY},
    }


def undo_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``inspect`` shows about an undo record."""
    from .files import load_undo_signatures

    sigs, alphas = load_undo_signatures(path)
    return {
        "file": str(path),
        "kind": "undo",
        "bytes": os.path.getsize(path),
        "signatures": [
            {"name": s.name, "hash": s.content_hash, "alpha": a} for s, a in zip(sigs, alphas)
        ],
    }


def inspect_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Dispatch on what the file holds (signature, undo record or model)."""
    from .container import read_header
    from .files import UNDO_KEY
    from .signature import META_KEY

    meta = read_header(path).metadata
    if META_KEY in meta:
        return signature_report(path)
    if UNDO_KEY in meta:
        return undo_report(path)
    return model_report(path)


def _print_table(rows: list[list[str]], head: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _print_signature(rep: dict[str, Any]) -> None:
    print(
        f"{rep['file']}: signature {rep['name']!r} (format {rep['format_version']}, "
        f"method {rep['method']}, {len(rep['entries'])} entries)"
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
                e.get("bits", "-") if q else "f32",
                e.get("scheme", "-"),
                e.get("group_len", "-"),
                e["bytes"],
                f"{e['ratio']:.3f}" if "ratio" in e else "-",
                f"{e['energy']:.3g} ({100 * e['energy_share']:.1f}%)" if "energy" in e else "-",
            ]
        )
    _print_table(
        rows,
        ["tensor", "kind", "shape", "dtype", "bits", "scheme", "group", "bytes", "ratio", "energy"],
    )
    file_ratio = f" (whole file {rep['file_ratio']:.3f})" if rep["file_ratio"] else ""
    print(
        f"stored {_fmt_bytes(rep['bytes'])} (file {_fmt_bytes(rep['file_bytes'])}); "
        f"float32 delta {_fmt_bytes(rep['f32_delta_bytes'])}; "
        f"compression ratio vs the float32 delta {rep['delta_ratio']:.3f}{file_ratio}"
    )
    if rep.get("smaller_than_model"):
        print(
            f"{rep['smaller_than_model']:.1f}x smaller than the model it came from "
            f"({_fmt_bytes(rep['model_bytes'])})"
        )
    print(f"content hash {rep['content_hash']}")
    print(f"architecture fingerprint {rep['fingerprints']['architecture']}")
    print(f"base fingerprint {rep['fingerprints']['base']}")
    for key in ("layers", "quantization", "provenance", "effect", "components", "skipped"):
        if key in rep:
            print(f"{key}: {json.dumps(rep[key])}")


def _print_model(rep: dict[str, Any]) -> None:
    dt = ", ".join(f"{n} {d}" for d, n in sorted(rep["dtypes"].items()))
    print(f"{rep['file']}: model, {rep['tensors']} tensors ({dt}), {_fmt_bytes(rep['bytes'])}")
    if not rep["applied"]:
        print("no robustpatch signatures applied")
    for a in rep["applied"]:
        print(f"applied {a.get('name')!r} alpha={a.get('alpha')} hash={a.get('hash')}")
    print(f"undo record: {rep['undo'] or 'none'}")


def run_inspect(args: Any) -> int:
    rep = inspect_report(args.file)
    if args.json:
        print(json.dumps(rep, indent=2))
    elif rep["kind"] == "signature":
        _print_signature(rep)
    elif rep["kind"] == "model":
        _print_model(rep)
    else:
        print(f"{rep['file']}: undo record, {_fmt_bytes(rep['bytes'])}")
        for s in rep["signatures"]:
            print(f"  {s['name']!r} alpha={s['alpha']} hash={s['hash']}")
    return 0


@command
def add_inspect(sub: Any) -> None:
    p = add_command(
        sub,
        "inspect",
        "describe a signature (per tensor: shape, bits, scheme, bytes, energy), a patched "
        "model or an undo record",
        "robustpatch inspect fog.rws --json",
        run_inspect,
    )
    p.add_argument("file", help="signature, model or .rpundo file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


# ---------------------------------------------------------------------------- similarity


def run_similarity(args: Any) -> int:
    from .signature import Signature, similarity

    sigs = [Signature.load(p) for p in args.signatures]
    m = similarity(sigs)
    names = [s.name for s in sigs]
    if args.json:
        print(json.dumps({"names": names, "files": args.signatures, "cosine": m.tolist()}))
        return 0
    rows = [[n, *(f"{x:+.3f}" for x in row)] for n, row in zip(names, np.asarray(m))]
    _print_table(rows, ["", *names])
    return 0


@command
def add_similarity(sub: Any) -> None:
    p = add_command(
        sub,
        "similarity",
        "cosine similarity matrix of signatures (over the tensors they share)",
        "robustpatch similarity fog.rws snow.rws noise.rws",
        run_similarity,
    )
    p.add_argument("signatures", nargs="+", help="signature files")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command
def add_demo(sub: Any) -> None:
    p = add_command(
        sub,
        "demo",
        "train clean and robust models on embedded data, extract signatures, patch, "
        "evaluate and write a report (needs the torch extra)",
        "robustpatch demo --quick --out report",
        run_demo,
    )
    p.add_argument("--quick", action="store_true", help="smaller run (minutes on 2 CPU cores)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", type=Path, default=Path("report"), help="report folder")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice); CPU results reproduce exactly "
        "only with the thread count the report records",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def run_demo(args: Any) -> int:
    try:
        from .lab import demo
    except ImportError as e:
        print(
            f"{PROG}: error: the demo needs the torch extra ({e}); "
            "install it with: pip install 'robustpatch[torch]'",
            file=sys.stderr,
        )
        return 1
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    results = demo.run(
        args.out,
        quick=args.quick,
        device=args.device,
        log=log,
        progress=not args.quiet,
        threads=args.threads,
    )
    for s in results["summary"]:
        best = max(s["recovered"].items(), key=lambda kv: kv[1] if kv[1] == kv[1] else -1e9)
        print(
            f"{s['corruption']:16s} clean {s['mean']['clean']:5.1f}%  "
            f"BN-only {s['mean']['bn_reestimation_only']:5.1f}%  "
            f"robust {s['mean']['robust']:5.1f}%  best patch {best[0]} "
            f"{s['mean'][best[0]]:5.1f}%"
        )
    print(f"report: {args.out / 'report.md'}")
    return 0


# ---------------------------------------------------------------------------- main


def build_parser(commands: Sequence[Register] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Robust weight signatures: extract, compress, apply and remove robustness.",
        epilog="example:\n  robustpatch apply model.safetensors fog.rws -o robust.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in commands if commands is not None else COMMANDS:
        register(sub)
    return parser


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    text = str(e) or type(e).__name__
    if isinstance(e, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a file
        why = [ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln]
        text = "refused to load a checkpoint that holds more than tensors (read with " + (
            f"torch.load(weights_only=True)): {why[0] if why else text.splitlines()[0]}"
        )
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())  # one line


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 usage)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (*EXPECTED_ERRORS, pickle.UnpicklingError) as e:
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
