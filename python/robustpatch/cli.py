"""The ``robustpatch`` command line.

Each subcommand is registered by one small function decorated with :func:`command`
(it adds its parser and sets ``func``); more can be added the same way. The
conventions are those of the tools people know:

- ``-q/--quiet`` and ``--json`` are accepted before or after the subcommand. With
  ``--json`` a command prints one JSON object on stdout and nothing else there.
- ``--help`` shows every option's default and an example; ``--version`` the version.
- No command writes over one of its inputs (also not through a symlink or a hard
  link), nor over an existing file unless ``--overwrite``; a refused call writes nothing.
- Bad values (bits, group size, regexes, device...) are usage errors: exit code 2
  (argparse), before anything is read or created. Expected errors (bad files,
  mismatched models, I/O) are one line ``robustpatch: error: ...`` with exit code 1,
  naming the user's paths and the CLI's flags (``--force``, not ``force=True``).
- A reader that goes away (``robustpatch inspect x --json | head -1``) ends the
  command quietly with exit code 141, 128 + SIGPIPE, as a shell reports for the
  classic tools that SIGPIPE kills.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import validate
from ._core import __version__
from .errors import EXPECTED_ERRORS, InvalidArgumentError

PROG = "robustpatch"
Register = Callable[[Any], None]

#: Exit code after a closed stdout (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141

#: Library keywords that error messages name, and the CLI flags that set them.
FLAG_OF_KEYWORD = {
    "allow_dtype_change=True": "--allow-dtype-change",
    "force=True": "--force",
    "overwrite=True": "--overwrite",
    "undo=False": "--no-undo",
}

#: Functions that add one subcommand each to the subparsers object, in --help order.
COMMANDS: list[Register] = []


def command(fn: Register) -> Register:
    """Register a function that adds a subcommand (``fn(subparsers)``)."""
    COMMANDS.append(fn)
    return fn


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples as written, and each option's default where it has one
    (not for on/off flags or options that are off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def global_options(json_output: bool, top: bool = False) -> argparse.ArgumentParser:
    """``-q`` (and ``--json``) as a parent parser. A subcommand's copy defaults to
    SUPPRESS, so that it sets the option when given after the subcommand and leaves
    the top-level value alone otherwise: the position does not matter."""
    p = argparse.ArgumentParser(add_help=False)
    default = False if top else argparse.SUPPRESS
    p.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars or notes"
    )
    if json_output:
        p.add_argument(
            "--json",
            action="store_true",
            default=default,
            help="print one JSON object on stdout instead of text",
        )
    return p


def add_command(
    sub: Any,
    name: str,
    help: str,
    example: str,
    run: Callable[[Any], int],
    json_output: bool = True,
):
    """Add a subparser with a description, an ``Example:`` epilog, the global options
    and a handler."""
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="example:\n  " + example.strip().replace("\n", "\n  "),
        formatter_class=HelpFormatter,
        parents=[global_options(json_output)],
    )
    p.set_defaults(func=run, json_output=json_output)
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


def _report(args: Any, rep: dict[str, Any], text: str) -> None:
    """Print ``rep`` as one JSON object with --json, else ``text`` (unless --quiet)."""
    if args.json:
        print(json.dumps(rep))
    else:
        _say(args, text)


# ---------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parsed(parse: Any, normalise: Any, kind: str) -> Any:
    """An argparse type: ``parse`` the text, then check it with the API's own normaliser
    (:mod:`robustpatch.validate`), so a flag and a keyword follow one rule."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            return normalise(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


_bits = _parsed(int, validate.bits, "bits from 1 to 8")
_group = _parsed(int, validate.group, "a positive integer group size")
_alpha = _parsed(float, validate.alpha, "a number")
_coef = _parsed(float, lambda v: validate.alpha(v, "coefficient"), "a number")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _layer_spec(text: str) -> str:
    """A ``--layers`` value: a keyword, a count, or a regex that compiles."""
    if text in ("auto", "all") or text.isdigit():
        return text
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"invalid regex {text!r}: {e}") from None
    return text


