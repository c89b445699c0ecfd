"""Confining local paths that come from jobs to the directories the operator allowed."""

from __future__ import annotations

from pathlib import Path

from audioldm.errors import JobError


def resolve_inside(path: Path, roots: list[Path], what: str = "path") -> Path:
    """``path`` fully resolved (symlinks, ``..``), or JobError if it leaves every root.

    Relative paths are taken from the current directory, as a user running the worker
    locally would expect.
    """
    resolved = path.expanduser().resolve()
    for root in roots:
        if resolved.is_relative_to(root.expanduser().resolve()):
            return resolved
    allowed = ", ".join(str(root) for root in roots) or "none configured"
    raise JobError(f"{what} {str(path)!r} is outside the allowed local roots ({allowed}); "
                   "set LOCAL_STORAGE_ROOTS on the worker or use s3://")
