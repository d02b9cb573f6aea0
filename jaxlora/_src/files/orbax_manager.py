"""The orbax ``CheckpointManager`` behind :func:`jaxlora.checkpoint.checkpoint_manager`.

What it adds to orbax's own: the directory is made absolute (orbax rejects relative paths) and is
only created by a save, never by opening it to restore; ``max_to_keep`` must keep at least one
step; best-N retention ranks a NaN metric worst; one manager at a time saves into a directory,
checking each new step against the steps on disk; a closed manager refuses saves, restores and
deletes with a ValueError (nothing started, nothing left behind); and an asynchronous save still
unfinished when the interpreter exits is finished first (or, if it cannot be, reported on stderr)
instead of vanishing as a temporary directory or hanging the exit.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import threading
import weakref
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlora._src.files.directory_lock import DirectoryLock
from jaxlora._src.files.orbax_checks import check_manager_options, check_new_step

#: Item names inside a checkpoint step.
LORA_ITEM = "lora"
CONFIG_ITEM = "config"
OPT_STATE_ITEM = "opt_state"
CHECKSUMS_ITEM = "checksums"


class AdapterCheckpointManager(ocp.CheckpointManager):
    """An orbax ``CheckpointManager`` that knows its ``best_metric``, tracks async saves, lets one
    writer at a time save into its directory (:mod:`~jaxlora._src.files.directory_lock`), checks
    each new step against the steps on disk, and refuses reads and writes after :meth:`close`."""

    def __init__(self, directory: str, *, best_metric: str | None, **kwargs: Any) -> None:
        self.closed = False  # set first: orbax's __init__ may call the methods that check it
        self._lock = DirectoryLock(directory)
        self._saving = False
        super().__init__(directory, **kwargs)
        self.best_metric = best_metric
        self.pending_step: int | None = None
        self._exit_hook = None
        if kwargs["options"].enable_async_checkpointing:
            self._exit_hook = _exit_report(weakref.ref(self))
            atexit.register(self._exit_hook)
            _before_thread_shutdown(finish_pending_save(weakref.ref(self)))

    def check_open(self, what: str) -> None:
        """A ValueError naming ``what`` when the manager is closed."""
        if self.closed:
            raise ValueError(
                f"{what}: the checkpoint manager of `{os.fspath(self.directory)}` is closed; open "
                "a new one with `jaxlora.checkpoint.checkpoint_manager(directory)`"
            )

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        """orbax's ``save`` under the directory's lock: it waits for this manager's save in flight,
        re-reads the steps on disk, and refuses an existing or older step (nothing is overwritten,
        whatever this or another manager saw before)."""
        self.check_open(f"`save` of step {step}")
        self.wait_until_finished()
        if jax.process_count() == 1:  # the processes of a multi-process run write a step together
            self._lock.acquire(f"`save` of step {step}")
        try:
            self.reload()
            check_new_step(self, step)
            self._saving = True
            started = super().save(step, *args, **kwargs)
        except BaseException:
            self._saving = False
            self._lock.release()
            raise
        self._saving = False
        if not (started and self._options.enable_async_checkpointing):
            self._lock.release()
        return started

    def wait_until_finished(self) -> None:
        """Waits for a save in flight, then lets other writers save into the directory."""
        try:
            super().wait_until_finished()
        finally:
            if not self._saving:  # orbax's ``save`` calls this before it starts, under our lock
                self._lock.release()

    def restore(self, step: Any, *args: Any, **kwargs: Any) -> Any:
        self.check_open(f"`restore` of step {step}")
        return super().restore(step, *args, **kwargs)

    def item_metadata(self, step: int) -> Any:
        self.check_open(f"reading the metadata of step {step}")
        return super().item_metadata(step)

    def delete(self, step: int) -> None:
        self.check_open(f"`delete` of step {step}")
        super().delete(step)

    def reload(self) -> None:
        self.check_open("`reload`")
        super().reload()

    def close(self) -> None:
        """Waits for any save in flight, then releases the manager's resources and the directory's
        lock; a closed manager refuses later saves, restores and deletes. Closing twice is
        harmless."""
        if self.closed:
            return
        try:
            super().close()
        finally:
            self.closed = True
            self._lock.release()
            self.pending_step = None
            if self._exit_hook is not None:
                atexit.unregister(self._exit_hook)
                self._exit_hook = None


def _before_thread_shutdown(hook: Any) -> None:
    """Runs ``hook`` when the interpreter exits, before it joins its threads and before
    ``concurrent.futures`` stops accepting work: the point at which orbax's background save can
    still finish. (``atexit`` hooks run only after that join, which an unfinished orbax save never
    lets end: its writer thread cannot submit its last file operations, and its signalling threads
    wait for them forever.) ``threading._register_atexit`` is the hook ``concurrent.futures`` itself
    uses; where it is missing, the ``atexit`` report still runs."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(hook)


