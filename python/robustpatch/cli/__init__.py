"""The ``robustpatch`` command line.

Each subcommand is a :class:`~robustpatch.cli.parser.Command` in :data:`COMMANDS`: a
``run_*`` function, whose docstring is its ``--help`` text, and the function adding its
arguments. parser.py holds the shared options and the argparse types that validate
values; signatures.py, models.py, inspect.py, batch.py, onnx.py and demo.py the
commands (patch_flags.py the flags apply, remove and onnx share); output.py what they
print; this module runs one and turns an expected error into one line. The conventions
are those of the tools people know:

- ``-q/--quiet`` and ``--json`` are accepted before or after the subcommand (``batch``
  prints JSON lines and ``demo`` a report: neither takes ``--json``), and a command's
  options also between its files (``apply m.safetensors fog.rws -q snow.rws``). With ``--json`` a
  command prints one JSON object on stdout and nothing else there.
- ``--help`` shows every option's default and an example; ``--version`` the version.
- No command writes over one of its inputs (also not through a symlink or a hard
  link), nor over an existing file unless ``--overwrite``; a refused call writes nothing.
- Bad values (bits, group size, regexes, device...) and flags that do not go together
  (``--group`` without ``--bits``, more ``--alpha`` than signatures) are usage errors:
  exit code 2 (argparse), before anything is read or created. Expected errors (bad files,
  mismatched models, I/O) are one line ``robustpatch: error: ...`` with exit code 1,
  naming the user's paths and the CLI's flags (``--force``, not ``force=True``).
- A reader that goes away (``robustpatch inspect x --json | head -1``) ends the
  command quietly with exit code 141, 128 + SIGPIPE, as a shell reports for the
  classic tools that SIGPIPE kills.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
from collections.abc import Sequence

from .._core import __version__
from ..errors import EXPECTED_ERRORS
from . import batch, demo, inspect, models, onnx, signatures
from .parser import (
    PROG,
    Command,
    HelpFormatter,
    Parser,
    UsageError,
    add_command,
    global_options,
)

__all__ = ["COMMANDS", "build_parser", "main"]

#: Exit code after a closed stdout (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141

#: Commands whose work runs in numpy's BLAS (similarity's Gram matrix) or the torch lab;
#: the others compute in the engine's own threads.
BLAS_COMMANDS = frozenset({"similarity", "demo"})

#: Library keywords that error messages name, and the CLI flags that set them.
FLAG_OF_KEYWORD = {
    "allow_dtype_change=True": "--allow-dtype-change",
    "allow_nonfinite=True": "--allow-nonfinite",
    "force=True": "--force",
    "inplace=True": "--inplace",
    "overwrite=True": "--overwrite",
    "out=<folder>": "-o <folder>",
    "(out=...)": "(-o)",
    "undo=False": "--no-undo",
}

#: The subcommands, in --help order.
COMMANDS: list[Command] = [
    Command("extract", signatures.run_extract, signatures.extract_arguments),
    Command("quantize", signatures.run_quantize, signatures.quantize_arguments),
    Command("apply", models.run_apply, models.apply_arguments),
    Command("subtract", models.run_subtract, models.subtract_arguments),
    Command("remove", models.run_remove, models.remove_arguments),
    Command("recover", models.run_recover, models.recover_arguments),
    Command("inspect", inspect.run_inspect, inspect.inspect_arguments),
    Command("similarity", signatures.run_similarity, signatures.similarity_arguments),
    Command("combine", signatures.run_combine, signatures.combine_arguments),
    Command("detect", signatures.run_detect, signatures.detect_arguments),
    Command("batch", batch.run_batch, batch.batch_arguments, json_output=False),
    Command("demo", demo.run_demo, demo.demo_arguments, json_output=False),
    Command("onnx", onnx.run_onnx, onnx.onnx_arguments),
]


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = Parser(
        prog=PROG,
        description="Robust weight signatures: extract, compress, apply and remove robustness.",
        epilog="example:\n  robustpatch apply model.safetensors fog.rws -o robust.safetensors",
        formatter_class=HelpFormatter,
        parents=[global_options(json_output=True, top=True)],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in commands if commands is not None else COMMANDS:
        add_command(sub, command)
    return parser


def _message(e: BaseException) -> str:
    """One line for an expected error: the path first for an OSError (as cp and mv say),
    a refused pickle explained, keyword arguments named as the CLI's flags."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{os.fspath(e.filename)}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    text = "; ".join([text, *getattr(e, "__notes__", ())])  # e.g. what a failed commit left
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


def _single_thread_blas(argv: Sequence[str]) -> None:
    """One OpenBLAS thread for a command that does not use BLAS, unless the user chose a
    number: a pool of them would take tens of milliseconds to start and then spin on the
    cores the engine's threads work on. Only possible before numpy is imported, and only
    for the command's own process (the caller of ``main(argv)`` keeps its environment)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if "numpy" not in sys.modules and command not in BLAS_COMMANDS:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _printable_names() -> None:
    """Print what stdout's encoding cannot hold (a file name that is not UTF-8, kept by
    Python as surrogates) escaped, as stderr does, not as a UnicodeEncodeError after the
    command's work is done. Only for the command's own process."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 usage, 141 closed stdout).
    Without ``argv`` (the ``robustpatch`` command) it reads ``sys.argv``."""
    if argv is None:
        argv = sys.argv[1:]
        _single_thread_blas(argv)
        _printable_names()
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
    except UsageError as e:
        args.parser.error(_message(e))  # exits 2, as argparse does for a bad value
    except (*EXPECTED_ERRORS, pickle.UnpicklingError) as e:
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
