"""One combined tree: Θ's factors beside their kernels, for training with one params dict.

:func:`jaxlora.partition` splits it back into the frozen base and Θ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from jaxlora._src import paths
from jaxlora._src.quant.kernel import is_quantized
from jaxlora._src.tree import checks, count
from jaxlora._src.types import LoraTree, Params


def combine(frozen: Params, lora: LoraTree) -> dict[Any, Any]:
    """One nested dict holding both trees: Θ's factors beside their kernels, Θ's copies replacing
    their base leaves: the single tree for users who train with one params dict and
    :func:`jaxlora.freeze` (split it back with :func:`jaxlora.partition`). Models do not run on it:
    the factored forward runs on :func:`jaxlora.adapted_params`.

    ``frozen`` may be any params pytree; a part of it that is no dict (an Equinox module, a
    dataclass, a list) becomes the nested dict of its arrays keyed by the tree's own keys (Θ's
    form), so ``partition`` gives the base back in that form: merge into the original tree with
    :func:`jaxlora.merge` to get the Equinox model back.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> config = jaxlora.LoraConfig(r=1, target_modules=["d"])
        >>> params, key = {"d": {"kernel": jnp.ones((2, 2))}}, jax.random.key(0)
        >>> frozen, lora = jaxlora.split(params, config, key)
        >>> sorted(combine(frozen, lora)["d"])
        ['kernel', 'lora_a', 'lora_b']
    """
    checks.require_tree(frozen=frozen)
    if not isinstance(lora, Mapping):
        raise TypeError(f"`lora` must be a nested dict (as `split` returns), got {lora!r:.60}")
    count.check_fits(count.base_leaves(frozen), lora, "combine")
    return _combine(frozen, lora)


def _as_dict(tree: Any) -> Any:
    """A subtree that is no mapping (an Equinox module, a dataclass, a list) as the nested dict
    of its array leaves keyed by their raw keys, the form Θ has; mappings and leaves as they are."""
    whole = isinstance(tree, Mapping | nnx.Variable) or is_quantized(tree)
    if whole or jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)):
        return tree
    out: dict[Any, Any] = {}
    for keys, _, leaf in paths.flatten(count.params_only(tree)):
        paths.set_in(out, keys, leaf)
    return out


def _combine(frozen: Params, lora: Mapping[Any, Any]) -> dict[Any, Any]:
    frozen = _as_dict(frozen)
    out = {k: _combine(v, {}) if isinstance(_as_dict(v), Mapping) else v for k, v in frozen.items()}
    for key, value in lora.items():
        out[key] = _combine(out.get(key, {}), value) if isinstance(value, Mapping) else value
    return out
