"""One job of a batch run: a base model patched with signatures at strengths into an
output, its done-marker, and the result line it gives.

A job's output is *complete and verified* when its done-marker ``<output>.rpdone``
exists, names this job (the :func:`job_key` of its inputs and options), and the
output's sha256 (and its undo record's) still equal the ones the marker holds. The
marker is written atomically (and durably) only after the output is committed and
hashed, and replaced by a "building" marker before a job rebuilds its output, so a run
killed at any moment leaves each output either verified or rebuilt by the next run. An
existing output without any marker was not written by a batch run: it is refused unless
the job has ``overwrite``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import validate
from .._format.shards import checkpoint_names, is_sharded, load_index
from .._format.undo import undo_path_for
from .._io.atomic import AtomicFile
from ..errors import EXPECTED_ERRORS, InvalidArgumentError
from ..options import PatchOptions

__all__ = [
    "DONE_SUFFIX",
    "Job",
    "done_path_for",
    "error_line",
    "job_key",
    "output_digest",
    "run_job",
    "verified",
]

DONE_SUFFIX = ".rpdone"
DONE_FORMAT = "robustpatch-done"
DONE_VERSION = 1
_HASH_CHUNK = 16 << 20
#: The patch options a job takes (a manifest's option keys).
OPTIONS = ("allow_dtype_change", "force", "undo", "durable")


@dataclass(frozen=True)
class Job:
    """Patch ``base`` (a safetensors file, an ``*.index.json`` or its folder) with
    ``signatures`` at ``alphas`` (one per signature) into ``output`` (a file, or a folder
    for a sharded base). Paths are absolute; build one with :meth:`make`."""

    base: str
    signatures: tuple[str, ...]
    alphas: tuple[float, ...]
    output: str
    allow_dtype_change: bool = False
    force: bool = False
    undo: bool = True
    durable: bool = False
    overwrite: bool = False  # replace an output no batch run wrote (not in the job key)

    @classmethod
    def make(
        cls,
        base: Any,
        signatures: Any,
        alphas: Any = 1.0,
        output: Any = None,
        overwrite: bool = False,
        **options: bool,
    ) -> Job:
        """A job from user values, each checked (InvalidArgumentError naming it);
        ``options``: those of :data:`OPTIONS`, as :func:`robustpatch.apply_file` takes them;
        ``overwrite``: an existing output that no batch run wrote is replaced, not refused."""
        if not isinstance(overwrite, bool):
            raise InvalidArgumentError(f"overwrite must be true or false, got {overwrite!r}")
        if isinstance(signatures, (str, os.PathLike)):
            signatures = [signatures]
        if not isinstance(signatures, (list, tuple)) or not signatures:
            raise InvalidArgumentError("a job needs a list of one or more signature files")
        if output is None:
            raise InvalidArgumentError("a job needs an output path")
        opts = PatchOptions.of(options, "Job.make", OPTIONS)
        return cls(
            _absolute(base, "base"),
            tuple(_absolute(s, "signature") for s in signatures),
            tuple(validate.alphas(len(signatures), alphas)),
            _absolute(output, "output"),
            opts.allow_dtype_change,
            opts.force,
            opts.undo,
            opts.durable,
            overwrite,
        )

    def options(self) -> dict[str, bool]:
        """The job's :data:`OPTIONS` as keywords."""
        return {name: getattr(self, name) for name in OPTIONS}

    @property
    def inputs(self) -> list[str]:
        return [self.base, *self.signatures]

    @property
    def outputs(self) -> list[str]:
        """Every path the job writes: the output, its done-marker, its undo record."""
        side = [os.fspath(undo_path_for(self.output))] if self.undo else []
        return [self.output, os.fspath(done_path_for(self.output)), *side]


def _absolute(value: Any, what: str) -> str:
    return os.path.abspath(validate.path(value, what))


def done_path_for(output: str | os.PathLike[str]) -> Path:
    """Where a job's done-marker lives: ``<output>.rpdone``."""
    return Path(os.fspath(output) + DONE_SUFFIX)


def _identity(path: str) -> list[Any]:
    """What tells a changed input file apart: its name, size, modification time and
    inode (a link re-pointed, or a file replaced by a rename, may keep the rest). Not
    its device number: a cluster's nodes, each of which computes the key, can number
    one shared mount differently."""
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns, st.st_ino]


