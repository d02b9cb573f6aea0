"""Freezing for users who keep one combined params tree: masks, labels and an optax wrapper.

The recommended loop differentiates only w.r.t. Θ (``jax.grad(loss)(lora, frozen, batch)``), which
freezes the base by construction. When a training script keeps a single tree instead (the output
of :func:`jaxlora.combine`), these helpers make optax update only Θ's leaves and keep optimizer
state for those alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import BIAS
from jaxlora._src.types import ADAPTER_LEAVES, LORA_A, LoraTree, Params

TRAINABLE = "trainable"
FROZEN = "frozen"


def _is_trainable(combined: Params, config: LoraConfig, keys: tuple[Any, ...], names) -> bool:
    if names[-1] in ADAPTER_LEAVES:
        return True
    if names[-1] == BIAS:
        if config.bias == "all":
            return True
        module = paths.get_in(combined, keys[:-1])
        if config.bias == "lora_only" and isinstance(module, Mapping) and LORA_A in module:
            return True
    prefixes = [paths.join(names[:k]) for k in range(1, len(names))]
    return any(
        paths.matches_literal(name, prefix)
        for name in config.modules_to_save or ()
        for prefix in prefixes
    )


def trainable_mask(combined: Params, config: LoraConfig) -> Params:
    """A tree of bools, True on Θ's leaves, for ``optax.masked``.

    Example:
        >>> import jaxlora
        >>> tree = {"d": {"kernel": 0.0, "bias": 0.0, "lora_a": 0.0, "lora_b": 0.0}}
        >>> trainable_mask(tree, jaxlora.LoraConfig(bias="lora_only"))
        {'d': {'bias': True, 'kernel': False, 'lora_a': True, 'lora_b': True}}
    """
    return jax.tree.map_with_path(
        lambda kp, _: _is_trainable(combined, config, paths.leaf_keys(kp), paths.leaf_path(kp)),
        combined,
    )


def trainable_labels(combined: Params, config: LoraConfig) -> Params:
    """``"trainable"`` / ``"frozen"`` per leaf, for ``optax.multi_transform``."""
    mask = trainable_mask(combined, config)
    return jax.tree.map(lambda flag: TRAINABLE if flag else FROZEN, mask)


def freeze(
    optimizer: optax.GradientTransformation, config: LoraConfig
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` so it updates only Θ's leaves of a combined tree.

    The frozen leaves get ``optax.set_to_zero()`` updates and no optimizer state, so the state is
    the size of Θ, not of the model.

    Example:
        >>> import jax.numpy as jnp, optax, jaxlora
        >>> tree = {"d": {"kernel": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 1)),
        ...               "lora_b": jnp.zeros((1, 4))}}
        >>> opt = jaxlora.freeze(optax.adam(1e-3), jaxlora.LoraConfig())
        >>> state = opt.init(tree)
        >>> sum(x.size for x in jax.tree.leaves(state) if x.ndim) // 2  # Adam's two moments
        8
    """
    return optax.multi_transform(
        {TRAINABLE: optimizer, FROZEN: optax.set_to_zero()},
        lambda tree: trainable_labels(tree, config),
    )


def partition(combined: Params, config: LoraConfig) -> tuple[Params, LoraTree]:
    """The inverse of :func:`jaxlora.combine`: ``(frozen, lora)`` from one combined tree.

    ``frozen`` keeps every leaf but the factors; ``lora`` holds the trainable leaves.
    """
    frozen: dict[Any, Any] = {}
    lora: LoraTree = {}
    for keys, names, leaf in paths.flatten(combined):
        if _is_trainable(combined, config, keys, names):
            paths.set_in(lora, keys, leaf)
        if names[-1] not in ADAPTER_LEAVES:
            paths.set_in(frozen, keys, leaf)
    return frozen, lora
