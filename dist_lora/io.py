"""Atomic files and directories: write under a temporary name next to the target, make it
durable (fsync), rename it into place. A reader sees the old version or the complete new
one, never a half-written one; a failure leaves the target as it was.

* :func:`atomic_path` / :func:`atomic_write_text`: one file.
* :class:`AtomicDirectory`: a whole directory (a checkpoint, a release), built in a staging
  directory and swapped into place when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched, so a reader
    sees either the old file or the complete new one, never a half-written one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600; use the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (names created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryNotEmptyError(FileExistsError):
    """The target of an :class:`AtomicDirectory` (``overwrite=False``) became non-empty while
    its replacement was being built; it was not replaced."""


class AtomicDirectory:
    """A directory built under a temporary name next to ``path`` and renamed to ``path`` when
    complete; the previous ``path`` (if any) is removed only after the new one is in place.

    As a context manager (one process): ``with AtomicDirectory(out) as staging: <write files
    into staging>``; on an exception the staging directory is removed and ``path`` is left as
    it was. Several processes can share one: give a fixed ``staging_name`` (every process
    knows :attr:`staging` without communicating), one process calls :meth:`create` before the
    others write and :meth:`commit` after they are done.

    ``overwrite=False``: :meth:`commit` refuses (:class:`DirectoryNotEmptyError`) to replace a
    ``path`` that holds files by then. Staging directories are named ``.<name>.partial-*``
    (or ``staging_name``); the old directory is moved to ``.<name>.old-*`` before removal.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = True, staging_name: Optional[str] = None) -> None:
        self.path, self.overwrite = os.path.abspath(os.fspath(path)), overwrite
        self.parent, self.name = os.path.dirname(self.path), os.path.basename(self.path)
        self.staging: Optional[str] = None if staging_name is None else os.path.join(self.parent, staging_name)

    def create(self) -> str:
        """Make an empty staging directory (a fixed ``staging_name`` left by a crashed attempt
        is emptied) and return its path."""
        os.makedirs(self.parent, exist_ok=True)
        if self.staging is None:
            self.staging = tempfile.mkdtemp(prefix=f".{self.name}.partial-", dir=self.parent)
            os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp makes 0700; use the usual mode
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
            os.makedirs(self.staging)
        return self.staging

    def commit(self) -> None:
        """Swap the complete staging directory into place (its entries durable first)."""
        fsync_dir(self.staging)
        old = None
        if os.path.isdir(self.path):
            if os.listdir(self.path) and not self.overwrite:  # appeared while the staging was written
                raise DirectoryNotEmptyError(f"{self.path} became non-empty; not replacing it without --overwrite.")
            old = tempfile.mkdtemp(prefix=f".{self.name}.old-", dir=self.parent)
            os.rename(self.path, os.path.join(old, "previous"))
        os.rename(self.staging, self.path)
        fsync_dir(self.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging directory; ``path`` is untouched."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> str:
        return self.create()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
            return
        try:
            self.commit()
        except BaseException:
            self.discard()
            raise


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` (links resolved) are the same path or one lies inside the other."""
    real_a, real_b = os.path.realpath(a), os.path.realpath(b)
    return real_a == real_b or real_a.startswith(real_b + os.sep) or real_b.startswith(real_a + os.sep)


def is_plain_file_name(name: object) -> bool:
    """True for a plain file name that stays inside the directory it is joined to: a non-empty
    string with no directory part (no ``/`` or ``\\``), not ``.`` / ``..``, no NUL. File names read
    from a checkpoint's own files (manifests, ``latest`` pointers) must pass this before use."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
        and os.path.basename(name) == name
    )