def _stored_hash(signature: str) -> str | None:
    """The content hash a signature file's header names (None if it names none): a file
    rewritten in place with its size and time kept (``cp -p``) is another signature."""
    from .._format.safetensors import read_header_from
    from ..signature.codec import META_KEY

    try:
        with open(signature, "rb") as f:
            meta = json.loads(read_header_from(f, signature).metadata.get(META_KEY, "{}"))
    except (OSError, ValueError):
        return None  # the build reports what is wrong with it
    return meta.get("content_hash") if isinstance(meta, dict) else None


def _input_files(job: Job) -> list[str]:
    """Every file the job reads: a sharded base's index and the shards it names (what
    they are called is the index's to say), the signatures."""
    files = [job.base]
    if is_sharded(job.base):
        index = load_index(job.base)
        files = [str(index.path), *(str(index.shard_path(s)) for s in sorted(index.shards))]
    return files + list(job.signatures)


def job_key(job: Job) -> str:
    """sha256 of the job's options and its inputs' identities: a marker made by another
    job, or before an input changed, does not count."""
    spec = {k: v for k, v in asdict(job).items() if k not in ("durable", "overwrite")}
    spec["inputs"] = [_identity(p) for p in _input_files(job)]
    spec["signature_hashes"] = [_stored_hash(s) for s in job.signatures]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(folder: Path) -> list[Path]:
    """The files of a sharded output that robustpatch wrote: its index, the shards it
    names, their undo records and the folder's record; every file where the index does
    not load (a damaged output is then told apart from its marker's digest). Files a
    user adds beside them (``config.json``, the tokenizer) are not part of it."""
    try:
        index = load_index(folder)
    except (OSError, ValueError):
        return sorted(p for p in folder.iterdir())
    names = checkpoint_names(index)
    return sorted(p for p in folder.iterdir() if p.name in names)


def output_digest(output: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256, bytes) of an output: a file's own sha256, or for a sharded folder the
    sha256 of the sorted ``name sha256`` lines of its :func:`checkpoint_files` (so two
    folders agree iff every one of those does)."""
    path = Path(output)
    if not path.is_dir():
        return _file_sha256(path), path.stat().st_size
    lines, total = [], 0
    for p in checkpoint_files(path):
        lines.append(f"{p.name} {_file_sha256(p)}\n")
        total += p.stat().st_size
    return hashlib.sha256("".join(lines).encode()).hexdigest(), total


def _undo_digest(job: Job) -> str | None:
    """sha256 of a file output's undo record (a folder's records are in its digest)."""
    record = undo_path_for(job.output)
    if not job.undo or Path(job.output).is_dir():
        return None
    return _file_sha256(record)


def _read_marker(job: Job) -> dict[str, Any] | None:
    try:
        doc = json.loads(done_path_for(job.output).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and doc.get("format") == DONE_FORMAT
    return doc if ok and doc.get("version") == DONE_VERSION else None


def verified(job: Job, key: str) -> dict[str, Any] | None:
    """The marker of a complete, verified output of this job, else None."""
    marker = _read_marker(job)
    if marker is None or marker.get("job") != key or not os.path.exists(job.output):
        return None
    try:
        sha, size = output_digest(job.output)
        undo = _undo_digest(job)
    except OSError:
        return None
    if (sha, size, undo) != (marker.get("sha256"), marker.get("bytes"), marker.get("undo_sha256")):
        return None
    return marker


def _write_marker(job: Job, key: str, sha: str, size: int) -> None:
    doc = {
        "format": DONE_FORMAT,
        "version": DONE_VERSION,
        "job": key,
        "sha256": sha,
        "bytes": size,
        "undo_sha256": _undo_digest(job),
    }
    if Path(job.output).is_dir():  # what a rebuild of a damaged folder may delete
        doc["files"] = [p.name for p in checkpoint_files(Path(job.output))]
    with AtomicFile(done_path_for(job.output), durable=True) as f:
        f.file.write((json.dumps(doc) + "\n").encode())
        f.commit()


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders a claim made, deepest first; one holding anything stays."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break


def _claim(job: Job, key: str) -> Callable[[], None]:
    """Before a job (re)builds its output: refuse an existing output that no batch run
    wrote (no done-marker beside it) unless the job may overwrite, then mark the output
    as being built. That marker, not a missing one, is what a run killed mid-build
    leaves, so the next run rebuilds it rather than refuse it. Returns what undoes the
    claim after a build that failed cleanly (nothing written): a marker that was not
    there goes, with the folders made for it, so it never stands in for ``overwrite``."""
    marker = done_path_for(job.output)
    if os.path.lexists(job.output) and not marker.exists() and not job.overwrite:
        raise FileExistsError(
            errno.EEXIST,
            "already exists and no batch run wrote it (no "
            f"{DONE_SUFFIX} beside it); overwrite: true in the manifest (or --overwrite) "
            "replaces it",
            job.output,
        )
    doc = {"format": DONE_FORMAT, "version": DONE_VERSION, "job": key, "state": "building"}
    had_marker = marker.exists()
    if had_marker:
        _clear_damaged_folder(job)
    made = [p for p in Path(job.output).parents if not p.exists()]
    _make_parent(Path(job.output))
    try:
        with AtomicFile(marker, durable=True) as f:
            f.file.write((json.dumps(doc) + "\n").encode())
            f.commit()
    except BaseException:
        _remove_empty(made)
        raise

    def release() -> None:
        if had_marker:
            return  # the output was a batch's: rebuilding it stays allowed
        marker.unlink(missing_ok=True)
        _remove_empty(made)

    return release


def _make_parent(output: Path) -> None:
    """Create the output's folder; a file where a folder of its path should be is "Not
    a directory" there (mkdir says "File exists")."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), e.filename) from None


