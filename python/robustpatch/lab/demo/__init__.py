"""`robustpatch demo`: the whole story on embedded data, on CPU by default.

Pretrain a small CNN on procedural shapes (once per run). From those weights, with the
same seed and data order, fine-tune on digits a clean model and, per corruption, a
robust twin on corrupted images (all severities); the same again with a second seed;
and a clean model and robust twins on a second dataset (procedural patterns). Then
run the experiments of :mod:`robustpatch.lab.experiments`:

1. per-layer difference robust vs clean and the projection coefficient;
2. patch gain: clean, BN re-estimation alone, clean + signature under each BatchNorm
   policy (shallow and full, projection and difference, unquantized and quantized),
   robust, per corruption and severity;
3. shallow vs full: gain against the share of parameters patched;
4. the α sweep;
5. similarity across corruptions, seeds and datasets, and detection of the corruption
   from a new model's weights;
6. two signatures summed against each alone;
7. transfer of a digits signature to the patterns model;
8. compression: gain against bits, size against the float32 robust model;
9. removal: bit-exact.

The package: :mod:`.config` (sizes, the pre-registered arm), :mod:`.runner` (training and
experiments), :mod:`.claims` (verdicts), :mod:`.report` (results.json, figures, report.md).

Writes ``results.json`` (with the versions, commit, thread count and device that
produced it), figures, checkpoints and signature files, and ``report.md`` to the output
folder. The report opens with a five-line summary, then a claims table: one row per
sub-claim with its measured number, threshold and verdict (holds, near miss, fails).
"""

from .claims import NEAR_MISS_RULE, VERDICTS, claims, verdict, verdict_counts
from .config import DEMO_CORRUPTIONS, PRIMARY, DemoConfig
from .report import console_lines, paper_console_lines, summary_lines, write_report
from .runner import git_commit, mean_ci, provenance, replicate_seeds, run, summarize

__all__ = [
    "DEMO_CORRUPTIONS",
    "NEAR_MISS_RULE",
    "PRIMARY",
    "VERDICTS",
    "DemoConfig",
    "claims",
    "console_lines",
    "git_commit",
    "mean_ci",
    "paper_console_lines",
    "provenance",
    "replicate_seeds",
    "run",
    "summarize",
    "summary_lines",
    "verdict",
    "verdict_counts",
    "write_report",
]
