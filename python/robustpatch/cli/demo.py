"""``robustpatch demo``: the torch lab's end-to-end run (train, extract, patch,
evaluate, report), behind the CLI's conventions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import parser as cli_args
from .parser import PROG

DATASETS = ("fashion-mnist", "digits")


def demo_arguments(p: Any) -> None:
    p.add_argument("--quick", action="store_true", help="smaller run (minutes on 2 CPU cores)")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="fashion-mnist",
        help="fashion-mnist: the paper's protocol; digits: the earlier pipeline on the embedded "
        "digits, with its stricter recipe",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="PATH",
        help="folder with the full Fashion-MNIST IDX files (default: the embedded subset)",
    )
    p.add_argument(
        "--device",
        type=cli_args.device_arg,
        default=None,
        help="cpu or cuda (default: cuda if available)",
    )
    p.add_argument(
        "-o", "--out", type=Path, default=Path("report"), help="report folder (new or empty)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="write the report into a folder that holds files"
    )
    p.add_argument(
        "--threads",
        type=cli_args.positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice); CPU results reproduce exactly "
        "only with the thread count the report records",
    )


def run_demo(args: Any) -> int:
    """train clean and robust models, extract signatures, patch, evaluate and write a report
    (needs the torch extra): by default the paper's protocol on Fashion-MNIST (report:
    paper.md, opening with the fidelity table), or the digits pipeline (report.md)

    example:
    robustpatch demo --quick --out report
    robustpatch demo --data /usr/share/datasets/fashion-mnist --out report
    """
    if args.dataset == "digits" and args.data is not None:
        print(
            f"{PROG} demo: error: --data reads Fashion-MNIST IDX files; "
            "it does not apply to --dataset digits",
            file=sys.stderr,
        )
        return 2
    from ..lab.outputs import check_report_folder

    check_report_folder(args.out, args.overwrite)  # before the seconds torch takes to load
    try:
        from ..lab import demo
        from ..lab.paper import run as paper
    except ImportError as e:
        print(
            f"{PROG}: error: the demo needs the torch extra ({e}); "
            "install it with: pip install 'robustpatch[torch]'",
            file=sys.stderr,
        )
        return 1
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    options = dict(
        quick=args.quick, device=args.device, threads=args.threads, overwrite=args.overwrite
    )
    if args.dataset == "digits":
        results = demo.run(args.out, log=log, progress=not args.quiet, **options)
        lines, report = demo.console_lines(results), args.out / "report.md"
    else:
        results = paper.run_paper(args.out, data=args.data, progress=log, **options)
        lines, report = demo.paper_console_lines(results), args.out / "paper.md"
    for line in lines:  # the pre-registered arm and verdicts, not the best
        print(line)
    print(f"report: {report}")
    return 0