def _clear_damaged_folder(job: Job) -> None:
    """Empty a sharded output that its done marker lists file by file but that no longer
    loads (a shard or the index missing or cut short): the writer replaces only a whole
    checkpoint, so it could never be rebuilt. A folder holding any file the marker does
    not list is left as it is (the writer then refuses it, naming it)."""
    out = Path(job.output)
    if not out.is_dir() or out.is_symlink():
        return
    marker = _read_marker(job)
    listed = marker.get("files") if marker is not None else None
    if not isinstance(listed, list):
        return
    present = list(out.iterdir())
    if not {p.name for p in present} <= set(listed) or _loads(out):
        return
    for p in present:
        if p.is_file() and not p.is_symlink():
            p.unlink()


def _loads(folder: Path) -> bool:
    try:
        load_index(folder)
    except (OSError, ValueError):
        return False
    return True


def _build(job: Job) -> None:
    from ..files import apply_file

    apply_file(
        job.base,
        list(job.signatures),
        list(job.alphas),
        job.output,
        **job.options(),
    )


def run_job(job: Job, index: int = 0) -> dict[str, Any]:
    """Build one job's output unless it is complete and verified; its result line.

    Never raises for a failing job: the result says ``"status": "failed"`` with a
    one-line ``error`` (and a ``traceback`` when the error is a bug, not one of
    robustpatch's expected errors), so the rest of a batch goes on.
    """
    start = time.perf_counter()
    line: dict[str, Any] = {"job": index, "output": job.output}
    try:
        key = job_key(job)
        marker = verified(job, key)
        if marker is None:
            release = _claim(job, key)
            try:
                _build(job)
            except Exception:
                release()
                raise
            sha, size = output_digest(job.output)
            _write_marker(job, key, sha, size)
            line.update(status="done", bytes=size, sha256=sha)
        else:
            line.update(status="skipped", bytes=marker["bytes"], sha256=marker["sha256"])
    except Exception as e:  # noqa: BLE001 - one failing job must not end the batch
        line.update(status="failed", error=error_line(e))
        if not isinstance(e, EXPECTED_ERRORS):
            line["traceback"] = traceback.format_exc()
    line["seconds"] = round(time.perf_counter() - start, 6)
    return line


def error_line(e: BaseException) -> str:
    """One line for an error, an OSError's path first (as the CLI prints them)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{os.fspath(e.filename)}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    if not isinstance(e, EXPECTED_ERRORS):
        text = f"{type(e).__name__}: {text}"
    return " ".join(text.split())