def finish_pending_save(ref: weakref.ref[AdapterCheckpointManager]) -> Any:
    """The exit hook of an async manager: waits for its save in flight, if any, and says on stderr
    that it waited (or that the save failed); a closed or collected manager is left alone."""

    def finish() -> None:
        manager = ref()
        if manager is None or manager.pending_step is None:
            return
        step = manager.pending_step
        try:
            manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - reported; the atexit report follows
            print(f"jaxlora.checkpoint: the asynchronous save of step {step} failed while the "
                  f"interpreter was exiting: {error!r}", file=sys.stderr, flush=True)  # fmt: skip
            return
        print(
            f"jaxlora.checkpoint: waited for the asynchronous save of step {step} in "
            f"`{os.fspath(manager.directory)}` to finish before exiting. Close the manager (`with "
            "checkpoint_manager(...)` or `manager.close()`) when done with it.",
            file=sys.stderr,
            flush=True,
        )

    return finish


def _exit_report(ref: weakref.ref[AdapterCheckpointManager]) -> Any:
    def report() -> None:
        manager = ref()
        if manager is None or manager.pending_step is None:
            return
        step, directory = manager.pending_step, os.fspath(manager.directory)
        names = os.listdir(directory) if os.path.isdir(directory) else []
        if any(name == str(step) or name.endswith(f"_{step}") for name in names):
            return
        print(
            f"jaxlora.checkpoint: the asynchronous save of step {step} in `{directory}` did not "
            "finish before the interpreter exited and is LOST (only a temporary directory remains)."
            " Close the manager (`with checkpoint_manager(...)` or `manager.close()`) or call "
            "`manager.wait_until_finished()` before exiting.",
            file=sys.stderr,
            flush=True,
        )

    return report


def _ranked(best_metric: str, best_mode: str) -> Any:
    """orbax's ``best_fn``: the metric, with NaN ranked below every number."""
    worst = math.inf if best_mode == "min" else -math.inf

    def rank(metrics: Any) -> float:
        value = float(metrics[best_metric])
        return worst if math.isnan(value) else value

    return rank


def checkpoint_manager(
    directory: str | os.PathLike[str],
    *,
    max_to_keep: int | None = None,
    best_metric: str | None = None,
    best_mode: str = "min",
    async_save: bool = False,
    **options: Any,
) -> AdapterCheckpointManager:
    """An orbax ``CheckpointManager`` for adapter checkpoints.

    Args:
        directory: where the steps live; relative paths are made absolute. It is created by the
            first :func:`save`, never by opening it.
        max_to_keep: keep at most this many steps, at least 1 (``None`` keeps all).
        best_metric: with it, the steps kept are the best by ``metrics[best_metric]`` as passed to
            :func:`save` (which then requires it), instead of the latest. A NaN metric ranks
            worst, so it is deleted first and is never ``manager.best_step()`` while a number is.
        best_mode: ``"min"`` (e.g. a loss) or ``"max"`` (e.g. an accuracy).
        async_save: write in a background thread; call ``manager.wait_until_finished()`` before
            reading what was written, and close the manager (or use it in a ``with`` block)
            before the interpreter exits: a save still in flight at exit is waited for (and
            the wait reported on stderr), and one that cannot finish is reported as lost.
        **options: any other ``orbax.checkpoint.CheckpointManagerOptions`` field.

    Returns:
        The manager; close it (or use it as a context manager) when done. A closed manager refuses
        ``save``, ``restore``, ``delete``, ``reload`` and ``item_metadata`` (and so
        :func:`save` / :func:`restore`) with a ValueError saying it is closed.

    Writers: a save takes an exclusive lock on ``<directory>/.jaxlora-lock`` (``fcntl.flock``),
    re-reads the steps on disk, refuses an existing or older step, and keeps the lock until the
    step is committed (an asynchronous save: until the next save, ``wait_until_finished()`` or
    ``close()``). Another manager's save into the same directory meanwhile, in any process on this
    machine, is a ValueError rather than a silent replacement; a killed writer's lock goes with it.
    In a multi-process run (``jax.process_count() > 1``) the processes save each step together and
    no lock is taken; the check against the steps on disk still holds.

    Raises:
        TypeError: when ``directory`` is no path, ``best_metric`` no string or ``async_save``
            no bool.
        ValueError: when ``best_mode`` is neither ``"min"`` nor ``"max"``, or ``max_to_keep`` is
            not a positive int (0 would delete every step it writes).
    """
    check_manager_options(directory, best_metric, async_save)
    if best_mode not in ("min", "max"):
        raise ValueError(f"`best_mode` must be 'min' or 'max', got {best_mode!r}")
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
    ):
        raise ValueError(
            f"`max_to_keep` must be an int >= 1 (or None to keep every step), got {max_to_keep!r}"
        )
    best_fn = None if best_metric is None else _ranked(best_metric, best_mode)
    options.setdefault("create", False)
    manager_options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        best_fn=best_fn,
        best_mode=best_mode,
        enable_async_checkpointing=async_save,
        **options,
    )
    handlers = {
        LORA_ITEM: ocp.StandardCheckpointHandler(),
        CONFIG_ITEM: ocp.JsonCheckpointHandler(),
        OPT_STATE_ITEM: ocp.StandardCheckpointHandler(),
        CHECKSUMS_ITEM: ocp.JsonCheckpointHandler(),
    }
    return AdapterCheckpointManager(
        os.path.abspath(os.fspath(directory)),
        best_metric=best_metric,
        item_handlers=handlers,
        options=manager_options,
    )
