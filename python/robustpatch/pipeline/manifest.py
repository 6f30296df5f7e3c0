"""Batch manifests (YAML or JSON): the jobs of a run, validated before any is started.

::

    defaults:                 # optional: options every job gets unless it sets them
      allow_dtype_change: true
      overwrite: false        # true: replace an existing output no batch run wrote
    jobs:                     # explicit jobs
      - base: models/llama-a.safetensors
        signatures: [fog.rws, noise.rws]
        alphas: [1.0, 0.5]
        output: out/a-fog-noise.safetensors
      - {base: models/llama-c, signatures: [fog.rws], output: out/c-fog}  # sharded: folders
    grid:                     # and/or every base × signature set × alpha
      bases: {a: models/llama-a.safetensors, b: models/llama-b.safetensors}
      signatures: {fog: [fog.rws], mix: [fog.rws, noise.rws]}
      alphas: [0.5, 1.0]      # each a number for all signatures, or one list per set
      output: out/{base}-{signatures}-{alpha}.safetensors

Relative paths are relative to the manifest's folder. Unknown keys, a missing key, two
jobs writing one file (an output, its undo record or its done-marker), a job writing an
input of the run (the manifest included), a sharded base's output named as a file, or
one writing inside a sharded base's folder
(whose every ``*.safetensors`` is a shard the base reads) are refused with one line
naming the manifest (:class:`~robustpatch.errors.InvalidArgumentError`).
"""

from __future__ import annotations

import itertools
import json
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._format.shards import is_sharded
from .._io.inputs import open_input
from ..errors import FormatError, InvalidArgumentError, NonFiniteError, shown
from .jobs import OPTIONS, Job

__all__ = ["load_manifest", "jobs_from", "check_jobs"]

JOB_KEYS = ("base", "signatures", "alphas", "output")
OPTION_KEYS = OPTIONS
JOB_OPTION_KEYS = (*OPTIONS, "overwrite")
GRID_KEYS = ("bases", "signatures", "alphas", "output")
TOP_KEYS = ("version", "defaults", "jobs", "grid")
PLACEHOLDERS = {"base", "signatures", "alpha"}


def load_manifest(path: str | os.PathLike[str]) -> list[Job]:
    """The jobs of a manifest file (``.yaml``/``.yml`` needs PyYAML, else JSON)."""
    path = Path(path)
    with open_input(path) as f:
        text = f.read().decode("utf-8", errors="replace")
    try:
        return jobs_from(_parse(text, path), path.parent, inputs=[path])
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{path}: {e}") from None


def _parse(text: str, path: Path) -> Any:
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InvalidArgumentError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write it as JSON"
            ) from None
        try:
            return yaml.load(text, Loader=_strict_yaml_loader(yaml))  # noqa: S506 - safe
        except RecursionError:
            raise FormatError(f"{path}: nested too deeply to be a manifest") from None
        except yaml.YAMLError as e:
            raise FormatError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{path}: nested too deeply to be a manifest") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: of two, the last silently won."""
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise InvalidArgumentError(f"key {k!r} given twice in one object")
    return dict(pairs)


def _strict_yaml_loader(yaml: Any) -> Any:
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the
    last)."""

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    at = key_node.start_mark.line + 1
                    raise InvalidArgumentError(f"key {key!r} given twice in a mapping (line {at})")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def jobs_from(
    doc: Any, root: str | os.PathLike[str] = ".", inputs: Sequence[str | os.PathLike[str]] = ()
) -> list[Job]:
    """The jobs a manifest document describes, paths resolved against ``root``;
    ``inputs``: files the run reads besides the jobs' own (the manifest)."""
    top = _mapping(doc, "the manifest", TOP_KEYS)
    version = top.get("version", 1)
    if isinstance(version, bool) or version != 1:
        raise InvalidArgumentError(f"unknown manifest version {shown(version)}")
    defaults = _mapping(top.get("defaults", {}), "defaults", ("alphas", *JOB_OPTION_KEYS))
    if "jobs" not in top and "grid" not in top:
        raise InvalidArgumentError("no 'jobs' and no 'grid': nothing to run")
    raw = top.get("jobs", [])
    if not isinstance(raw, list):
        raise InvalidArgumentError("'jobs' must be a list")
    jobs = [_listed_job(spec, f"job #{i + 1}", defaults, root) for i, spec in enumerate(raw)]
    if "grid" in top:
        jobs += _grid(_mapping(top["grid"], "grid", GRID_KEYS), defaults, root)
    if not jobs:
        raise InvalidArgumentError("no jobs: 'jobs' is empty and there is no grid")
    check_jobs(jobs, inputs)
    return jobs


