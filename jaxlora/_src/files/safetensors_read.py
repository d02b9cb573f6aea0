"""Reading a safetensors file so that a damaged one is an error naming it.

``safetensors`` reports a truncated file, a file of another format or a bad header with its own
``SafetensorError`` (or an ``OSError``) and a message that does not say which file it was.
:func:`open_safetensors` opens the file and reads from it under one rule: any failure is a
``ValueError`` that names the path and says what is likely wrong.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

_T = TypeVar("_T")


def unreadable(path: str | os.PathLike[str], error: BaseException) -> ValueError:
    """The ValueError for a file safetensors cannot read."""
    return ValueError(
        f"cannot read `{os.fspath(path)}` (truncated or not a safetensors file): "
        f"{type(error).__name__}: {error}"
    )


class SafetensorsReader:
    """``safe_open``'s handle with every read turned into :func:`unreadable` on failure."""

    def __init__(self, handle: Any, path: str | os.PathLike[str]) -> None:
        self._handle = handle
        self.path = os.fspath(path)

    def _read(self, read: Callable[[], _T]) -> _T:
        try:
            return read()
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, and others
            raise unreadable(self.path, err) from None

    def keys(self) -> list[str]:
        return self._read(lambda: list(self._handle.keys()))

    def metadata(self) -> dict[str, str]:
        return self._read(lambda: dict(self._handle.metadata() or {}))

    def get_tensor(self, name: str) -> np.ndarray:
        return self._read(lambda: self._handle.get_tensor(name))


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike[str]) -> Iterator[SafetensorsReader]:
    """``safetensors.safe_open(path, framework="numpy")``, as a :class:`SafetensorsReader`.

    Raises:
        ValueError: naming ``path`` when the file cannot be opened or read.
    """
    from safetensors import safe_open

    try:
        handle = safe_open(os.fspath(path), framework="numpy")
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, and others
        raise unreadable(path, err) from None
    with handle:
        yield SafetensorsReader(handle, path)
