"""One combined tree: Θ's factors beside their kernels, for training with one params dict.

:func:`jaxlora.partition` splits it back into the frozen base and Θ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxlora._src.tree import checks, count
from jaxlora._src.types import LoraTree, Params


def combine(frozen: Params, lora: LoraTree) -> dict[Any, Any]:
    """One nested dict holding both trees: Θ's factors beside their kernels, Θ's copies replacing
    their base leaves: the single tree for users who train with one params dict and
    :func:`jaxlora.freeze` (split it back with :func:`jaxlora.partition`). Models do not run on it:
    the factored forward runs on :func:`jaxlora.adapted_params`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> config = jaxlora.LoraConfig(r=1, target_modules=["d"])
        >>> params, key = {"d": {"kernel": jnp.ones((2, 2))}}, jax.random.key(0)
        >>> frozen, lora = jaxlora.split(params, config, key)
        >>> sorted(combine(frozen, lora)["d"])
        ['kernel', 'lora_a', 'lora_b']
    """
    checks.require_dicts(frozen=frozen, lora=lora)
    count.check_fits(count.base_leaves(frozen), lora, "combine")
    return _combine(frozen, lora)


def _combine(frozen: Params, lora: Mapping[Any, Any]) -> dict[Any, Any]:
    out = {k: _combine(v, {}) if isinstance(v, Mapping) else v for k, v in frozen.items()}
    for key, value in lora.items():
        out[key] = _combine(out.get(key, {}), value) if isinstance(value, Mapping) else value
    return out