def _mapping(value: Any, what: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(f"{what} must be a mapping, got {shown(value)}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise InvalidArgumentError(
            f"{what}: unknown key {shown(unknown[0])} (expected {', '.join(allowed)})"
        )
    return value


def _listed_job(spec: Any, what: str, defaults: Mapping[str, Any], root: Any) -> Job:
    """A job of the ``jobs`` list: its keys over the defaults."""
    return _job({**defaults, **_mapping(spec, what, JOB_KEYS + JOB_OPTION_KEYS)}, root, what)


def _job(spec: Mapping[str, Any], root: Any, what: str) -> Job:
    missing = [k for k in ("base", "signatures", "output") if k not in spec]
    if missing:
        raise InvalidArgumentError(f"{what}: missing {missing[0]!r}")
    sigs = spec["signatures"]
    sigs = [sigs] if isinstance(sigs, str) else sigs
    if not isinstance(sigs, list) or not all(isinstance(s, str) for s in sigs):
        raise InvalidArgumentError(f"{what}: 'signatures' must be a list of paths")
    for key in ("base", "output"):
        if not isinstance(spec[key], str) or not spec[key].strip():
            raise InvalidArgumentError(f"{what}: {key!r} must be a path, got {shown(spec[key])}")
    options = {k: spec[k] for k in JOB_OPTION_KEYS if k in spec}
    try:
        return Job.make(
            _under(root, spec["base"]),
            [_under(root, s) for s in sigs],
            spec.get("alphas", 1.0),
            _under(root, spec["output"]),
            **options,
        )
    except (InvalidArgumentError, NonFiniteError) as e:  # NaN α: a bad value in the manifest
        raise InvalidArgumentError(f"{what}: {e}{_number_as_text(spec.get('alphas'))}") from None


def _number_as_text(alphas: Any) -> str:
    """A hint where an α is a string that reads as a number: YAML 1.1 (PyYAML) reads
    ``1e-3``, without a dot, as text."""
    values = alphas if isinstance(alphas, list) else [alphas]
    for v in values:
        if isinstance(v, str):
            try:
                float(v)
            except ValueError:
                continue
            return f" (YAML reads {v} as text: write {float(v)!r} or 1.0e-3 style, with a dot)"
    return ""


def _under(root: Any, path: str) -> str:
    return os.path.join(os.fspath(root), os.path.expanduser(path))


def _grid(grid: Mapping[str, Any], defaults: Mapping[str, Any], root: Any) -> list[Job]:
    """Every base × signature set × alpha, named by the ``output`` template."""
    for key in ("bases", "signatures", "output"):
        if key not in grid:
            raise InvalidArgumentError(f"grid: missing {key!r}")
    bases = _named(grid["bases"], "grid: bases")
    sets = _named(grid["signatures"], "grid: signatures")
    alphas = grid.get("alphas", [defaults.get("alphas", 1.0)])
    if not isinstance(alphas, list) or not alphas:
        raise InvalidArgumentError("grid: 'alphas' must be a non-empty list")
    template = grid["output"]
    _check_template(template)
    options = {k: defaults[k] for k in JOB_OPTION_KEYS if k in defaults}
    jobs = []
    for (bname, base), (sname, sigs), alpha in itertools.product(bases, sets, alphas):
        label = _alpha_label(alpha)
        out = template.format(base=bname, signatures=sname, alpha=label)
        spec = {"base": base, "signatures": sigs, "alphas": alpha, "output": out, **options}
        jobs.append(_job(spec, root, f"grid job {bname}/{sname}/{label}"))
    return jobs


def _alpha_label(alpha: Any) -> str:
    """``0.5`` or ``1-0.5`` (one α per signature), for output names."""
    items = alpha if isinstance(alpha, list) else [alpha]
    if not items or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in items):
        raise InvalidArgumentError(
            f"grid: alpha {shown(alpha)} is not a number or list of them{_number_as_text(alpha)}"
        )
    return "-".join(f"{a:g}" for a in items)


def _named(value: Any, what: str) -> list[tuple[str, Any]]:
    if not isinstance(value, Mapping) or not value:
        raise InvalidArgumentError(f"{what} must be a non-empty mapping of name: path(s)")
    return [(str(k), v) for k, v in value.items()]


