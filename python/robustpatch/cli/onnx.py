"""``robustpatch onnx apply|remove|export|check``: ONNX models patched in their
initializers, restored from their undo record, exported from a checkpoint as measured
f32 / f16 / int8 variants, and checked as untrusted files."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..errors import MismatchError
from . import parser as cli_args
from .output import report
from .patch_flags import FLAGS, add_patch_arguments, patch_options


def run_onnx(args: Any) -> None:
    """patch, restore, export and check ONNX models (see each subcommand's --help)

    example:
    robustpatch onnx apply model.onnx fog.rws -o fog.onnx
    """
    return args.onnx_run(args)


def onnx_arguments(p: Any) -> None:
    sub = p.add_subparsers(dest="onnx_command", metavar="SUBCOMMAND")
    sub.required = True
    for name, run, arguments in (
        ("apply", run_apply, apply_arguments),
        ("remove", run_remove, remove_arguments),
        ("export", run_export, export_arguments),
        ("check", run_check, check_arguments),
    ):
        help, example = cli_args.Command(name, run, arguments).help_and_example()
        q = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog="example:\n  " + example.replace("\n", "\n  "),
            formatter_class=cli_args.HelpFormatter,
            parents=[cli_args.global_options(True)],
        )
        arguments(q)
        q.set_defaults(onnx_run=run, parser=q)


# ---------------------------------------------------------------------------- apply / remove


def run_apply(args: Any) -> None:
    r"""patch an ONNX model's initializers with signatures (atomic, with undo record);
    external data goes to OUTPUT.<8 hex>.data, a new name per write

    example:
    robustpatch onnx apply model.onnx fog.rws noise.rws --alpha 1 --alpha 0.5 -o robust.onnx
    """
    from ..files import undo_path_for
    from ..onnx import apply

    alphas = cli_args.per_signature(args.alpha, len(args.signatures), "--alpha")
    undo = [undo_path_for(args.output)] if args.undo else []
    _check_overwrite(args, [args.output, *undo])
    rep = apply(args.model, args.signatures, alphas, args.output, **patch_options(args))
    out = _files(rep) | {"signatures": args.signatures, "alphas": alphas}
    data = f" (external data {rep.data.name})" if rep.data else ""
    undo = f"; undo record {rep.undo}" if rep.undo else ""
    text = (
        f"wrote {rep.out}{data}: {rep.tensors} initializers patched, {rep.bn_buffers} "
        f"BatchNorm buffers blended{undo}"
    )
    report(args, out, text)


def apply_arguments(p: Any) -> None:
    model = "ONNX model (left untouched, with its external data)"
    add_patch_arguments(p, model, "patched ONNX model to write", "strength")


def run_remove(args: Any) -> None:
    """restore the original of a patched ONNX model, bit for bit, from its undo record;
    external data goes to OUTPUT.data, or with --source-data-name to the source's own
    data file name

    example:
    mkdir -p original && robustpatch onnx remove robust.onnx -o original/model.onnx
    """
    from ..onnx import remove

    if not args.overwrite:
        cli_args.check_outputs(args, [], _remove_outputs(args))
    rep = remove(
        args.patched,
        args.output,
        undo=args.undo,
        durable=args.durable,
        source_data_name=args.source_data_name,
    )
    text = (
        f"wrote {rep.out}: {rep.tensors} initializers and {rep.bn_buffers} BatchNorm "
        "buffers restored bit for bit"
    )
    report(args, _files(rep), text)


def remove_arguments(p: Any) -> None:
    p.add_argument("patched", help="model written by 'robustpatch onnx apply'")
    cli_args.add_output(p, "restored ONNX model to write")
    p.add_argument("--undo", help="undo record (default: PATCHED.rpundo)")
    p.add_argument(
        "--source-data-name",
        action="store_true",
        help="name the external data file as the source model named it (e.g. weights.bin), "
        "beside OUTPUT, instead of OUTPUT.data: the .onnx is then the source's bytes "
        "whatever OUTPUT is named (without it, only where the source's data file was "
        "MODEL.data, as torch writes it, and OUTPUT has the model's name)",
    )
    cli_args.add_durable_flag(p)


def _files(rep: Any) -> dict[str, Any]:
    return {
        "file": str(rep.out),
        "data": str(rep.data) if rep.data else None,
        "undo": str(rep.undo) if rep.undo else None,
        "tensors": rep.tensors,
        "bn_buffers": rep.bn_buffers,
    }


def _remove_outputs(args: Any) -> list[Any]:
    """What ``onnx remove`` writes: OUTPUT, and OUTPUT.data where that file exists (only
    then is the model read here) and the model keeps its tensors outside; with
    --source-data-name, the model and its record are read for the source's name."""
    from ..onnx.patch import data_name
    from ..onnx.restore import remove_outputs

    data = Path(args.output).parent / data_name(Path(args.output))
    if not (args.source_data_name or data.exists() or data.is_symlink()):
        return [args.output]
    return remove_outputs(
        args.patched, args.output, undo=args.undo, source_data_name=args.source_data_name
    )


def _check_overwrite(args: Any, outputs: list[Any]) -> None:
    """Without --overwrite, refuse an existing output (the API refuses inputs itself)."""
    if not args.overwrite:
        cli_args.check_outputs(args, [], outputs)


# ---------------------------------------------------------------------------- export


def run_export(args: Any) -> None:
    """export a SmallCNN checkpoint (robustpatch demo --quick --dataset digits writes them
    to <out>/files/) to ONNX: patched in
    torch, BatchNorm folded, optionally f16 and int8, validated against torch on a batch

    example:
    robustpatch onnx export clean.safetensors --signature fog.rws --dtype f16 -o fog16.onnx
    """
    from ..onnx.exporter import export_checkpoint

    if args.alpha and not args.signature:
        raise cli_args.UsageError("--alpha needs --signature (the strength of each signature)")
    if args.int8 and args.dtype != "f32":
        raise cli_args.UsageError("--int8 quantizes the f32 model: give --dtype f32 (the default)")
    alphas = cli_args.per_signature(args.alpha, len(args.signature or []), "--alpha")
    _check_overwrite(args, [args.output])
    rep = export_checkpoint(
        args.checkpoint,
        args.output,
        signatures=args.signature or [],
        alphas=alphas,
        dtype=args.dtype,
        int8=args.int8 or False,
        input_shape=tuple(args.input_shape),
        max_abs_error=args.max_abs_error,
        min_agreement=args.min_agreement,
    )
    text = (
        f"wrote {rep['file']}: max abs error {rep['max_abs_error']:.3g} against torch, "
        f"top-1 agreement {rep['agreement']:.1%} on {rep['batch']} inputs"
    )
    report(args, rep, text)


def export_arguments(p: Any) -> None:
    p.add_argument("checkpoint", help="SmallCNN safetensors checkpoint")
    cli_args.add_output(p, "ONNX model to write")
    p.add_argument("--signature", action="append", help="signature to apply first (repeat)")
    cli_args.add_per_signature(p, "--alpha", cli_args.alpha_arg, "strength")
    p.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="weight dtype")
    p.add_argument("--int8", choices=("dynamic", "static"), help="quantize to int8")
    p.add_argument(
        "--input-shape",
        type=cli_args.positive_int,
        nargs=3,
        default=[3, 32, 32],
        metavar=("C", "H", "W"),
        help="one input's shape",
    )
    p.add_argument(
        "--max-abs-error",
        type=_error_arg,
        help="largest output error allowed, as a fraction of the largest |output| "
        "(default: per dtype)",
    )
    p.add_argument(
        "--min-agreement",
        type=_agreement_arg,
        help="smallest top-1 agreement allowed, from 0 to 1 (default: per dtype)",
    )


