"""What commands print: a text line or one JSON object, tables, sizes, progress bars
(on stderr, so that stdout holds only the result)."""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from typing import Any


@contextmanager
def progress_bar(args: Any, desc: str, total: int | None = None, unit: str = "B"):
    """A tqdm bar on stderr (hidden with --quiet or when stderr is not a terminal);
    yields a callable taking increments. A hidden bar does not import tqdm (~50 ms)."""
    on_terminal = getattr(sys.stderr, "isatty", lambda: False)()  # stderr may be None
    if getattr(args, "quiet", False) or not on_terminal:
        yield lambda n=1: None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        file=sys.stderr,
        leave=False,
    ) as bar:
        yield bar.update


def json_text(obj: Any, **kwargs: Any) -> str:
    """``obj`` as strict JSON: a non-finite float (NaN in an older file's metadata,
    which robustpatch no longer writes) becomes its text, ``"NaN"`` or ``"Infinity"``, as
    Python's ``json`` would print it bare and other readers refuse."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return json.dumps(obj)  # 'NaN', 'Infinity', '-Infinity'
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def report(args: Any, rep: dict[str, Any], text: str) -> None:
    """Print ``rep`` as one JSON object with --json, else ``text`` (unless --quiet)."""
    if args.json:
        print(json_text(rep))
    elif not getattr(args, "quiet", False):
        print(text)


def print_table(rows: list[list[str]], head: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def fmt_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit below 1024 of it (GiB at most)."""
    units = ("B", "KiB", "MiB", "GiB")
    k = 0
    while abs(n) >= 1024 and k < len(units) - 1:
        n /= 1024
        k += 1
    return f"{n:.0f} B" if k == 0 else f"{n:.1f} {units[k]}"
