"""The arguments of the Hugging Face loaders, checked before any file is opened, and the dtype
rule of the weights they read: floating point, never cast to an integer dtype."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._src import validate

__all__ = ["check_floating", "check_load_args", "check_weight_dtype"]


def check_weight_dtype(dtype: Any) -> np.dtype | None:
    """``dtype`` (of ``load_hf`` and the loaders) as a numpy dtype: None, or a floating dtype.

    Casting weights to an integer or bool dtype would truncate every weight (a q_proj kernel of
    zeros) without an error, so only floating dtypes are accepted.

    Raises:
        TypeError: naming ``dtype`` and the allowed dtypes when it is not a floating dtype.
    """
    if dtype is None:
        return None
    allowed = "None (keep the stored dtypes) or a floating dtype: float32, bfloat16, float16"
    try:
        resolved = jnp.dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(f"`dtype` must be {allowed}; got {dtype!r:.60}") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(
            f"`dtype` must be {allowed}; got {resolved.name}, which would truncate every weight"
        )
    return resolved


def check_floating(name: str, file: str, array: np.ndarray) -> None:
    """Weights are floating point; an integer tensor under a weight's name is a quantised or
    foreign checkpoint that these loaders do not read (casting it would be silently wrong)."""
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"the tensor `{name}` in `{file}` is {array.dtype}, not a floating dtype: weights "
            "must be floating point (quantised checkpoints, e.g. GPTQ/AWQ/bitsandbytes int8, "
            "are not read; dequantise them with transformers first)"
        )


def check_load_args(directory: Any, mesh: Any, shardings: Any, progress: Any) -> None:
    """A TypeError / ValueError naming the first wrong argument of a ``load_hf*`` call, raised
    before any file is opened."""
    validate.path("directory", directory)
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise validate.fail_type("mesh", "a jax.sharding.Mesh or None", mesh)
    if shardings is not None and not (callable(shardings) or isinstance(shardings, Mapping)):
        raise validate.fail_type(
            "shardings", "a dict of path regex -> PartitionSpec, a function or None", shardings
        )
    validate.boolean("progress", progress)
