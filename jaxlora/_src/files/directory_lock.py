"""One writer at a time per checkpoint directory: an exclusive ``flock`` on a file inside it.

The rule, which :class:`~jaxlora._src.files.orbax_manager.AdapterCheckpointManager` follows: a save
takes the lock on ``<directory>/.jaxlora-lock`` before it reads the steps on disk and holds it until
its step is committed (a synchronous save: until it returns; an asynchronous one: until the
manager's next save, ``wait_until_finished()`` or ``close()``). A second manager that tries to save
into the directory meanwhile, in this process or another, is refused at once with a ``ValueError``
instead of waiting (a wait could deadlock two managers in one thread). The kernel drops the lock
when its holder dies, so a killed writer never leaves the directory locked. ``flock`` is advisory
and local: writers on one machine (and on file systems that pass ``flock`` through) are serialised.
The processes of one multi-process JAX run write a step together and take no lock. Windows has no
``flock``: there no lock is taken (the check against the steps on disk still holds).
"""

from __future__ import annotations

import os
import sys

if sys.platform != "win32":
    import fcntl

LOCK_FILE = ".jaxlora-lock"


class DirectoryLock:
    """The exclusive lock of ``directory``; :meth:`acquire` never blocks and is re-entrant for
    its holder, :meth:`release` is idempotent."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, what: str) -> None:
        """Takes the lock, creating the file; a ValueError saying ``what`` was refused when another
        writer holds it."""
        if self._fd is not None or sys.platform == "win32":
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"{what} refused: another checkpoint manager is saving into "
                f"`{os.path.dirname(self.path)}` right now (it holds `{self.path}`). One writer "
                "per directory: close the other manager (or wait for its save) first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops its flock
