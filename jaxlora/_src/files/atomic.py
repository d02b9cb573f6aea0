"""Replacing a whole directory so that a crash at any moment leaves the old one or the new one.

:func:`replace_directory` writes the new contents into a temporary sibling, fsyncs every file and
the directory, then swaps it with the target in one ``renameat2(RENAME_EXCHANGE)`` call (Linux);
where the kernel or libc lacks it, two renames do the swap, and a crash between them leaves the
old copy beside the target as ``.<name>.<random>.jaxlora-old`` rather than losing it. Entries of
the old directory that the writer does not produce (a README, tokenizer files) are carried over
as hard links (copies across file systems).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable

TMP_SUFFIX = ".jaxlora-tmp"
OLD_SUFFIX = ".jaxlora-old"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_tree(directory: str) -> None:
    """fsyncs every file under ``directory``, then every directory, deepest first."""
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_directory(root)


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange(first: str, second: str) -> bool:
    """Atomically swaps two paths (Linux ``renameat2``); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: no exchange here
        return False
    raise OSError(errno, os.strerror(errno), first, None, second)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def carry_over(old: str, new: str, owned: Callable[[str], bool] | None = None) -> None:
    """Hard-links (or copies) every entry of ``old`` that ``new`` lacks into ``new``, except the
    names ``owned`` says the writer produces."""
    for name in os.listdir(old):
        source, target = os.path.join(old, name), os.path.join(new, name)
        if os.path.lexists(target) or (owned is not None and owned(name)):
            continue
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        elif os.path.isdir(source):
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target)


def remove_stale(directory: str) -> None:
    """Removes temporary siblings that writers killed mid-write left beside ``directory``."""
    parent, name = os.path.split(directory)
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}.") and entry.endswith(TMP_SUFFIX):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def replace_directory(
    directory: str | os.PathLike[str],
    write: Callable[[str], None],
    owned: Callable[[str], bool] | None = None,
) -> None:
    """Calls ``write(tmp)`` to fill a fresh temporary sibling, then puts it in ``directory``'s
    place atomically: readers see the old directory or the new one, never a mix.

    Entries of the old directory that ``write`` did not produce are kept, unless ``owned(name)``
    says the writer produces such names (then they belong to the old export and are dropped).

    Raises:
        NotADirectoryError: when ``directory`` exists and is not a directory.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"`{directory}` exists and is not a directory")
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    remove_stale(directory)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=parent)
    try:
        write(tmp)
        existed = os.path.isdir(directory)
        if existed:
            carry_over(directory, tmp, owned)
        fsync_tree(tmp)
        if not existed:
            os.rename(tmp, directory)
        elif exchange(tmp, directory):
            shutil.rmtree(tmp)
        else:
            old = tempfile.mkdtemp(prefix=f".{name}.", suffix=OLD_SUFFIX, dir=parent)
            os.rename(directory, os.path.join(old, name))
            try:
                os.rename(tmp, directory)
            except OSError:
                os.rename(os.path.join(old, name), directory)
                raise
            shutil.rmtree(old)
        fsync_directory(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
