"""``robustpatch demo``: the torch lab's end-to-end run (train, extract, patch,
evaluate, report), behind the CLI's conventions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import parser as cli_args
from .parser import PROG


def demo_arguments(p: Any) -> None:
    p.add_argument("--quick", action="store_true", help="smaller run (minutes on 2 CPU cores)")
    p.add_argument(
        "--device",
        type=cli_args.device_arg,
        default=None,
        help="cpu or cuda (default: cuda if available)",
    )
    p.add_argument("--out", type=Path, default=Path("report"), help="report folder")
    p.add_argument(
        "--threads",
        type=cli_args.positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice); CPU results reproduce exactly "
        "only with the thread count the report records",
    )


def run_demo(args: Any) -> int:
    """train clean and robust models on embedded data, extract signatures, patch,
    evaluate and write a report (needs the torch extra)

    example:
    robustpatch demo --quick --out report
    """
    try:
        from ..lab import demo
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