def _error_arg(text: str) -> float:
    """``--max-abs-error``: a number >= 0 (NaN would pass every export)."""
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _agreement_arg(text: str) -> float:
    """``--min-agreement``: a fraction from 0 to 1."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan  # refused by the range checks, naming the text given


# ---------------------------------------------------------------------------- check


def run_check(args: Any) -> None:
    """validate an ONNX model as untrusted input; with signatures, say whether they fit
    (exit code 1 if not); a patched model's undo record shows what was applied

    example:
    robustpatch onnx check model.onnx fog.rws --json
    """
    from ..onnx.check import check

    rep = check(
        args.model, args.signatures, force=args.force, allow_dtype_change=args.allow_dtype_change
    )
    if "problem" in rep:
        rep["problem"] = _as_flags(rep["problem"])
    if args.json:
        report(args, rep, "")
    elif not args.quiet:
        _print_check(rep)
    if rep.get("fits") is False:
        raise MismatchError(rep["problem"])


def _as_flags(text: str) -> str:
    """A library message with its keywords named as this command's flags."""
    from . import FLAG_OF_KEYWORD

    for keyword, flag in FLAG_OF_KEYWORD.items():
        text = text.replace(keyword, flag)
    return text


def _print_check(rep: dict[str, Any]) -> None:
    data = f", external data {rep['external_data']}" if rep["external_data"] else ""
    print(f"{rep['file']}: valid ONNX model, {rep['initializers']} initializers{data}")
    if rep.get("record_note"):
        print(f"  note: {rep['record_note']}")
    for a in rep["applied"]:
        digest = str(a["hash"]).rpartition(":")[2][:12]  # "tensors-blake3:<hex>": the hex
        print(f"  applied: {a['name']} (alpha {a['alpha']:g}, {digest})")
    if rep.get("fits"):  # a misfit is the error line on stderr (exit 1), said once
        print("  the signatures fit")


def check_arguments(p: Any) -> None:
    p.add_argument("model", help="ONNX model")
    p.add_argument("signatures", nargs="*", default=[], help="signature files to check against it")
    for flag, dest, action, help in FLAGS:
        if dest in ("allow_dtype_change", "force"):  # what onnx apply would be given
            p.add_argument(flag, dest=dest, action=action, help=help)