def _device(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N, checked against this machine's torch before
    the demo creates anything."""
    try:
        import torch
    except ImportError as e:
        raise argparse.ArgumentTypeError(f"--device needs the torch extra ({e})") from None
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r} requested but torch.cuda.is_available() is False on this machine"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r} requested but this machine has {torch.cuda.device_count()} CUDA devices"
        )
    return text


def _add_output(p: Any, help: str) -> None:
    p.add_argument("-o", "--output", required=True, help=help)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (never one of the inputs)",
    )


def _check_outputs(args: Any, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
    """Refuse, before any work, outputs that are inputs or exist (without --overwrite)."""
    from ._io.atomic import check_destinations

    check_destinations(inputs, outputs, overwrite=args.overwrite)


def _file_labels(paths: Sequence[str]) -> list[str]:
    """A label per file: its basename, or the path as given where two files share it."""
    names = [os.path.basename(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def _per_signature(values: list[float] | None, n: int, flag: str) -> list[float]:
    """One value per signature: none given means 1, one value applies to all."""
    return validate.alphas(n, values or 1.0, flag)


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
            raise InvalidArgumentError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _input_files(path: str) -> list[str]:
    """The files a checkpoint argument reads: the file, and a sharded checkpoint's
    shards (from its index; an unreadable index is left for extract to report)."""
    if not path.endswith(".json"):
        return [path]
    try:
        with open(path) as f:
            shards = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [path]
    folder = os.path.dirname(path)
    return [path, *(os.path.join(folder, s) for s in sorted(shards) if isinstance(s, str))]


def _add_quant_args(p: Any, required: bool) -> None:
    note = "" if required else "; leave out for no quantization"
    p.add_argument(
        "--bits", type=_bits, default=4 if required else None, help="bits per weight, 1-8" + note
    )
    p.add_argument(
        "--scheme",
        default="affine",
        choices=validate.SCHEMES,
        help="how values map to codes: min/max, absmax, log or tanh companding",
    )
    p.add_argument(
        "--granularity",
        default="group",
        choices=validate.GRANULARITIES,
        help="one scale per tensor, per output channel or per --group elements",
    )
    p.add_argument("--group", type=_group, default=128, help="group size")


def _layer_kwargs(args: Any) -> dict[str, Any]:
    """``layers`` (and ``param_budget``) for extract; a budget replaces the layer rule."""
    layers = _layers_arg(args.layers)
    if args.param_budget is None:
        return {"layers": layers}
    if layers != "auto":
        raise InvalidArgumentError(
            "--param-budget cannot be combined with --layers all, N or a regex"
        )
    return {"layers": layers, "param_budget": args.param_budget}


def run_extract(args: Any) -> int:
    from .extract import extract

    models = [m for m in (args.pretrained, args.clean, args.robust) if m != "-"]
    _check_outputs(args, [f for m in models for f in _input_files(m)], [args.output])
    with progress_bar(args, "extract", unit="tensor") as tick:
        sig = extract(
            None if args.pretrained == "-" else args.pretrained,
            args.clean,
            args.robust,
            **_layer_kwargs(args),
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
    left_out = {k: sig.meta.get(k) or [] for k in ("skipped", "dropped")}
    rep = {
        "file": args.output,
        "name": sig.name,
        "entries": len(sig),
        "bytes": sig.nbytes,
        "layers": layers,
        **left_out,
        "quantization": sig.meta.get("quantization"),
    }
    text = (
        f"wrote {args.output}: {len(sig)} entries, {sig.nbytes} bytes "
        f"({layers.get('units', '?')} of {layers.get('of', '?')} layers)"
    )
    why = {"skipped": "unchanged", "dropped": "changed but outside the selected layers"}
    for key, names in left_out.items():
        if names:
            text += f"\n{key} {len(names)} tensors ({why[key]}): {', '.join(names)}"
    _report(args, rep, text)
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
    _add_output(p, "signature file to write")
    p.add_argument(
        "--layers",
        action="append",
        type=_layer_spec,
        help="auto (default), all, a number of leading layers, or regexes (repeat)",
    )
    p.add_argument(
        "--param-budget",
        type=_fraction,
        metavar="FRACTION",
        help="leading layers holding at most this share of the model's parameters, "
        "in (0, 1] (instead of --layers)",
    )
    p.add_argument("--energy", type=float, default=0.9, help="energy share for --layers auto")
    p.add_argument(
        "--method",
        default="projection",
        choices=["projection", "difference"],
        help="robust change orthogonal to the clean one (the paper's), or robust minus clean",
    )
    p.add_argument("--name", help="signature name (default: the output file's stem)")
    p.add_argument(
        "--provenance", action="append", metavar="KEY=VALUE", help="provenance to record (repeat)"
    )
    _add_quant_args(p, required=False)


# ---------------------------------------------------------------------------- quantize


def run_quantize(args: Any) -> int:
    from .signature import Signature

    _check_outputs(args, [args.input], [args.output])
    sig = Signature.load(args.input)
    q = sig.quantize(args.bits, args.scheme, args.granularity, args.group)
    q.save(args.output)
    rep = {
        "file": args.output,
        "bytes": q.nbytes,
        "delta_ratio": q.delta_ratio,
        "quantization": q.meta["quantization"],
    }
    _report(
        args,
        rep,
        f"wrote {args.output}: {q.nbytes} bytes ({q.delta_ratio:.3f} of the float32 delta)",
    )
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
    _add_output(p, "quantized signature file to write")
    _add_quant_args(p, required=True)


# ------------------------------------------------------------ apply / subtract / remove


def _patch_file(args: Any, sign: float, desc: str) -> dict[str, Any]:
    """``apply_file`` of the model with the signatures at ``sign · α``; the report."""
    from .files import apply_file, undo_path_for

    outputs = [args.output] if args.no_undo else [args.output, undo_path_for(args.output)]
    _check_outputs(args, [args.model, *args.signatures], outputs)
    alphas = [sign * a for a in _per_signature(args.alpha, len(args.signatures), "--alpha")]
    total = os.path.getsize(args.model)
    with progress_bar(args, desc, total) as tick:
        rep = apply_file(
            args.model,
            args.signatures,
            alphas,
            args.output,
            force=args.force,
            allow_dtype_change=args.allow_dtype_change,
            undo=not args.no_undo,
            durable=args.durable,
            progress=tick,
        )
    return {
        "file": str(rep.out),
        "undo": str(rep.undo) if rep.undo else None,
        "tensors": rep.tensors,
        "bn_buffers": rep.bn_buffers,
        "bytes": rep.bytes_written,
        "signatures": args.signatures,
        "alphas": alphas,
    }


def run_apply(args: Any) -> int:
    rep = _patch_file(args, 1.0, "apply")
    undo = f"; undo record {rep['undo']}" if rep["undo"] else ""
    text = (
        f"wrote {rep['file']}: {rep['tensors']} tensors patched, "
        f"{rep['bn_buffers']} BatchNorm buffers blended{undo}"
    )
    _report(args, rep, text)
    return 0


def run_subtract(args: Any) -> int:
    rep = _patch_file(args, -1.0, "subtract")
    rep["approximate"] = True
    undo = f"; undo record {rep['undo']}" if rep["undo"] else ""
    text = (
        f"wrote {rep['file']}: {rep['tensors']} tensors with the signatures subtracted "
        "(approximate: elements may differ by one unit in the last place from the model "
        "before the patch; 'robustpatch remove' with the patch's undo record is exact), "
        f"{rep['bn_buffers']} BatchNorm buffers left as they were{undo}"
    )
    _report(args, rep, text)
    return 0


def _add_patch_args(p: Any, model_help: str, alpha_help: str) -> None:
    p.add_argument("model", help=model_help)
    p.add_argument("signatures", nargs="+", help="signature files")
    _add_output(p, "patched model to write")
    p.add_argument("--alpha", type=_alpha, action="append", help=alpha_help)
    p.add_argument(
        "--allow-dtype-change",
        action="store_true",
        help="apply to float tensors of another dtype than the signature was made for "
        "(e.g. a float32 signature on a float16 or bfloat16 model); shapes are still checked",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="apply despite dtype and shape mismatches (same element count)",
    )
    p.add_argument("--no-undo", action="store_true", help="do not write the .rpundo record")
    add_durable_flag(p)


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
    _add_patch_args(
        p,
        "safetensors model file (left untouched)",
        "strength per signature (repeat; one value applies to all; default 1)",
    )


@command
def add_subtract(sub: Any) -> None:
    p = add_command(
        sub,
        "subtract",
        "take signatures out of a model without its undo record: the model minus "
        "alpha times each signature, rounded once (approximate; BatchNorm buffers stay "
        "as they are; 'remove' is exact where an undo record exists)",
        "robustpatch subtract robust.safetensors fog.rws -o unpatched.safetensors",
        run_subtract,
    )
    _add_patch_args(
        p,
        "safetensors model file a signature was applied to (left untouched)",
        "strength to take out per signature (repeat; one value applies to all; default 1)",
    )


def run_remove(args: Any) -> int:
    from .files import remove_file, undo_path_for

    undo = args.undo or undo_path_for(args.patched)
    _check_outputs(args, [args.patched, undo], [args.output])
    total = os.path.getsize(args.patched)
    with progress_bar(args, "remove", total) as tick:
        rep = remove_file(
            args.patched, args.output, undo=args.undo, durable=args.durable, progress=tick
        )
    text = (
        f"wrote {rep.out}: {rep.tensors} tensors and {rep.bn_buffers} BatchNorm "
        "buffers restored bit for bit"
    )
    out = {
        "file": str(rep.out),
        "tensors": rep.tensors,
        "bn_buffers": rep.bn_buffers,
        "bytes": rep.bytes_written,
    }
    _report(args, out, text)
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
    _add_output(p, "restored model to write")
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
    from ._format.safetensors import read_header
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
    from ._format.safetensors import read_header
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


# ---------------------------------------------------------------------------- similarity


def run_similarity(args: Any) -> int:
    from .signature import Signature, similarity

    sigs = [Signature.load(p) for p in args.signatures]
    m = np.asarray(similarity(sigs))
    labels = _file_labels(args.signatures)
    if args.json:
        rep = {
            "labels": labels,
            "files": args.signatures,
            "names": [s.name for s in sigs],
            "cosine": m.tolist(),
        }
        print(json.dumps(rep))
        return 0
    rows = [[n, *(f"{x:+.3f}" for x in row)] for n, row in zip(labels, m)]
    _print_table(rows, ["", *labels])
    return 0


@command
def add_similarity(sub: Any) -> None:
    p = add_command(
        sub,
        "similarity",
        "cosine similarity matrix of signatures, rows and columns labelled by file",
        "robustpatch similarity fog.rws snow.rws noise.rws",
        run_similarity,
    )
    p.add_argument("signatures", nargs="+", help="signature files")


# ---------------------------------------------------------------------------- combine


def run_combine(args: Any) -> int:
    from .signature import Signature, combine

    _check_outputs(args, args.signatures, [args.output])
    coefs = _per_signature(args.coef, len(args.signatures), "--coef")
    sig = combine([Signature.load(p) for p in args.signatures], coefs, name=args.name)
    sig.save(args.output)
    rep = {
        "file": args.output,
        "name": sig.name,
        "entries": len(sig),
        "bytes": sig.nbytes,
        "components": sig.meta["components"],
    }
    _report(args, rep, f"wrote {args.output}: signature {sig.name!r}, {len(sig)} entries")
    return 0


@command
def add_combine(sub: Any) -> None:
    p = add_command(
        sub,
        "combine",
        "weighted sum of signatures as one (unquantized) signature file: applying it at "
        "alpha 1 equals applying the parts with alpha = their coefficients",
        "robustpatch combine fog.rws noise.rws --coef 1 --coef 0.5 -o fog_noise.rws",
        run_combine,
    )
    p.add_argument("signatures", nargs="+", help="signature files")
    _add_output(p, "signature file to write")
    p.add_argument(
        "--coef",
        type=_coef,
        action="append",
        help="coefficient per signature (repeat; one value applies to all; default 1)",
    )
    p.add_argument(
        "--name", help="signature name (default: the sum written out, e.g. fog+0.5*noise)"
    )


# ---------------------------------------------------------------------------- detect


def _model_delta(model: str, base: str, names: set[str]) -> dict[str, np.ndarray]:
    """``model − base`` (float32) for the tensors in ``names`` both checkpoints hold."""
    from .dtypes import widen
    from .errors import MismatchError
    from .extract import open_source

    m, b = open_source(model), open_source(base)
    out = {}
    for n in sorted(names):
        ms, bs = m.spec(n), b.spec(n)
        if ms is None or bs is None or not (m.is_float(n) and b.is_float(n)):
            continue
        if ms[1] != bs[1]:
            raise MismatchError(f"{n}: shape {list(ms[1])} in {model}, {list(bs[1])} in {base}")
        out[n] = widen(m.get(n)) - widen(b.get(n))
    if not out:
        raise MismatchError(f"{model} and {base} share no tensor with the signatures")
    return out


def run_detect(args: Any) -> int:
    from .signature import Signature, detect

    if args.model is not None and args.base is None:
        raise InvalidArgumentError("--model needs --base, the checkpoint it was fine-tuned from")
    library = dict(zip(_file_labels(args.signatures), args.signatures))
    sigs = {label: Signature.load(p) for label, p in library.items()}
    if args.query is not None:
        query: Any = Signature.load(args.query)
    else:
        names = {n for s in sigs.values() for n in s.deltas}
        query = _model_delta(args.model, args.base, names)
    ranking = [
        {"label": label, "file": library[label], "name": sigs[label].name, "cosine": score}
        for label, score in detect(query, sigs)
    ]
    if args.json:
        print(json.dumps({"query": args.query or [args.model, args.base], "ranking": ranking}))
        return 0
    rows = [[r["label"], r["name"], f"{r['cosine']:+.3f}"] for r in ranking]
    _print_table(rows, ["signature", "name", "cosine"])
    return 0


@command
def add_detect(sub: Any) -> None:
    p = add_command(
        sub,
        "detect",
        "rank signatures by cosine similarity to a query: a signature, or the weight "
        "change of a fine-tuned model from its base",
        "robustpatch detect fog.rws snow.rws noise.rws --model tuned.safetensors "
        "--base clean.safetensors",
        run_detect,
    )
    p.add_argument("signatures", nargs="+", help="known signature files")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", help="signature file to identify")
    query.add_argument("--model", help="fine-tuned checkpoint whose change to identify")
    p.add_argument("--base", help="the checkpoint --model was fine-tuned from")


# ---------------------------------------------------------------------------- demo


@command
def add_demo(sub: Any) -> None:
    p = add_command(
        sub,
        "demo",
        "train clean and robust models on embedded data, extract signatures, patch, "
        "evaluate and write a report (needs the torch extra)",
        "robustpatch demo --quick --out report",
        run_demo,
        json_output=False,
    )
    p.add_argument("--quick", action="store_true", help="smaller run (minutes on 2 CPU cores)")
    p.add_argument(
        "--device", type=_device, default=None, help="cpu or cuda (default: cuda if available)"
    )
    p.add_argument("--out", type=Path, default=Path("report"), help="report folder")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice); CPU results reproduce exactly "
        "only with the thread count the report records",
    )


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
    for line in demo.console_lines(results):  # the pre-registered arm, not the best
        print(line)
    print(f"report: {args.out / 'report.md'}")
    return 0


# ---------------------------------------------------------------------------- main


def build_parser(commands: Sequence[Register] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Robust weight signatures: extract, compress, apply and remove robustness.",
        epilog="example:\n  robustpatch apply model.safetensors fog.rws -o robust.safetensors",
        formatter_class=HelpFormatter,
        parents=[global_options(json_output=True, top=True)],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in commands if commands is not None else COMMANDS:
        register(sub)
    return parser


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{os.fspath(e.filename)}: {e.strerror}"  # the path first, as cp and mv say
    else:
        text = str(e) or type(e).__name__
    if isinstance(e, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a file
        why = [ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln]
        text = "refused to load a checkpoint that holds more than tensors (read with " + (
            f"torch.load(weights_only=True)): {why[0] if why else text.splitlines()[0]}"
        )
    for keyword, flag in FLAG_OF_KEYWORD.items():
        text = text.replace(keyword, flag)
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())  # one line


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (e.g. a near-zero signature) as one line, like an error."""
    print(f"{PROG}: warning: {_message(Warning(str(message)))}", file=sys.stderr)


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away: point stdout at devnull, so that the interpreter's
    final flush does not fail again, and exit quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 usage, 141 closed stdout)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and not args.json_output:
        parser.error(f"{args.command} has no --json output")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe is reported here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (*EXPECTED_ERRORS, pickle.UnpicklingError) as e:
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
