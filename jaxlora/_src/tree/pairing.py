"""Which part of the adapter Θ belongs to a leaf of the params tree: the one pairing rule.

Θ is a nested dict keyed by the raw keys of the params tree's own key paths: dict keys as they are
(ints stay ints), sequence indices as ints, attribute names (Equinox modules, dataclasses,
NamedTuples) as strings. An adapted weight (a ``kernel``, ``embedding`` or ``weight`` leaf) finds
its factors beside it, ``lora[*module keys]["lora_a" | "lora_b" | ...]``; a leaf trained in full
(a bias, a ``modules_to_save`` leaf) finds its copy at its own keys. So Θ has the same form for a
linen dict, an ``nnx.State``, an Equinox module and any other pytree, and every file and
checkpoint function reads it alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jaxlora._src import paths
from jaxlora._src.config.conventions import WEIGHT_LEAVES
from jaxlora._src.types import LoraTree
from jaxlora._src.variants import base as variants


def adapter_for(lora: LoraTree, path: Sequence[Any]) -> Mapping[str, Any] | jax.Array | None:
    """What ``lora`` holds for the params leaf at ``path``.

    Args:
        lora: the adapter Θ (the second value of :func:`jaxlora.split`).
        path: the leaf's key path, as ``jax.tree_util.tree_flatten_with_path`` gives it
            (``DictKey`` / ``SequenceKey`` / ``GetAttrKey`` entries; NNX's variable wrappers are
            skipped), or its raw keys.

    Returns:
        A mapping when the leaf is an adapted weight: its module's adapter (``lora_a``,
        ``lora_b`` and the variant's leaves, see :func:`jaxlora.variants`); an array when the leaf
        is trained in full: Θ's copy that replaces it; ``None`` when Θ leaves the leaf as it is.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"layers": [{"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}]}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["q"], bias="lora_only")
        >>> _, lora = jaxlora.split(params, config, jax.random.key(0))
        >>> flat = jax.tree_util.tree_flatten_with_path(params)[0]
        >>> [type(adapter_for(lora, path)).__name__ for path, _ in flat]
        ['ArrayImpl', 'dict']
    """
    keys = paths.leaf_keys(tuple(path))
    if not keys:
        return None
    if str(keys[-1]) in WEIGHT_LEAVES:
        module = paths.get_in(lora, keys[:-1])
        if isinstance(module, Mapping) and any(n in module for n in variants.adapter_leaves()):
            return module
    found = paths.get_in(lora, keys)
    return None if found is None or isinstance(found, Mapping) else found
