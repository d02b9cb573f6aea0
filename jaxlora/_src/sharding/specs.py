"""Adapter shardings that follow the base: the rule, and initialising Θ straight into it.

For a kernel W sharded by ``PartitionSpec`` P (one entry per axis; a shorter P leaves the trailing
axes replicated) and laid out as stack + window + input + output axes, the factors are sharded as

* ``a`` (stack + window + input + (r,)): P's stack, window and input entries, then the rank entry;
* ``b`` (stack + (r,) + output): P's stack entries, the rank entry, then P's output entries;

so every axis of a multi-axis DenseGeneral kernel keeps its mesh axes, and ΔW = s·A·B comes out
sharded exactly like W. The rank axis is replicated unless ``rank_axis`` names mesh axes for it.
Trainable copies (biases, ``modules_to_save``) take their base leaf's spec unchanged.

The base shardings may be given as a tree of ``PartitionSpec``, of ``NamedSharding``, of placed
arrays (their ``.sharding``), or as Flax logical-axis metadata: a params tree boxed by
``nn.with_logical_partitioning`` / ``nn.with_partitioning`` (``nn.Partitioned``), whose logical
names ``rules`` maps to mesh axes as ``nn.logical_to_mesh_sharding`` does.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import Target, find_targets, find_trainable_leaves
from jaxlora._src.tree.core import init_factors
from jaxlora._src.types import LORA_A, LORA_B, LoraTree, Params, PRNGKey

#: A mesh axis name, a tuple of them, or None (replicated): one entry of a ``PartitionSpec``.
AxisEntry = str | tuple[str, ...] | None


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec | NamedSharding | nn.Partitioned)


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def factor_specs(
    target: Target, spec: PartitionSpec, rank_axis: AxisEntry = None
) -> tuple[PartitionSpec, PartitionSpec]:
    """The ``(a, b)`` specs for one adapted kernel sharded by ``spec``.

    Args:
        target: the adapted kernel (from :func:`jaxlora.find_targets`).
        spec: the kernel's ``PartitionSpec``; missing trailing entries mean replicated.
        rank_axis: mesh axes for the rank axis of both factors (None: replicated).

    Raises:
        ValueError: when ``spec`` has more entries than the kernel has axes, or ``rank_axis``
            reuses a mesh axis the factor already shards over.

    Example:
        >>> import jax.numpy as jnp, jaxlora
        >>> from jax.sharding import PartitionSpec as P
        >>> params = {"q": {"kernel": jnp.zeros((2, 16, 4, 8))}}  # scanned DenseGeneral
        >>> config = jaxlora.LoraConfig(r=4, target_modules=["q"], layouts={"q": "sioo"})
        >>> [target] = jaxlora.find_targets(params, config)
        >>> factor_specs(target, P(None, "fsdp", "model"))
        (P(None, 'fsdp', None), P(None, None, 'model', None))
    """
    ndim = len(target.shape)
    if len(spec) > ndim:
        raise ValueError(
            f"the sharding of the {target.leaf} at `{target.path}` has {len(spec)} entries "
            f"({spec}) but the {target.leaf} has shape {target.shape}; expected at most {ndim}"
        )
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    n_in_end = ndim - target.n_out
    a_entries = entries[:n_in_end]
    b_entries = entries[: target.n_stack] + entries[n_in_end:]
    for name, kept in ((LORA_A, a_entries), (LORA_B, b_entries)):
        used = {axis for entry in kept for axis in _mesh_axes(entry)}
        clash = sorted(used.intersection(_mesh_axes(rank_axis)))
        if clash:
            raise ValueError(
                f"`rank_axis`={rank_axis!r} reuses mesh axes {clash} that `{target.path}/{name}` "
                f"already takes from the base spec {spec}; choose a mesh axis the "
                f"{target.leaf} is not sharded over, or rank_axis=None"
            )
    a = PartitionSpec(*a_entries, rank_axis)
    b = PartitionSpec(*b_entries[: target.n_stack], rank_axis, *b_entries[target.n_stack :])
    return a, b


def _as_specs(base: Any, rules: Any) -> dict[tuple[Any, ...], tuple[PartitionSpec, Mesh | None]]:
    """``{leaf keys: (mesh-axis spec, mesh or None)}`` for every leaf of the base sharding tree."""
    if any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(base, is_leaf=_is_spec_leaf)):
        base = nn.get_partition_spec(base)
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(base, is_leaf=_is_spec_leaf)[0]:
        mesh = None
        if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
            leaf = getattr(leaf, "sharding", None)
            if not isinstance(leaf, NamedSharding):
                raise TypeError(
                    f"the array at `{jax.tree_util.keystr(keypath)}` of `base_shardings` has "
                    f"sharding {leaf!r}; expected a NamedSharding (place it with a Mesh first)"
                )
        if isinstance(leaf, NamedSharding):
            leaf, mesh = leaf.spec, leaf.mesh
        elif leaf is None:
            leaf = PartitionSpec()
        elif not isinstance(leaf, PartitionSpec):
            raise TypeError(
                f"`base_shardings` leaf at `{jax.tree_util.keystr(keypath)}` is a "
                f"{type(leaf).__name__}; expected a PartitionSpec, NamedSharding, placed array, "
                "None or an nn.Partitioned box"
            )
        if rules is not None:
            leaf = nn.logical_to_mesh_axes(tuple(leaf), rules)
        out[paths.leaf_keys(keypath)] = (leaf, mesh)
    return out


def _place(spec: PartitionSpec, mesh: Mesh | None) -> PartitionSpec | NamedSharding:
    return spec if mesh is None else NamedSharding(mesh, spec)


def _check_rank_divides(target: Target, rank_axis: AxisEntry, mesh: Mesh | None) -> None:
    if mesh is None or rank_axis is None:
        return
    size = math.prod(mesh.shape[axis] for axis in _mesh_axes(rank_axis))
    if target.rank % size:
        raise ValueError(
            f"`rank_axis`={rank_axis!r} splits the rank of `{target.path}` over {size} devices, "
            f"but its rank is {target.rank}; expected a rank divisible by {size}"
        )


def lora_shardings(
    base_shardings: Any,
    config: LoraConfig,
    params: Params | None = None,
    *,
    rank_axis: AxisEntry = None,
    mesh: Mesh | None = None,
    rules: Any = None,
) -> LoraTree:
    """Shardings for the adapter Θ, derived from the base params' shardings.

    Args:
        base_shardings: a tree mirroring ``params`` of ``PartitionSpec`` / ``NamedSharding`` /
            placed arrays / None (replicated), or a params tree boxed with Flax partitioning
            metadata (``nn.Partitioned``, ``nn.LogicallyPartitioned``, concrete or abstract).
        config: the LoRA config.
        params: the params or their ``ShapeDtypeStruct`` s; None when ``base_shardings`` is itself
            the params tree (boxed, or placed arrays).
        rank_axis: mesh axes for the rank axis of ``lora_a`` and ``lora_b`` (None: replicated).
        mesh: turns ``PartitionSpec`` results into ``NamedSharding`` on this mesh; leaves given
            as ``NamedSharding`` or placed arrays keep their own mesh.
        rules: Flax logical axis rules (``((logical, mesh axes), ...)``) for logical names.

    Returns:
        A tree with the structure of ``jaxlora.split(params, config, key)[1]`` holding a
        ``NamedSharding`` (a mesh is known) or a ``PartitionSpec`` (none is) per leaf.

    Raises:
        ValueError: when a leaf of ``params`` has no sharding, a spec is longer than its kernel,
            or ``rank_axis`` clashes with the base spec or does not divide the rank.
        TypeError: when ``base_shardings`` holds something that is not a sharding.

    Example:
        >>> import jax.numpy as jnp, jaxlora
        >>> from jax.sharding import PartitionSpec as P
        >>> params = {"up": {"kernel": jnp.zeros((8, 32)), "bias": jnp.zeros(32)}}
        >>> specs = {"up": {"kernel": P("fsdp", "model"), "bias": P("model")}}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["up"], bias="all")
        >>> lora_shardings(specs, config, params)
        {'up': {'lora_a': P('fsdp', None), 'lora_b': P(None, 'model'), 'bias': P('model',)}}
    """
    if params is None:
        params = base_shardings
    params = nn.unbox(params)
    by_keys = _as_specs(base_shardings, rules)

    def lookup(keys: tuple[Any, ...]) -> tuple[PartitionSpec, Mesh | None]:
        if keys not in by_keys:
            seen = paths.preview(paths.join(map(str, k)) for k in by_keys)
            raise ValueError(
                f"`base_shardings` has no entry for `{paths.join(map(str, keys))}`; it must mirror "
                f"`params` (entries seen: {seen})"
            )
        spec, own_mesh = by_keys[keys]
        return spec, own_mesh if own_mesh is not None else mesh

    targets = find_targets(params, config)
    out: LoraTree = {}
    for target in targets:
        spec, where = lookup(target.keys + (target.leaf,))
        _check_rank_divides(target, rank_axis, where)
        a, b = factor_specs(target, spec, rank_axis)
        paths.set_in(out, target.keys + (LORA_A,), _place(a, where))
        paths.set_in(out, target.keys + (LORA_B,), _place(b, where))
    for keys, _ in find_trainable_leaves(params, config, targets):
        paths.set_in(out, keys, _place(*lookup(keys)))
    return out


def init_sharded(
    params: Params,
    config: LoraConfig,
    key: PRNGKey,
    base_shardings: Any = None,
    *,
    rank_axis: AxisEntry = None,
    mesh: Mesh | None = None,
    rules: Any = None,
) -> LoraTree:
    """A fresh adapter created directly in its shardings: no host holds a full copy.

    The values equal ``jaxlora.split(params, config, key)[1]`` (JAX's partitionable PRNG draws the
    same numbers whatever the sharding); each device computes only its own shards.

    Args:
        params: the base params (arrays); only trainable leaves (biases, ``modules_to_save``) are
            read, so the others may be ``ShapeDtypeStruct``.
        config: the LoRA config.
        key: PRNG key, as for :func:`jaxlora.split`.
        base_shardings: as for :func:`lora_shardings`; None takes them from ``params`` (placed
            arrays or boxed params).
        rank_axis: as for :func:`lora_shardings`.
        mesh: the mesh for ``PartitionSpec`` shardings.
        rules: Flax logical axis rules for logical names.

    Raises:
        ValueError: when a sharding has no mesh to live on, or a trainable leaf has no value.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("model",))
        >>> params = {"up": {"kernel": jnp.zeros((8, 32))}}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["up"])
        >>> specs = {"up": {"kernel": P(None, "model")}}
        >>> lora = init_sharded(params, config, jax.random.key(0), specs, mesh=mesh)
        >>> lora["up"]["lora_b"].sharding.spec
        P(None, 'model')
    """
    if base_shardings is None:
        base_shardings = params
    params = nn.unbox(params)
    shardings = lora_shardings(
        base_shardings, config, params, rank_axis=rank_axis, mesh=mesh, rules=rules
    )
    unplaced = [
        paths.join(names)
        for _, names, s in paths.flatten(shardings)
        if not isinstance(s, NamedSharding)
    ]
    if unplaced:
        raise ValueError(
            f"`base_shardings` gives PartitionSpecs without a mesh for {paths.preview(unplaced)}; "
            "pass `mesh=` or NamedShardings"
        )
    targets = find_targets(params, config)
    trainable = find_trainable_leaves(params, config, targets)
    leaves = {keys: leaf for keys, _, leaf in paths.flatten(params)}
    copies = {}
    for keys, name in trainable:
        if isinstance(leaves[keys], jax.ShapeDtypeStruct):
            raise ValueError(
                f"`params` leaf `{name}` is trained in full, so `init_sharded` needs its value; "
                f"got {type(leaves[keys]).__name__}"
            )
        copies[keys] = leaves[keys]

    def build(key: PRNGKey, copies: dict[tuple[Any, ...], jax.Array]) -> LoraTree:
        lora: LoraTree = {}
        for target in targets:
            a, b = init_factors(target, config, key)
            paths.set_in(lora, target.keys + (LORA_A,), a)
            paths.set_in(lora, target.keys + (LORA_B,), b)
        for keys, leaf in copies.items():
            # A copy, so donating Θ to a jitted step never invalidates the base's buffers.
            paths.set_in(lora, keys, jnp.array(leaf, copy=True))
        return lora

    return jax.jit(build, out_shardings=shardings)(key, copies)
