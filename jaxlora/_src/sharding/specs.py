"""Adapter shardings that follow the base: the rule for one kernel and for a whole adapter.

For a kernel W sharded by ``PartitionSpec`` P (one entry per axis; a shorter P leaves the trailing
axes replicated), P's entries are first put in the factors' axis order (stack, window, input,
output), whatever the order of the kernel's own axes (its layout); then the factors are sharded as

* ``a`` (stack + window + input + (r,)): P's stack, window and input entries, then the rank entry;
* ``b`` (stack + (r,) + output): P's stack entries, the rank entry, then P's output entries;

so every axis of a multi-axis DenseGeneral kernel keeps its mesh axes, and ΔW = s·A·B comes out
sharded exactly like W. The rank axis is replicated unless ``rank_axis`` names mesh axes for it.
Trainable copies (biases, ``modules_to_save``) take their base leaf's spec unchanged.

The base's shardings may be given as a tree of ``PartitionSpec``, of ``NamedSharding``, of placed
arrays (their ``.sharding``), or as Flax logical-axis metadata: a params tree boxed by
``nn.with_logical_partitioning`` / ``nn.with_partitioning`` (``nn.Partitioned``), or an
``nnx.State`` whose ``nnx.Param`` s carry ``nnx.with_partitioning`` metadata (read as
``nnx.get_partition_spec`` reads it), whose logical names ``rules`` maps to mesh axes as
``nn.logical_to_mesh_sharding`` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.linen.spmd import logical_to_mesh_axes
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jaxlora._src import paths, validate
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import Target, find_targets, find_trainable_leaves
from jaxlora._src.types import LORA_A, LORA_B, LoraTree, Params

#: A mesh axis name, a tuple of them, or None (replicated): one entry of a ``PartitionSpec``.
AxisEntry = str | tuple[str, ...] | None


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec | NamedSharding | nn.Partitioned)


def _is_spec_or_variable(x: Any) -> bool:
    return _is_spec_leaf(x) or isinstance(x, nnx.Variable)


def _nnx_leaf(variable: nnx.Variable, described: bool) -> tuple[Any, Mesh | None]:
    """What an NNX variable says about its sharding, as ``(sharding leaf, mesh or None)``.

    In order: a sharding it holds (the trees ``nnx.get_partition_spec`` and
    ``nnx.get_named_sharding`` make), its array's ``NamedSharding`` (placed, or eagerly sharded
    under a mesh), its partitioning metadata (``nnx.with_partitioning`` stores the axis names as
    ``out_sharding``, ``sharding_names`` before flax 0.12; read by ``nnx.get_partition_spec``'s
    rule, with the variable's ``sharding_rules``), and replicated when other variables of the tree
    carry such metadata.
    """
    value = variable.get_value()
    if _is_spec_leaf(value) or isinstance(getattr(value, "sharding", None), NamedSharding):
        return value, None
    if variable.get_metadata().get("out_sharding") or described:
        spec = nnx.get_partition_spec(variable).get_value()
        return spec, variable.get_metadata().get("mesh")
    return value, None


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
    if not isinstance(target, Target):
        raise validate.fail_type("target", "a jaxlora.Target (from `find_targets`)", target)
    if not isinstance(spec, PartitionSpec):
        raise validate.fail_type("spec", "a jax.sharding.PartitionSpec", spec)
    if rank_axis is not None and not isinstance(rank_axis, str):
        validate.str_sequence("rank_axis", rank_axis, nonempty=True)
    ndim = len(target.shape)
    if len(spec) > ndim:
        raise ValueError(
            f"the sharding of the {target.leaf} at `{target.path}` has {len(spec)} entries "
            f"({spec}) but the {target.leaf} has shape {target.shape}; expected at most {ndim}"
        )
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    entries = tuple(entries[k] for k in target.perm)  # the factors' order, whatever the layout
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


def _as_specs(
    shardings: Any, rules: Any
) -> dict[tuple[Any, ...], tuple[PartitionSpec, Mesh | None]]:
    """``{leaf keys: (mesh-axis spec, mesh or None)}`` for every leaf of the base sharding tree."""
    leaves = jax.tree.leaves(shardings, is_leaf=_is_spec_leaf)
    if any(isinstance(x, nn.Partitioned) for x in leaves):
        shardings = nn.get_partition_spec(shardings)
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=_is_spec_or_variable)[0]
    # As for linen boxes: once any variable carries partitioning metadata, the others are
    # replicated (nnx.get_partition_spec's reading), not looked up on their arrays.
    described = any(
        isinstance(leaf, nnx.Variable) and leaf.get_metadata().get("out_sharding")
        for _, leaf in flat
    )
    for keypath, leaf in flat:
        mesh = None
        if isinstance(leaf, nnx.Variable):
            leaf, mesh = _nnx_leaf(leaf, described)
        if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
            leaf = getattr(leaf, "sharding", None)
            if not isinstance(leaf, NamedSharding):
                raise TypeError(
                    f"the array at `{jax.tree_util.keystr(keypath)}` of `shardings` has "
                    f"sharding {leaf!r}; expected a NamedSharding (place it with a Mesh first)"
                )
        if isinstance(leaf, NamedSharding):
            leaf, mesh = leaf.spec, leaf.mesh
        elif leaf is None:
            leaf = PartitionSpec()
        elif not isinstance(leaf, PartitionSpec):
            raise TypeError(
                f"`shardings` leaf at `{jax.tree_util.keystr(keypath)}` is a "
                f"{type(leaf).__name__}; expected a PartitionSpec, NamedSharding, placed array, "
                "None, an nn.Partitioned box or an nnx.Variable with sharding metadata"
            )
        if rules is not None:
            leaf = logical_to_mesh_axes(tuple(leaf), rules)
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


def _check_options(frozen: Any, rank_axis: Any, mesh: Any, rules: Any) -> None:
    """TypeErrors naming ``frozen``, ``rank_axis``, ``mesh`` or ``rules`` when of a wrong type."""
    if not isinstance(frozen, Mapping):
        raise TypeError(
            f"`frozen` must be the base params, a nested dict (for `target_modules` to match), "
            f"got {type(frozen).__name__}"
        )
    names = rank_axis if isinstance(rank_axis, tuple | list) else (rank_axis,)
    if rank_axis is not None and not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"`rank_axis` must be None or a mesh axis name (or a tuple of them), got {rank_axis!r}"
        )
    if mesh is not None and not isinstance(mesh, Mesh | AbstractMesh):
        raise TypeError(
            f"`mesh` must be a jax.sharding.Mesh (e.g. `jax.make_mesh((n,), ('model',))`) or "
            f"None, got {type(mesh).__name__}"
        )
    pairs = isinstance(rules, tuple | list) and all(
        isinstance(r, tuple | list) and len(r) == 2 and isinstance(r[0], str) for r in rules
    )
    if rules is not None and not pairs:
        raise TypeError(
            "`rules` must be Flax logical axis rules, a sequence of (logical name, mesh axes) "
            f"pairs such as (('embed', 'fsdp'), ('mlp', 'model')), got {rules!r:.60}"
        )


def lora_shardings(
    frozen: Params,
    config: LoraConfig,
    shardings: Any = None,
    *,
    rank_axis: AxisEntry = None,
    mesh: Mesh | None = None,
    rules: Any = None,
) -> LoraTree:
    """Shardings for the adapter Θ, derived from the frozen base's shardings.

    Args:
        frozen: the base params or their ``ShapeDtypeStruct`` s; when ``shardings`` is None they
            carry the shardings themselves (placed arrays, a params tree boxed with Flax
            partitioning metadata: ``nn.Partitioned``, ``nn.LogicallyPartitioned``, or an
            ``nnx.State`` whose variables carry ``nnx.with_partitioning`` metadata; its other
            variables are then replicated).
        config: the LoRA config.
        shardings: a tree mirroring ``frozen`` of ``PartitionSpec`` / ``NamedSharding`` / placed
            arrays / None (replicated), a boxed params tree, or an ``nnx.State`` (with metadata,
            or what ``nnx.get_partition_spec`` returns); None takes them from ``frozen``.
        rank_axis: mesh axes for the rank axis of ``lora_a`` and ``lora_b`` (None: replicated).
        mesh: turns ``PartitionSpec`` results into ``NamedSharding`` on this mesh; leaves given
            as ``NamedSharding`` or placed arrays keep their own mesh.
        rules: Flax logical axis rules (``((logical, mesh axes), ...)``) for logical names.

    Returns:
        A tree with the structure of ``jaxlora.split(frozen, config, key)[1]`` holding a
        ``NamedSharding`` (a mesh is known) or a ``PartitionSpec`` (none is) per leaf.

    Raises:
        ValueError: when a leaf of ``frozen`` has no sharding, a spec is longer than its kernel,
            or ``rank_axis`` clashes with the base spec or does not divide the rank.
        TypeError: when ``shardings`` holds something that is not a sharding.

    Example:
        >>> import jax.numpy as jnp, jaxlora
        >>> from jax.sharding import PartitionSpec as P
        >>> frozen = {"up": {"kernel": jnp.zeros((8, 32)), "bias": jnp.zeros(32)}}
        >>> specs = {"up": {"kernel": P("fsdp", "model"), "bias": P("model")}}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["up"], bias="all")
        >>> lora_shardings(frozen, config, specs)
        {'up': {'lora_a': P('fsdp', None), 'lora_b': P(None, 'model'), 'bias': P('model',)}}
    """
    _check_options(frozen, rank_axis, mesh, rules)
    by_keys = _as_specs(frozen if shardings is None else shardings, rules)
    frozen = nn.unbox(frozen)

    def lookup(keys: tuple[Any, ...]) -> tuple[PartitionSpec, Mesh | None]:
        if keys not in by_keys:
            seen = paths.preview(paths.join(map(str, k)) for k in by_keys)
            raise ValueError(
                f"`shardings` has no entry for `{paths.join(map(str, keys))}`; it must mirror "
                f"`frozen` (entries seen: {seen})"
            )
        spec, own_mesh = by_keys[keys]
        return spec, own_mesh if own_mesh is not None else mesh

    targets = find_targets(frozen, config, argument="frozen", caller="lora_shardings")
    out: LoraTree = {}
    for target in targets:
        spec, where = lookup(target.keys + (target.leaf,))
        _check_rank_divides(target, rank_axis, where)
        a, b = factor_specs(target, spec, rank_axis)
        paths.set_in(out, target.keys + (LORA_A,), _place(a, where))
        paths.set_in(out, target.keys + (LORA_B,), _place(b, where))
    for keys, _ in find_trainable_leaves(frozen, config, targets):
        paths.set_in(out, keys, _place(*lookup(keys)))
    return out
