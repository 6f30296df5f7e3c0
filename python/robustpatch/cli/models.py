"""Commands that patch safetensors model files: apply, subtract, remove. Each writes
its output atomically (temp file + rename) through :mod:`robustpatch.files`."""

from __future__ import annotations

from typing import Any

from . import parser as cli_args
from .output import progress_bar, report
from .patch_flags import add_patch_arguments, patch_options


def _inplace_or_output(args: Any, target: str) -> None:
    """Exactly one of -o and --inplace (a usage error otherwise, before any work)."""
    if getattr(args, "inplace", False) == (args.output is not None):
        raise cli_args.UsageError("give either -o/--output or --inplace")
    if args.output is None:
        args.output = target


def _patch_file(args: Any, sign: float, desc: str) -> dict[str, Any]:
    """``apply_file`` of the model with the signatures at ``sign · α``; the report."""
    from ..files import apply_file, undo_path_for
    from ..sharded import checkpoint_bytes

    _inplace_or_output(args, args.model)
    if args.embed_signature and not args.undo:
        raise cli_args.UsageError(
            "--embed-signature copies into the undo record: not with --no-undo"
        )
    inplace = getattr(args, "inplace", False)
    alphas = [sign * a for a in cli_args.per_signature(args.alpha, len(args.signatures), "--alpha")]
    outputs = [args.output, undo_path_for(args.output)] if args.undo else [args.output]
    if not inplace:
        cli_args.check_outputs(args, [args.model, *args.signatures], outputs)
    # a file, a sharded checkpoint's shards; in place: the touched bytes (not known yet)
    total = None if inplace else checkpoint_bytes(args.model)
    with progress_bar(args, desc, total) as tick:
        rep = apply_file(
            args.model,
            args.signatures,
            alphas,
            None if inplace else args.output,
            progress=tick,
            inplace=inplace,
            embed_signature=args.embed_signature,
            **patch_options(args),
        )
    return {
        "file": str(rep.out),
        "undo": str(rep.undo) if rep.undo else None,
        "tensors": rep.tensors,
        "bn_buffers": rep.bn_buffers,
        "bytes": rep.bytes_written,
        "signatures": args.signatures,
        "alphas": alphas,
        "inplace": inplace,
        "header_updated": rep.header_updated,
    }


def run_apply(args: Any) -> None:
    r"""patch a safetensors model with one or more signatures (atomic, with undo record)

    example:
    robustpatch apply model.safetensors fog.rws noise.rws --alpha 1 --alpha 0.5 \
        -o robust.safetensors
    """
    rep = _patch_file(args, 1.0, "apply")
    undo = f"; undo record {rep['undo']}" if rep["undo"] else ""
    how = f"wrote {rep['file']}"
    if rep["inplace"]:
        how = f"patched {rep['file']} in place ({rep['bytes']} bytes written)"
    if rep["inplace"] and not rep["header_updated"]:
        undo += " (no room in the header for the applied list: the record holds it)"
    text = (
        f"{how}: {rep['tensors']} tensors patched, "
        f"{rep['bn_buffers']} BatchNorm buffers blended{undo}"
    )
    report(args, rep, text)


def run_subtract(args: Any) -> None:
    """take signatures out of a model without its undo record: the model minus
    alpha times each signature, rounded once (approximate; BatchNorm buffers stay
    as they are; 'remove' is exact where an undo record exists)

    example:
    robustpatch subtract robust.safetensors fog.rws -o unpatched.safetensors
    """
    rep = _patch_file(args, -1.0, "subtract")
    rep["approximate"] = True
    undo = f"; undo record {rep['undo']}" if rep["undo"] else ""
    text = (
        f"wrote {rep['file']}: {rep['tensors']} tensors with the signatures subtracted "
        "(approximate: elements may differ by one unit in the last place from the model "
        "before the patch; 'robustpatch remove' with the patch's undo record is exact), "
        f"{rep['bn_buffers']} BatchNorm buffers left as they were{undo}"
    )
    report(args, rep, text)


