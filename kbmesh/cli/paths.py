"""Which files `kbmesh upload PATH...` sends: files, directories (recursively)
and glob patterns, in a stable order, each file once."""

from __future__ import annotations

import glob
from collections.abc import Iterable, Sequence
from pathlib import Path


class PathError(ValueError):
    """A PATH argument names nothing that can be uploaded."""


def _hidden(path: Path, root: Path) -> bool:
    """Dot files and anything under a dot directory below `root` (.git, .DS_Store)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _files_in(directory: Path) -> list[Path]:
    return sorted(
        path for path in directory.rglob("*") if path.is_file() and not _hidden(path, directory)
    )


def expand_paths(arguments: Sequence[str]) -> list[Path]:
    """The files to upload, in argument order (directory contents sorted).

    A directory contributes every file under it except hidden ones; a pattern
    with ``*``, ``?`` or ``[`` is expanded (``**`` matches any depth) when no
    file has that exact name. A file reached twice is uploaded once. Raises
    PathError for an argument that matches nothing, or when no file remains.
    """
    found: list[Path] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            files = _files_in(path)
            if not files:
                raise PathError(f"{argument}: directory has no files")
            found.extend(files)
        elif glob.has_magic(argument):
            matches = sorted(glob.glob(str(path), recursive=True))
            files = []
            for match in map(Path, matches):
                files.extend(_files_in(match) if match.is_dir() else [match])
            if not files:
                raise PathError(f"{argument}: no file matches")
            found.extend(files)
        else:
            raise PathError(f"{argument}: no such file or directory")
    return _unique(found)


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen: set[Path] = set()
    result = []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            result.append(path)
    return result
