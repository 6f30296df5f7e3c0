"""Where the lab writes its reports: the report folder is checked before any training,
and every file is written atomically (a temporary file renamed into place), so a
symlink in the folder is replaced, never followed, and a failed write keeps the
previous file."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Union

from .._io.atomic import atomic_file

PathLike = Union[str, "os.PathLike[str]"]


def check_report_folder(out: PathLike, overwrite: bool) -> Path:
    """``out`` as a Path, refused before any work when it is not a folder, or, unless
    ``overwrite``, when it already holds anything (a report a run writes replaces
    files by name: ``overwrite`` says the user wants that)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is not a folder", os.fspath(out))
    if not overwrite and out.is_dir():
        held = sorted(p.name for p in out.iterdir())
        if held:
            shown = ", ".join(held[:3]) + (", …" if len(held) > 3 else "")
            raise FileExistsError(
                errno.EEXIST,
                f"already holds {shown}; write the report to another folder "
                "(overwrite=True writes it into this one)",
                os.fspath(out),
            )
    return out


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))
    return path


def write_json(path: PathLike, data: Any, *, allow_nan: bool = False) -> Path:
    """``data`` as indented JSON, written atomically; strict (NaN refused) unless
    ``allow_nan``."""
    return write_text(path, json.dumps(data, indent=2, allow_nan=allow_nan) + "\n")


def save_figure(fig: Any, path: PathLike, **savefig: Any) -> Path:
    """``fig.savefig(path, **savefig)``, atomically: the format comes from the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_file(path) as f:
        fig.savefig(f, format=fmt, **savefig)
    return path
