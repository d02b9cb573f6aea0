"""Training several adapters at once: seed and learning-rate sweeps, mixed ranks, mixed batches.

:func:`stack` puts same-shaped adapters (a seed or learning-rate sweep) on a leading axis for
``jax.vmap``; :func:`pad_rank` makes adapters of different ranks the same shape, exactly (zero
columns stay zero; a per-member multiplier, applied by :func:`scale_b`, keeps each member's scale).
:func:`apply_mixed` serves a batch whose examples each use their own adapter of a stack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.core
import jax.numpy as jnp

from jaxlora._src import paths, validate
from jaxlora._src.config.lora_config import LoraConfig, require_config
from jaxlora._src.config.targets import find_targets
from jaxlora._src.tree.checks import check_lora_tree
from jaxlora._src.tree.fit import check_fits, describe, expected_adapter
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
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence):
        raise TypeError(
            "`adapters` must be a list of adapters (each a nested dict of arrays), got "
            f"{type(adapters).__name__}; to stack one adapter, pass `[lora]`"
        )
    if not adapters:
        raise ValueError("`adapters` is empty; give at least one adapter")
    for i, lora in enumerate(adapters):
        check_lora_tree(lora, "stack", f"adapters[{i}]")
    first = paths.by_path(adapters[0])
    for i, lora in enumerate(adapters[1:], 1):
        _check_same(paths.by_path(lora), first, i)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def _check_same(other: Mapping[str, Any], first: Mapping[str, Any], i: int) -> None:
    """A ValueError listing each leaf where ``adapters[i]`` and ``adapters[0]`` differ."""
    problems = []
    for path in sorted(set(other) | set(first)):
        if path not in other:
            problems.append(f"`{path}` missing (in `adapters[0]`: {describe(first[path])})")
        elif path not in first:
            problems.append(f"`{path}` not in `adapters[0]` ({describe(other[path])})")
        elif describe(other[path]) != describe(first[path]):
            problems.append(f"`{path}` {describe(other[path])} vs {describe(first[path])}")
    if problems:
        raise ValueError(
            f"`adapters[{i}]` differs from `adapters[0]` in structure, shape or dtype: "
            + "; ".join(problems[:12])
            + ". `stack` needs same-shaped adapters of one model (use `pad_rank` for mixed ranks)"
        )


def unstack(stacked: LoraTree) -> list[LoraTree]:
    """The inverse of :func:`stack`.

    Raises:
        ValueError: when ``stacked`` has no leaves or its leaves differ in the leading axis.
    """
    check_lora_tree(stacked, "unstack", "stacked")
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
    n = cast(int, next(iter(sizes.values())))  # not None: checked above
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
    validate.pytree("frozen", frozen)
    require_config(config, "pad_rank")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"`rank` must be a positive int (the rank to pad to), got {rank!r}")
    if rank <= 0:
        raise ValueError(f"`rank` must be a positive int (the rank to pad to), got {rank}")
    check_lora_tree(lora, "pad_rank")
    check_fits(paths.by_path(lora), paths.by_path(expected_adapter(frozen, config)), "`lora`")
    padded_config = LoraConfig(
        **{**config.to_dict(), "r": rank, "rank_pattern": {}, "alpha_pattern": {}}
    )
    out = jax.tree.map(lambda x: x, lora)
    multiplier: LoraTree = {}
    padded_scales = {t.path: t.scale for t in find_targets(frozen, padded_config)}
    for target in find_targets(frozen, config, argument="frozen", caller="pad_rank"):
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
    """Θ with each ``lora_b`` multiplied by its entry of ``multiplier`` (see :func:`pad_rank`).

    Raises:
        TypeError: when ``lora`` or ``multiplier`` is not a nested dict, or a factor is no number.
        ValueError: when ``multiplier`` names a ``lora_b`` that ``lora`` lacks.
    """
    check_lora_tree(lora, "scale_b")
    if not isinstance(multiplier, Mapping):
        raise TypeError(
            "`multiplier` must be the nested dict of per-module factors that `pad_rank` "
            f"returns, got {type(multiplier).__name__}"
        )
    for keys, names, factor in paths.flatten(multiplier):
        where = paths.join(names)
        if names[-1] != LORA_B or paths.get_in(lora, keys) is None:
            raise ValueError(
                f"`multiplier` has `{where}`, which is no `lora_b` of `lora`; pass the "
                "multiplier `pad_rank` returned for this adapter"
            )
        if isinstance(factor, str) or not jnp.issubdtype(jnp.result_type(factor), jnp.number):
            raise TypeError(f"`multiplier` leaf `{where}` must be a number, got {factor!r:.40}")
    out = jax.tree.map(lambda x: x, lora)
    for keys, _, factor in paths.flatten(multiplier):
        paths.set_in(out, keys, paths.get_in(lora, keys) * factor)
    return out


def _stack_size(stacked: LoraTree) -> int:
    """The number of adapters in ``stacked``: the leading size every leaf shares."""
    leaves = jax.tree.leaves(stacked)
    sizes = {int(jnp.shape(x)[0]) for x in leaves if jnp.ndim(x)}
    scalars = sum(not jnp.ndim(x) for x in leaves)
    if len(sizes) != 1 or scalars:
        raise ValueError(
            "`stacked` must be adapters stacked on a leading axis (`jaxlora.adapters.stack`), "
            f"every leaf with the same leading size; got leading sizes {sorted(sizes)}"
            + (f" and {scalars} scalar leaves" if scalars else "")
        )
    return sizes.pop()


def _check_index(index: Any) -> jax.Array:
    """``index`` as an int array."""
    try:
        kind = None if index is None else jnp.result_type(index)
    except TypeError:  # a str, an object: no array dtype at all
        kind = type(index).__name__
    if kind is None or isinstance(kind, str) or not jnp.issubdtype(kind, jnp.integer):
        raise TypeError(f"`index` must be an int array (one adapter index per example), got {kind}")
    return jnp.asarray(index)


def _check_range(index: jax.Array, n: int) -> None:
    """A concrete ``index`` must lie in ``[0, n)``; a traced one cannot be read (see
    :func:`_gather`)."""
    if isinstance(index, jax.core.Tracer) or not index.size:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= n:
        bad = int(jnp.argmax((index < 0) | (index >= n)))
        raise ValueError(
            f"`index` must lie in [0, {n}) for a stack of {n} adapters, got values from {low} "
            f"to {high} (first out of range: `index[{bad}]` = {int(index[bad])}); negative "
            "indices are not supported"
        )


def _gather(stacked: LoraTree, index: jax.Array, n: int) -> LoraTree:
    """Each example's factors. An index outside ``[0, n)`` (only possible under ``jit``, where it
    cannot be checked) gathers NaN factors, negative indices included: never another adapter."""
    outside = jnp.where((index >= 0) & (index < n), index, n)  # n: out of range, never wrapped

    def take(leaf):
        fill = jnp.nan if jnp.issubdtype(leaf.dtype, jnp.inexact) else None
        return jnp.take(leaf, outside, axis=0, mode="fill", fill_value=fill)

    return jax.tree.map(take, stacked)


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
        model: a linen module, or an NNX module or graphdef (see :func:`jaxlora.apply`).
        frozen: the base params (a linen ``params`` dict or an ``nnx.State``).
        stacked: adapters of one structure, stacked by :func:`stack` (leading axis: adapter).
        config: a config that fits every stacked adapter (shapes and scales).
        index: int array ``(batch,)``: which adapter each example uses.
        *args: the model's inputs, each with the batch on axis 0.
        **kwargs: passed unbatched to :func:`jaxlora.apply` (e.g. ``lora_deterministic``).

    Returns:
        The model's outputs for the whole batch, batch on axis 0.

    Out-of-range indices: a concrete ``index`` (outside ``jax.jit``) outside ``[0, number of
    adapters)`` is a ValueError naming the first bad entry. Under ``jax.jit`` the index is
    traced and cannot be checked; there an index outside the range, negative ones included
    (never read from the end), gives that example NaN factors, so its output row is NaN; the
    other rows are unaffected. Check indices before jitting, or test ``jnp.isnan`` on the rows.

    Raises:
        ValueError: when ``index`` is not one-dimensional, does not match the batch size, or
            (concrete) lies outside the stack; when ``stacked``'s leaves do not share one
            leading size.
        TypeError: when ``index`` is not an int array.
    """
    from jaxlora._src.forward.apply import apply

    validate.tree("frozen", frozen)
    check_lora_tree(stacked, "apply_mixed", "stacked")
    require_config(config, "apply_mixed")
    index = _check_index(index)
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(args)}
    if index.ndim != 1 or sizes != {index.shape[0]}:
        raise ValueError(
            f"`index` must be one adapter index per example, shape (batch,); got shape "
            f"{tuple(index.shape)} for inputs with leading sizes {sorted(sizes)}"
        )
    n = _stack_size(stacked)
    _check_range(index, n)

    def one(lora, *example):
        example = jax.tree.map(lambda x: x[None], example)
        out = apply(model, frozen, lora, config, *example, **kwargs)
        return jax.tree.map(lambda y: y[0], out)

    return jax.vmap(one)(_gather(stacked, index, n), *args)
