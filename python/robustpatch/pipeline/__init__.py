"""Patch pipelines: many base models × signatures × strengths, as one resumable run.

::

    from robustpatch import pipeline

    lines = pipeline.run(pipeline.load_manifest("fleet.yaml"), workers=4)
    lines = pipeline.run(jobs, executor="ray", ray_address="ray://head:10001")

Each job (:class:`Job`) patches one base model (a safetensors file, or a sharded
checkpoint's index or folder) into one output through :func:`robustpatch.apply_file`;
:func:`run` spreads the jobs over a local process pool or Ray tasks and gives one result
line per job. An output whose done-marker verifies (see :mod:`.jobs`) is skipped, so a
run killed at any moment is resumed by running it again.
"""

from .jobs import DONE_SUFFIX, Job, done_path_for, output_digest, run_job, verified
from .manifest import jobs_from, load_manifest
from .runner import EXECUTORS, run

__all__ = [
    "DONE_SUFFIX",
    "EXECUTORS",
    "Job",
    "done_path_for",
    "jobs_from",
    "load_manifest",
    "output_digest",
    "run",
    "run_job",
    "verified",
]
