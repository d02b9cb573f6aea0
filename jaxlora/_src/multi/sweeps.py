"""Training several adapters at once: seed and learning-rate sweeps, mixed ranks, mixed batches.

:func:`stack` puts same-shaped adapters (a seed or learning-rate sweep) on a leading axis for
``jax.vmap``; :func:`pad_rank` makes adapters of different ranks the same shape, exactly (zero
columns stay zero; a per-member multiplier, applied by :func:`scale_b`, keeps each member's scale).
:func:`apply_mixed` serves a batch whose examples each use their own adapter of a stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import find_targets
from jaxlora._src.tree.fit import check_fits
from jaxlora._src.types import LORA_A, LORA_B, LoraTree, Params


def stack(adapters: Sequence[LoraTree]) -> LoraTree:
    """Same-shaped adapters on a new leading axis, for ``jax.vmap`` (e.g. a seed sweep).

    Raises:
        ValueError: when the adapters differ in structure or shapes.

    Example:
        >>> import jax.numpy as jnp
        >>> members = [{"d": {"lora_a": jnp.full((3, 2), float(i))}} for i in range(4)]
        >>> stacked = stack(members)
        >>> stacked["d"]["lora_a"].shape, len(unstack(stacked))
        ((4, 3, 2), 4)
    """
    if not adapters:
        raise ValueError("`adapters` is empty")
    first = paths.by_path(adapters[0])
    for i, lora in enumerate(adapters[1:], 1):
        check_fits(paths.by_path(lora), first, f"`adapters[{i}]` (vs `adapters[0]`)")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def unstack(stacked: LoraTree) -> list[LoraTree]:
    """The inverse of :func:`stack`.

    Raises:
        ValueError: when ``stacked`` has no leaves or its leaves differ in the leading axis.
    """
    leaves = paths.by_path(stacked)
    if not leaves:
        raise ValueError(
            f"`stacked` has no array leaves (got {stacked!r:.60}); pass the adapter that "
            "`jaxlora.adapters.stack` returned"
        )
    sizes = {p: (tuple(x.shape)[:1] or (None,))[0] for p, x in leaves.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(
            "`stacked` leaves must share one leading (member) axis, as `stack` makes them; got "
            + ", ".join(f"`{p}` {tuple(leaves[p].shape)}" for p in list(sizes)[:6])
        )
    n = next(iter(sizes.values()))
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def pad_rank(
    frozen: Params, lora: LoraTree, config: LoraConfig, rank: int
) -> tuple[LoraTree, LoraTree, LoraConfig]:
    """Θ zero-padded to ``rank`` everywhere, with the multipliers that keep its own scale.

    Padded columns of A and rows of B get zero gradient (each is multiplied by the other), so
    they stay zero under any optimizer whose update of a zero gradient is zero (SGD, Adam, AdamW).
    Train with ``merge(frozen, scale_b(padded, multiplier), padded_config)``: the update is then
    exactly the original member's, so adapters of several ranks train in one vmapped step.

    Returns:
        ``(padded, multiplier, padded_config)``: ``multiplier`` holds one scalar per adapted module
        (``s_member / s_padded``) in Θ's nesting, under ``lora_b``.

    Raises:
        ValueError: when ``rank`` is below a module's rank.
    """
    padded_config = LoraConfig(
        **{**config.to_dict(), "r": rank, "rank_pattern": {}, "alpha_pattern": {}}
    )
    out = jax.tree.map(lambda x: x, lora)
    multiplier: LoraTree = {}
    padded_scales = {t.path: t.scale for t in find_targets(frozen, padded_config)}
    for target in find_targets(frozen, config):
        if target.rank > rank:
            raise ValueError(
                f"`rank`={rank} is below the rank {target.rank} of `{target.path}`; pad to at "
                "least the largest rank in the sweep"
            )
        a, b = (paths.get_in(lora, target.keys + (leaf,)) for leaf in (LORA_A, LORA_B))
        extra = rank - target.rank
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])
        b = jnp.pad(b, [(0, 0)] * target.n_stack + [(0, extra)] + [(0, 0)] * target.n_out)
        paths.set_in(out, target.keys + (LORA_A,), a)
        paths.set_in(out, target.keys + (LORA_B,), b)
        ratio = target.scale / padded_scales[target.path]
        paths.set_in(multiplier, target.keys + (LORA_B,), jnp.asarray(ratio, b.dtype))
    return out, multiplier, padded_config


def scale_b(lora: LoraTree, multiplier: LoraTree) -> LoraTree:
    """Θ with each ``lora_b`` multiplied by its entry of ``multiplier`` (see :func:`pad_rank`)."""
    out = jax.tree.map(lambda x: x, lora)
    for keys, _, factor in paths.flatten(multiplier):
        paths.set_in(out, keys, paths.get_in(lora, keys) * factor)
    return out


def apply_mixed(
    model: Any,
    frozen: Params,
    stacked: LoraTree,
    config: LoraConfig,
    index: jax.Array,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """A mixed batch: example ``i`` runs with adapter ``index[i]`` of ``stacked``, in one call.

    Each example gathers its own factors and runs the factored forward of
    :func:`jaxlora.apply`, vmapped over the batch, so the base weights are read once for the
    whole batch and only the small factors differ per example. Jit it as a whole; put a fresh
    adapter (B = 0) in the stack for rows that should see the base model.

    Args:
        model: a linen module (see :func:`jaxlora.apply`).
        frozen: the base params.
        stacked: adapters of one structure, stacked by :func:`stack` (leading axis: adapter).
        config: a config that fits every stacked adapter (shapes and scales).
        index: int array ``(batch,)``: which adapter each example uses.
        *args: the model's inputs, each with the batch on axis 0.
        **kwargs: passed unbatched to :func:`jaxlora.apply` (e.g. ``lora_deterministic``).

    Returns:
        The model's outputs for the whole batch, batch on axis 0.

    Raises:
        ValueError: when ``index`` is not one-dimensional or does not match the batch size.
    """
    from jaxlora._src.forward.apply import apply

    index = jnp.asarray(index)
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(args)}
    if index.ndim != 1 or sizes != {index.shape[0]}:
        raise ValueError(
            f"`index` must be one adapter index per example, shape (batch,); got shape "
            f"{tuple(index.shape)} for inputs with leading sizes {sorted(sizes)}"
        )

    def one(lora, *example):
        example = jax.tree.map(lambda x: x[None], example)
        out = apply(model, frozen, lora, config, *example, **kwargs)
        return jax.tree.map(lambda y: y[0], out)

    per_example = jax.tree.map(lambda leaf: jnp.take(leaf, index, axis=0), stacked)
    return jax.vmap(one)(per_example, *args)
