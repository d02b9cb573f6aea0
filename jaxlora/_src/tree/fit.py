"""Does an adapter fit a base? The Θ a config makes for a base, and a check that lists every misfit.

Used wherever an adapter arrives from outside (an orbax checkpoint, a PEFT file, a bank of
adapters): the stored tree is compared with the one :func:`jaxlora.split` would make, path by path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import find_targets
from jaxlora._src.tree.core import split
from jaxlora._src.tree.count import params_only
from jaxlora._src.types import LoraTree, Params


def expected_adapter(
    base: Params, config: LoraConfig, variant: str = "lora", *, argument: str = "frozen",
    caller: str | None = None,
) -> LoraTree:  # fmt: skip
    """The shapes and dtypes of the Θ of ``variant`` that ``config`` makes for ``base``, as
    ShapeDtypeStructs; a base without a weight to adapt is named as ``argument`` (of ``caller``).

    ``base`` may hold arrays or ``jax.ShapeDtypeStruct``; nothing is computed or allocated.
    """
    view = params_only(base)  # of an Equinox model its arrays: functions are no jax types
    find_targets(view, config, argument=argument, caller=caller)
    key = jax.random.key(0)
    return jax.eval_shape(lambda params: split(params, config, key, variant=variant)[1], view)


def describe(leaf: Any) -> str:
    """``'(shape) dtype'`` of an array or ``ShapeDtypeStruct``, for error messages."""
    return f"{tuple(leaf.shape)} {jax.numpy.dtype(leaf.dtype).name}"


def check_fits(stored: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Raises a ValueError listing every path whose stored leaf is missing, extra or misfit.

    Both arguments map ``"/"``-joined leaf paths to objects with ``shape`` and ``dtype``.
    """
    problems = []
    for path in sorted(set(stored) | set(expected)):
        if path not in stored:
            problems.append(f"`{path}` missing (expected {describe(expected[path])})")
        elif path not in expected:
            problems.append(f"`{path}` unexpected (stored {describe(stored[path])})")
        elif tuple(stored[path].shape) != tuple(expected[path].shape) or jax.numpy.dtype(
            stored[path].dtype
        ) != jax.numpy.dtype(expected[path].dtype):
            problems.append(
                f"`{path}` stored {describe(stored[path])}, expected {describe(expected[path])}"
            )
    if problems:
        raise ValueError(
            f"{where} does not fit `frozen`: "
            + "; ".join(problems[:20])
            + (f"; … ({len(problems) - 20} more)" if len(problems) > 20 else "")
            + ". Was the adapter made for another model (or another size of it)?"
        )
