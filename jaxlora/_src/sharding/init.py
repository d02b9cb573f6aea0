"""A fresh adapter created straight into the shardings :func:`jaxlora.lora_shardings` derives.

:func:`init_sharded` runs :func:`jaxlora.split` under ``jax.jit`` with those shardings as
``out_shardings``: the base's kernels enter only as shapes, its trainable leaves (biases,
``modules_to_save``) as the arrays they are copied from, and each device computes only its own
shards of Θ.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding

from jaxlora._src import paths, validate
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import find_targets, find_trainable_leaves
from jaxlora._src.sharding.specs import AxisEntry, lora_shardings
from jaxlora._src.tree.core import split
from jaxlora._src.types import LoraTree, Params, PRNGKey


def _check_placed(shardings: LoraTree) -> None:
    """Raises unless every leaf of ``shardings`` is a ``NamedSharding`` (has a mesh)."""
    unplaced = [
        paths.join(names)
        for _, names, s in paths.flatten(shardings)
        if not isinstance(s, NamedSharding)
    ]
    if unplaced:
        raise ValueError(
            f"`shardings` gives PartitionSpecs without a mesh for {paths.preview(unplaced)}; "
            "pass `mesh=` or NamedShardings"
        )


def _trainable_values(frozen: Params, config: LoraConfig) -> dict[tuple[Any, ...], jax.Array]:
    """``{leaf keys: value}`` for the leaves of ``frozen`` that Θ trains in full (copies)."""
    leaves = {keys: leaf for keys, _, leaf in paths.flatten(frozen)}
    values = {}
    for keys, name in find_trainable_leaves(frozen, config, find_targets(frozen, config)):
        if isinstance(leaves[keys], jax.ShapeDtypeStruct):
            raise ValueError(
                f"`frozen` leaf `{name}` is trained in full, so `init_sharded` needs its value; "
                f"got {type(leaves[keys]).__name__}: pass the array"
            )
        values[keys] = leaves[keys]
    return values


def init_sharded(
    frozen: Params,
    config: LoraConfig,
    key: PRNGKey,
    shardings: Any = None,
    *,
    rank_axis: AxisEntry = None,
    mesh: Mesh | None = None,
    rules: Any = None,
) -> LoraTree:
    """A fresh adapter created directly in its shardings: no host holds a full copy.

    The values equal ``jaxlora.split(frozen, config, key)[1]`` (JAX's partitionable PRNG draws the
    same numbers whatever the sharding); each device computes only its own shards.

    Args:
        frozen: the base params (arrays); only trainable leaves (biases, ``modules_to_save``) are
            read, so the others may be ``ShapeDtypeStruct``.
        config: the LoRA config.
        key: PRNG key, as for :func:`jaxlora.split`.
        shardings: the base's shardings, as for :func:`jaxlora.lora_shardings`; None takes them
            from ``frozen`` (placed arrays, boxed params, or an ``nnx.State`` with partitioning
            metadata).
        rank_axis: as for :func:`jaxlora.lora_shardings`.
        mesh: the mesh for ``PartitionSpec`` shardings.
        rules: Flax logical axis rules for logical names.

    Raises:
        ValueError: when a sharding has no mesh to live on, or a trainable leaf has no value.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("model",))
        >>> frozen = {"up": {"kernel": jnp.zeros((8, 32))}}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["up"])
        >>> specs = {"up": {"kernel": P(None, "model")}}
        >>> lora = init_sharded(frozen, config, jax.random.key(0), specs, mesh=mesh)
        >>> lora["up"]["lora_b"].sharding.spec
        P(None, 'model')
    """
    validate.prng_key("key", key)
    out_shardings = lora_shardings(
        frozen, config, shardings, rank_axis=rank_axis, mesh=mesh, rules=rules
    )
    _check_placed(out_shardings)
    frozen = nn.unbox(frozen)
    values = _trainable_values(frozen, config)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)

    def build(key: PRNGKey, values: dict[tuple[Any, ...], jax.Array]) -> LoraTree:
        # Kernels stay shapes; split copies the trainable leaves, so donating Θ to a jitted step
        # never invalidates the base's buffers.
        tree = paths.map_with_keys(lambda keys, _, leaf: values.get(keys, leaf), shapes)
        return split(tree, config, key)[1]

    return jax.jit(build, out_shardings=out_shardings)(key, values)