def _check_template(template: Any) -> None:
    if not isinstance(template, str):
        raise InvalidArgumentError(f"grid: 'output' must be a path template, got {shown(template)}")
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)]
    except ValueError as e:
        raise InvalidArgumentError(f"grid: bad output template {template!r}: {e}") from None
    fields = {f for f, _, _ in parsed if f is not None}
    for f, spec, conv in parsed:
        if spec or conv:  # the values are names: a format spec such as {alpha:d} fails
            raise InvalidArgumentError(
                f"grid: output template field {{{f}}} takes no format spec or conversion"
            )
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise InvalidArgumentError(
            f"grid: output template field {{{sorted(unknown)[0]}}} is not one of "
            "{base}, {signatures}, {alpha}"
        )
    if not {"base", "signatures"} <= fields:
        raise InvalidArgumentError("grid: the output template needs {base} and {signatures}")


def check_jobs(jobs: list[Job], inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Refuse two jobs writing one file (an output, its undo record or its done-marker),
    a job writing what the run reads (a job's input, or one of ``inputs``), and a job
    writing inside a sharded base's folder."""
    seen: dict[str, int] = {}
    read = {os.path.realpath(p) for j in jobs for p in j.inputs}
    read |= {os.path.realpath(p) for p in inputs}
    folders = _sharded_folders(jobs)
    written = _sharded_outputs(jobs)
    for i, job in enumerate(jobs):
        for path in job.outputs:
            out = os.path.realpath(path)
            if out in seen:
                raise InvalidArgumentError(
                    f"jobs #{seen[out] + 1} and #{i + 1} both write {path}"
                    if seen[out] != i
                    else f"job #{i + 1} writes {path} twice"
                )
            seen[out] = i
            if out in read:
                raise InvalidArgumentError(f"job #{i + 1} writes {path}, an input of the run")
        _check_outside(os.path.realpath(job.output), job, i, folders)
        if job.output.endswith(".safetensors") and _sharded_folder(job) is not None:
            raise InvalidArgumentError(  # found here, not by the job after others ran
                f"job #{i + 1}: its base {job.base} is a sharded checkpoint, written to a "
                f"folder, but its output {job.output} names a .safetensors file"
            )
        _check_not_in_output(os.path.realpath(job.output), job, i, written)
    _check_no_input_inside(jobs, written, read)


def _check_no_input_inside(jobs: list[Job], written: dict[str, int], read: set[str]) -> None:
    """Refuse a sharded job's output folder that holds a file the run reads (the
    manifest, a signature, a base): the job replaces its folder whole."""
    for path in sorted(read):
        for folder in map(str, Path(path).parents):
            if folder in written:
                i = written[folder]
                raise InvalidArgumentError(
                    f"job #{i + 1} writes the folder {jobs[i].output}, which holds {path}, "
                    "an input of the run"
                )


def _sharded_outputs(jobs: list[Job]) -> dict[str, int]:
    """The real path of each sharded job's output folder -> its job."""
    return {os.path.realpath(j.output): i for i, j in enumerate(jobs) if _sharded_folder(j)}


def _check_not_in_output(out: str, job: Job, i: int, written: dict[str, int]) -> None:
    """Refuse an output inside another job's output folder: that job replaces its folder
    whole, and its digest would count this job's files."""
    for folder in map(str, Path(out).parents):
        if folder in written:
            raise InvalidArgumentError(
                f"job #{i + 1} writes {job.output}, inside job #{written[folder] + 1}'s "
                f"output folder {folder}"
            )


def _sharded_folders(jobs: list[Job]) -> dict[str, int]:
    """The folder of each sharded base -> the first job that reads it."""
    folders: dict[str, int] = {}
    for i, job in enumerate(jobs):
        folder = _sharded_folder(job)
        if folder is not None:
            folders.setdefault(folder, i)
    return folders


def _sharded_folder(job: Job) -> str | None:
    """The real path of the folder of the job's base (the folder itself or an index's
    folder), if the base is a sharded checkpoint."""
    if not is_sharded(job.base):
        return None
    return os.path.realpath(job.base if os.path.isdir(job.base) else os.path.dirname(job.base))


def _check_outside(out: str, job: Job, i: int, folders: dict[str, int]) -> None:
    """Refuse an output (real path ``out``) that is a sharded base's folder or lies in
    it: it would change a base a job reads (its shards, its index, or files beside them
    that a sharded reader would take for shards)."""
    for folder in map(str, [Path(out), *Path(out).parents]):
        if folder in folders:
            own = folder == _sharded_folder(job)
            whose = "its own" if own else f"job #{folders[folder] + 1}'s"
            raise InvalidArgumentError(
                f"job #{i + 1} writes {job.output}, in {whose} sharded base's folder {folder}"
            )