def _add_patch_args(
    p: Any, model_help: str, out_help: str, alpha_what: str, inplace: bool = False
) -> None:
    add_patch_arguments(p, model_help, out_help, alpha_what, not inplace)
    if inplace:
        _add_inplace_flag(p, "patch MODEL itself")
    p.add_argument(
        "--embed-signature",
        action="store_true",
        help="copy the signatures into the undo record (by default it refers to their "
        "files by content hash, and 'remove' finds them beside the record or by --signature)",
    )


def apply_arguments(p: Any) -> None:
    _add_patch_args(
        p,
        "safetensors model file (left untouched unless --inplace)",
        "patched model to write",
        "strength",
        inplace=True,
    )


def subtract_arguments(p: Any) -> None:
    _add_patch_args(
        p,
        "safetensors model file a signature was applied to (left untouched)",
        "model to write, the signatures taken out",
        "strength to take out",
    )


def _add_inplace_flag(p: Any, what: str) -> None:
    p.add_argument(
        "--inplace",
        action="store_true",
        help=f"{what} instead of writing -o: only the touched tensors' bytes are written, "
        "through a journal that survives a crash ('robustpatch recover')",
    )


def run_remove(args: Any) -> None:
    """restore the original of a patched model, bit for bit, from its undo record

    example:
    robustpatch remove robust.safetensors -o original.safetensors
    """
    from ..files import remove_file, undo_path_for
    from ..sharded import checkpoint_bytes

    _inplace_or_output(args, args.patched)
    undo = args.undo or undo_path_for(args.patched)
    if not args.inplace:
        inputs = [args.patched, undo, *(args.signature or ())]
        cli_args.check_outputs(args, inputs, [args.output])
    # a file, a sharded checkpoint's shards; in place: the touched bytes (not known yet)
    total = None if args.inplace else checkpoint_bytes(args.patched)
    with progress_bar(args, "remove", total) as tick:
        rep = remove_file(
            args.patched,
            None if args.inplace else args.output,
            undo=args.undo,
            durable=args.durable,
            progress=tick,
            inplace=args.inplace,
            signatures=args.signature or (),
        )
    where = f"restored {rep.out} in place" if args.inplace else f"wrote {rep.out}"
    text = (
        f"{where}: {rep.tensors} tensors and {rep.bn_buffers} BatchNorm "
        "buffers restored bit for bit"
    )
    out = {
        "file": str(rep.out),
        "tensors": rep.tensors,
        "bn_buffers": rep.bn_buffers,
        "bytes": rep.bytes_written,
    }
    report(args, out, text)


def remove_arguments(p: Any) -> None:
    p.add_argument("patched", help="model written by 'robustpatch apply'")
    cli_args.add_output(p, "restored model to write", required=False)
    _add_inplace_flag(p, "restore PATCHED itself (and delete the record it used)")
    p.add_argument("--undo", help="undo record (default: PATCHED.rpundo)")
    p.add_argument(
        "--signature",
        action="append",
        help="a signature file the undo record refers to (repeat; default: where the record "
        "says, beside it); one with another content hash is refused",
    )
    cli_args.add_durable_flag(p)


def run_recover(args: Any) -> None:
    """finish an in-place apply or remove that a crash interrupted: the model becomes
    the original or the patched one again, as its journal says

    example:
    robustpatch recover model.safetensors
    """
    from ..inplace import recover

    outcome = recover(args.model)
    text = {
        None: f"{args.model}: nothing to recover",
        "discarded": f"{args.model}: unchanged (the interrupted patch had not started)",
        "rolled back": f"{args.model}: restored to the original (interrupted patch rolled back)",
        "removal rolled back": f"{args.model}: still patched (the interrupted removal was "
        "rolled back; its undo record kept)",
        "completed": f"{args.model}: the interrupted patch had committed; finished it (patched)",
        "removal completed": f"{args.model}: the interrupted removal had committed; finished "
        "it (the original)",
    }[outcome]
    report(args, {"file": args.model, "outcome": outcome}, text)


def recover_arguments(p: Any) -> None:
    p.add_argument("model", help="model patched in place with --inplace")
