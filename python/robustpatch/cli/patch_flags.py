"""The command line's face of :class:`robustpatch.options.PatchOptions`: the arguments
of every command that patches a model (apply, subtract, onnx apply), declared once."""

from __future__ import annotations

from typing import Any

from ..options import FILE_OPTIONS
from . import parser as cli_args

#: Each option's flag: (flag, the option it sets, argparse action, help). ``--no-undo``
#: turns off the one option that is on by default.
FLAGS = (
    (
        "--allow-dtype-change",
        "allow_dtype_change",
        "store_true",
        "apply to float tensors of another dtype than the signature was made for "
        "(e.g. a float32 signature on a float16 or bfloat16 model); shapes are still checked",
    ),
    (
        "--force",
        "force",
        "store_true",
        "apply despite dtype and shape mismatches (same element count)",
    ),
    (
        "--allow-nonfinite",
        "allow_nonfinite",
        "store_true",
        "write elements that overflow the tensor's dtype (become Inf) instead of refusing",
    ),
    ("--no-undo", "undo", "store_false", "do not write the .rpundo record"),
)


def add_patch_arguments(
    p: Any, model_help: str, output_help: str, alpha_what: str, output_required: bool = True
) -> None:
    """The model, its signatures, -o, --alpha and the flags of the patch options."""
    p.add_argument("model", help=model_help)
    p.add_argument("signatures", nargs="+", help="signature files")
    cli_args.add_output(p, output_help, required=output_required)
    cli_args.add_per_signature(p, "--alpha", cli_args.alpha_arg, alpha_what)
    for flag, dest, action, help in FLAGS:
        p.add_argument(flag, dest=dest, action=action, help=help)
    cli_args.add_durable_flag(p)


def patch_options(args: Any) -> dict[str, bool]:
    """The :class:`~robustpatch.options.PatchOptions` keywords the flags give."""
    return {name: getattr(args, name) for name in FILE_OPTIONS}
