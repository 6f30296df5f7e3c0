"""The ``batch`` command: a manifest of patch jobs run on a local process pool or Ray
(:mod:`robustpatch.pipeline`), one JSON line per finished job on stdout."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from ..options import EXECUTORS
from . import parser as cli_args
from .output import json_text
from .parser import PROG, UsageError


def run_batch(args: Any) -> int:
    """run a manifest (YAML or JSON) of patch jobs: base model, signatures, alphas,
    output; one JSON line per finished job on stdout (status, seconds, bytes, sha256);
    a failing job is reported and the others go on (exit code 1 at the end);
    re-running the manifest skips every output that is complete and verified

    example:
    robustpatch batch fleet.yaml --workers 4
    robustpatch batch fleet.yaml --executor ray --ray-address ray://head:10001
    """
    from ..pipeline import load_manifest, run

    if args.ray_address is not None and args.executor != "ray":
        raise UsageError("--ray-address needs --executor ray")
    jobs = load_manifest(args.manifest)
    if args.overwrite:
        jobs = [replace(job, overwrite=True) for job in jobs]
    lines = run(
        jobs,
        executor=args.executor,
        workers=args.workers,
        ray_address=args.ray_address,
        on_result=_print_line,
        progress=not args.quiet,
    )
    counts = {s: sum(ln["status"] == s for ln in lines) for s in ("done", "skipped", "failed")}
    if counts["failed"] or not args.quiet:
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        print(f"{PROG}: batch: {len(lines)} jobs: {summary}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _print_line(line: dict[str, Any]) -> None:
    """A job's result as it ends, flushed so that a reader (or a killed run) has it."""
    print(json_text({k: v for k, v in line.items() if k != "traceback"}), flush=True)
    if "traceback" in line:
        print(line["traceback"], file=sys.stderr, end="")


def batch_arguments(p: Any) -> None:
    p.add_argument("manifest", help="jobs to run (.yaml, .yml or .json)")
    p.add_argument(
        "--executor", choices=EXECUTORS, default="local", help="local process pool, or Ray tasks"
    )
    p.add_argument(
        "--workers",
        type=cli_args.positive_int,
        help="local processes (default: one per CPU this process may use; 1 runs in this "
        "process); with Ray, the CPUs of a local instance it starts",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs that no batch run wrote (never an input)",
    )
    p.add_argument(
        "--ray-address",
        help="Ray cluster to submit to (e.g. ray://head:10001 or auto); outputs and "
        "inputs must be on storage every node sees at the same paths",
    )
