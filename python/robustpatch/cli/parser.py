"""The CLI's argument edge: the help formatter, the options every command shares, and
the argparse types that check each value with :mod:`robustpatch.validate` before
anything is read or created (a bad value is a usage error, exit code 2)."""

from __future__ import annotations

import argparse
import inspect
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import validate
from ..errors import InvalidArgumentError

PROG = "robustpatch"


class UsageError(InvalidArgumentError):
    """Flags that do not go together, found after parsing (``--group`` without
    ``--bits``, three ``--alpha`` for two signatures): a usage error like argparse's own,
    exit code 2 with the command's usage line, before anything is read or created."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples as written, and each option's default where it has one
    (not for on/off flags or options that are off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return action.help  # nargs 0: an on/off flag (store_false's default is True)
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse's parser, reading ``-1e-3`` as the negative number it is (argparse
    reads a negative number in exponent form as an unknown option: ``--alpha -1e-3``
    failed while ``--alpha -0.001`` worked), and taking a command's options between its
    positionals (``apply m.safetensors fog.rws -q snow.rws``: plain argparse ends the
    positionals at the first option and refuses ``snow.rws``). Its subcommands' parsers
    are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER
        self._intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # argparse's intermixed parse calls this method again for each of its two passes.
        if self._intermixing or not self._can_intermix():
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return super().parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def _can_intermix(self) -> bool:
        """Whether argparse's intermixed parse takes this parser: not one with
        subcommands (the top level, ``onnx``) or a positional that takes the rest."""
        takes_rest = (argparse.PARSER, argparse.REMAINDER)
        grouped = [a for g in self._mutually_exclusive_groups for a in g._group_actions]
        return not any(a.nargs in takes_rest for a in self._get_positional_actions()) and all(
            a.option_strings for a in grouped
        )


_NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


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


@dataclass(frozen=True)
class Command:
    """One subcommand. ``run(args)`` does the work and returns the exit code (None for
    0); its docstring is the ``--help`` text, up to a line ``example:`` followed by the
    example shown under ``--help``. ``arguments(parser)`` adds the command's own
    arguments; ``json_output``: whether it accepts ``--json``."""

    name: str
    run: Callable[[Any], int | None]
    arguments: Callable[[Any], None]
    json_output: bool = True

    def help_and_example(self) -> tuple[str, str]:
        text, _, example = inspect.cleandoc(self.run.__doc__ or "").partition("\nexample:\n")
        return " ".join(text.split()), example.strip()


def add_command(sub: Any, command: Command) -> None:
    """Add a subparser with the command's description, an ``example:`` epilog, the
    global options, its arguments and its handler."""
    help, example = command.help_and_example()
    p = sub.add_parser(
        command.name,
        help=help,
        description=help,
        epilog="example:\n  " + example.replace("\n", "\n  "),
        formatter_class=HelpFormatter,
        parents=[global_options(command.json_output)],
    )
    command.arguments(p)
    p.set_defaults(func=command.run, json_output=command.json_output, parser=p)


# ---------------------------------------------------------------------------- value types


def positive_int(text: str) -> int:
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


bits_arg = _parsed(int, validate.bits, "bits from 1 to 8")
group_arg = _parsed(int, validate.group, "a positive integer group size")
alpha_arg = _parsed(float, validate.alpha, "a number")
coef_arg = _parsed(float, lambda v: validate.alpha(v, "coefficient"), "a number")


def fraction_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def layer_arg(text: str) -> str:
    """A ``--layers`` value: a keyword, a count, or a regex that compiles."""
    from ..errors import SelectionError
    from ..selection import compile_layer_pattern

    if text in ("auto", "all"):
        return text
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"a number of layers is at least 1, got {text}")
        return text
    try:
        compile_layer_pattern(text)
    except SelectionError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("layers: ")) from None
    return text


def device_arg(text: str) -> str:
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
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r} requested but this machine has {torch.cuda.device_count()} CUDA devices"
        )
    return text


# ---------------------------------------------------------------------------- shared options


def add_output(p: Any, help: str, required: bool = True) -> None:
    p.add_argument("-o", "--output", required=required, help=help)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (never one of the inputs)",
    )


def add_durable_flag(p: Any) -> None:
    p.add_argument(
        "--durable",
        action="store_true",
        help="fsync the output before renaming it into place, so that it survives a power "
        "cut (runs at disk speed)",
    )


def add_per_signature(p: Any, flag: str, type: Callable[[str], float], what: str) -> None:
    """An option given once per signature, once for all of them, or not (1); see
    :func:`per_signature`."""
    help = f"{what} per signature (repeat; one value applies to all; default 1)"
    p.add_argument(flag, type=type, action="append", help=help)


def add_quant_args(p: Any, required: bool) -> None:
    """``--bits`` and the options of its quantization. Where quantizing is optional
    (``required=False``) the other options default to None, so that one given without
    ``--bits`` is refused by :func:`quant_options` instead of silently ignored."""
    note = "" if required else "; leave out for no quantization"
    p.add_argument(
        "--bits", type=bits_arg, default=4 if required else None, help="bits per weight, 1-8" + note
    )
    p.add_argument(
        "--scheme",
        default="affine" if required else None,
        choices=validate.SCHEMES,
        help="how values map to codes: min/max, absmax, log or tanh companding"
        + ("" if required else " (with --bits: affine)"),
    )
    p.add_argument(
        "--granularity",
        default="group" if required else None,
        choices=validate.GRANULARITIES,
        help="one scale per tensor, per output channel or per --group elements"
        + ("" if required else " (with --bits: group)"),
    )
    p.add_argument(
        "--group",
        type=group_arg,
        default=128 if required else None,
        help="group size" + ("" if required else " (with --bits: 128)"),
    )


def quant_options(args: Any) -> dict[str, Any]:
    """The quantization keywords of an optional ``--bits`` (none without it); an option
    of the quantization given without ``--bits`` is an error, not ignored."""
    given = [f"--{k}" for k in ("scheme", "granularity", "group") if getattr(args, k) is not None]
    if args.bits is None:
        if given:
            raise UsageError(f"{', '.join(given)} only applies with --bits (no quantization asked)")
        return {}
    return {
        "bits": args.bits,
        "scheme": args.scheme or "affine",
        "granularity": args.granularity or "group",
        "group": args.group or 128,
    }


# ---------------------------------------------------------------------------- checks after parsing


def check_outputs(args: Any, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
    """Refuse, before any work, outputs that are inputs or exist (without --overwrite)."""
    from .._io.atomic import check_destinations

    check_destinations(inputs, outputs, overwrite=args.overwrite)


def per_signature(values: list[float] | None, n: int, flag: str) -> list[float]:
    """One value per signature: none given means 1, one value applies to all."""
    try:
        return validate.alphas(n, values or 1.0, flag)
    except InvalidArgumentError as e:
        raise UsageError(str(e)) from None


def file_labels(paths: Sequence[str]) -> list[str]:
    """A label per file: its basename, or the path as given where two files share it."""
    names = [os.path.basename(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]
