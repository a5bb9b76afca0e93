"""File output: checked before the work starts, written atomically (temp file in the target folder,
then rename), existing files replaced only when asked."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from nepenthe_compress.errors import UserError

FORCE_HINT = "pass --force to replace it"


class OutputError(UserError):
    """An output cannot be written where asked, or would replace an existing file without --force."""


def check_writable(paths: Iterable[str | os.PathLike | None], force: bool = False,
                   inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Check, before any work, that every output path (``None`` and ``'-'``, stdout, are skipped) can be
    written: it is not one of the ``inputs`` (not even with ``force``), not a folder or a special
    file, no parent is a file, its nearest existing folder accepts new files, and it does not exist
    yet unless ``force``."""
    targets = [Path(p) for p in paths if p is not None and str(p) != "-"]
    read = {Path(p).resolve() for p in inputs if p is not None and str(p) != "-" and os.path.lexists(p)}
    for path in targets:
        if path.resolve() in read:
            raise OutputError(f"output '{path}' is also an input of this command; choose another path")
        _check_target(path)
        _check_folder(path)
    existing = [p for p in targets if os.path.lexists(p)]
    if existing and not force:
        more = f" (and {len(existing) - 1} more output(s))" if len(existing) > 1 else ""
        raise OutputError(f"output '{existing[0]}' already exists{more}: {FORCE_HINT}")


def _check_target(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ENOTDIR:   # a parent is a file: _check_folder says which
            return
        raise OutputError(f"cannot write '{path}': {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"output '{path}' is a folder, expected a file path")
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OutputError(f"output '{path}' exists and is not a regular file; choose another path")


def _check_folder(path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a folder that accepts new files."""
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        what = "a file, not a folder" if folder.is_file() else "not a folder"
        raise OutputError(f"cannot write '{path}': '{folder}' is {what}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputError(f"cannot write '{path}': folder '{folder}' is not writable ({e.strerror})") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp_path = _temp_beside(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _temp_beside(path: Path) -> Path:
    """An empty temp file in ``path``'s folder with the usual permissions (mkstemp's are 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class OutputSet:
    """Collects several outputs and commits them together (all or nothing).

    ``stage(path)`` returns a temp path to write; ``commit()`` renames every staged file (unless
    ``force``, only when none of the targets exists by then); ``discard()`` (or leaving the ``with``
    block with an exception) removes them all.
    """

    def __init__(self, force: bool = False) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self.force = force

    def stage(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = _temp_beside(path)
        self._staged.append((tmp, path))
        return tmp

    def commit(self) -> list[Path]:
        taken = [final for _, final in self._staged if os.path.lexists(final)]
        if taken and not self.force:
            self.discard()
            raise OutputError(f"output '{taken[0]}' appeared while this command ran: {FORCE_HINT}")
        done = []
        for tmp, final in self._staged:
            os.replace(tmp, final)
            done.append(final)
        self._staged.clear()
        return done

    def discard(self) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.commit()


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays and torch tensors."""
    import numpy as np
    import torch

    if isinstance(o, (torch.Tensor, np.ndarray)):
        return o.tolist()
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

