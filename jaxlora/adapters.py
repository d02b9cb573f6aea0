"""Many adapters on one frozen base: keep them by name, switch, disable, combine, sweep.

Switching merges the chosen adapter into the *base* each time (never unmerges one from another),
so every switch is exact, and disabling returns the base params themselves.

Weighted combinations have exact semantics: the result's update is ``Σ_i w_i·ΔW_i`` with
``ΔW_i = s_i·A_i·B_i``. ``"cat"`` concatenates the factors along the rank axis (rank ``Σ r_i``),
which is exact. ``"svd"`` forms the summed dense update and keeps its best rank-``k``
approximation. A naive "linear" mix, ``A = Σ w_i A_i`` and ``B = Σ w_i B_i``, is *not* the weighted
sum of updates: its product has cross terms ``w_i w_j A_i B_j`` (PEFT's ``"linear"`` combination
has this pitfall), so it is not offered.

Training several adapters at once: :func:`stack` puts same-shaped adapters (a seed or learning-rate
sweep) on a leading axis for ``jax.vmap``; :func:`pad_rank` makes adapters of different ranks the
same shape, exactly (zero columns stay zero; a per-member multiplier keeps each member's scale).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import paths
from jaxlora.checkpoint import check_fits, expected_adapter
from jaxlora.config import LoraConfig
from jaxlora.core import delta, merge
from jaxlora.targets import Target, find_targets
from jaxlora.types import LORA_A, LORA_B, LoraTree, Params

METHODS = ("cat", "svd")


def _by_path(tree: Any) -> dict[str, Any]:
    return {paths.join(names): leaf for _, names, leaf in paths.flatten(tree)}


class AdapterBank:
    """Named adapters on one frozen base.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.adapters import AdapterBank
        >>> base = {"dense": {"kernel": jnp.ones((4, 4))}}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["dense"], init_lora_weights=False)
        >>> bank = AdapterBank(base)
        >>> for name, seed in [("fr", 0), ("de", 1)]:
        ...     bank.add(name, jaxlora.split(base, config, jax.random.key(seed))[1], config)
        >>> bank.names
        ['fr', 'de']
        >>> bank.params(None) is base  # disabled: the base itself
        True
        >>> bool((bank.params("fr")["dense"]["kernel"] != 1).any())
        True
    """

    def __init__(self, base: Params):
        self.base = base
        self._adapters: dict[str, tuple[LoraTree, LoraConfig]] = {}

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def add(self, name: str, lora: LoraTree, config: LoraConfig) -> None:
        """Keeps ``lora`` under ``name`` (replacing any adapter of that name).

        Raises:
            ValueError: when Θ does not fit the base (naming each path and both shapes).
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"`name` must be a non-empty string, got {name!r}")
        where = f"the adapter {name!r}"
        check_fits(_by_path(lora), _by_path(expected_adapter(self.base, config)), where)
        self._adapters[name] = (lora, config)

    def remove(self, name: str) -> None:
        self.get(name)
        del self._adapters[name]

    def get(self, name: str) -> tuple[LoraTree, LoraConfig]:
        """``(lora, config)`` of the adapter ``name``.

        Raises:
            KeyError: naming the adapters there are.
        """
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r}; adapters: {self.names}")
        return self._adapters[name]

    def params(self, name: str | None) -> Params:
        """The params to run with adapter ``name`` merged in; ``None`` disables every adapter
        and returns the base itself, so outputs are exactly the base model's."""
        if name is None:
            return self.base
        lora, config = self.get(name)
        return merge(self.base, lora, config)

    def combine(
        self, weights: Mapping[str, float], method: str = "cat", rank: int | None = None
    ) -> tuple[LoraTree, LoraConfig]:
        """:func:`combine` of the named adapters."""
        chosen = [(*self.get(name), weight) for name, weight in weights.items()]
        return combine(self.base, chosen, method=method, rank=rank)


def _exact(path: str) -> str:
    """A pattern (for ``rank_pattern`` / ``layouts``) that matches exactly ``path``."""
    return "^" + re.escape(path)


def _combined_config(
    targets: dict[str, Target], ranks: dict[str, int], configs: Sequence[LoraConfig]
) -> LoraConfig:
    """Scale 1 everywhere (``lora_alpha = r`` per module); targets and layouts named exactly."""
    first = configs[0]
    for config in configs[1:]:
        for field in ("bias", "modules_to_save"):
            if getattr(config, field) != getattr(first, field):
                raise ValueError(
                    f"adapters with different `{field}` ({getattr(first, field)!r} vs "
                    f"{getattr(config, field)!r}) cannot be combined"
                )
    r = max(ranks.values())
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules="(?:" + "|".join(re.escape(p) for p in sorted(targets)) + ")",
        bias=first.bias,
        modules_to_save=first.modules_to_save,
        rank_pattern={_exact(p): k for p, k in ranks.items() if k != r},
        alpha_pattern={_exact(p): k for p, k in ranks.items() if k != r},
        layouts={_exact(p): t.layout for p, t in targets.items() if len(t.shape) != 2},
        dtype=first.dtype,
        task_type=first.task_type,
    )


def _svd(update: jax.Array, target: Target, rank: int) -> tuple[jax.Array, jax.Array, int]:
    """Best rank-``rank`` factors of a stacked dense update (Eckart–Young), scale 1."""
    n_stack = target.n_stack
    stack = update.shape[:n_stack]
    a_rest, b_rest = target.a_shape[n_stack:-1], target.b_shape[n_stack + 1 :]
    rows, cols = math.prod(a_rest), math.prod(b_rest)
    k = min(rank, rows, cols)
    u, s, vt = jnp.linalg.svd(update.reshape(stack + (rows, cols)), full_matrices=False)
    a = (u[..., :k] * s[..., None, :k]).reshape(stack + a_rest + (k,))
    b = vt[..., :k, :].reshape(stack + (k,) + b_rest)
    return a, b, k


def combine(
    base: Params,
    adapters: Sequence[tuple[LoraTree, LoraConfig, float]],
    method: str = "cat",
    rank: int | None = None,
) -> tuple[LoraTree, LoraConfig]:
    """One adapter whose update is the weighted sum ``Σ_i w_i·s_i·A_i·B_i`` of several.

    Args:
        base: the frozen base params the adapters belong to.
        adapters: ``(lora, config, weight)`` triples.
        method: ``"cat"``: factors concatenated along the rank axis, rank ``Σ r_i``, exact.
            ``"svd"``: the summed dense update truncated to ``rank`` by SVD (exact when ``rank``
            reaches the update's rank; the best rank-``rank`` approximation otherwise).
        rank: the rank for ``"svd"`` (default ``Σ r_i``), capped per module by its shape.

    Returns:
        ``(lora, config)``; the config has scale 1 (``lora_alpha = r``) and names each module
        and rank exactly. Trainable copies (biases, ``modules_to_save``) combine as
        ``base + Σ w_i (copy_i - base)``.

    Raises:
        ValueError: for an unknown ``method``, no adapters, or adapters with different ``bias``
            or ``modules_to_save``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> base = {"d": {"kernel": jnp.zeros((3, 3))}}
        >>> config = jaxlora.LoraConfig(r=1, target_modules=["d"], init_lora_weights=False)
        >>> one, two = (jaxlora.split(base, config, jax.random.key(k))[1] for k in (0, 1))
        >>> lora, cat = combine(base, [(one, config, 0.5), (two, config, 2.0)])
        >>> cat.r, lora["d"]["lora_a"].shape
        (2, (3, 2))
    """
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {METHODS}, got {method!r} (a 'linear' mix of A and B is "
            "not the weighted sum of the updates, so it is not offered)"
        )
    if not adapters:
        raise ValueError("`adapters` is empty; give at least one (lora, config, weight)")
    targets: dict[str, Target] = {}
    parts: dict[str, list[tuple[jax.Array, jax.Array, float]]] = {}
    for lora, config, weight in adapters:
        for target in find_targets(base, config):
            factors = paths.get_in(lora, target.keys)
            targets.setdefault(target.path, target)
            parts.setdefault(target.path, []).append(
                (factors[LORA_A], factors[LORA_B], weight * target.scale)
            )
    dtype = jnp.dtype(adapters[0][1].dtype)
    out: LoraTree = {}
    ranks = {}
    for path, target in targets.items():
        n = target.n_stack
        if method == "cat":
            a = jnp.concatenate([(w * a.astype(jnp.float32)) for a, _, w in parts[path]], -1)
            b = jnp.concatenate([b.astype(jnp.float32) for _, b, _ in parts[path]], n)
            k = a.shape[-1]
        else:
            update = sum(w * delta(a, b, n) for a, b, w in parts[path])
            total = sum(a.shape[-1] for a, _, _ in parts[path])
            a, b, k = _svd(update, target, total if rank is None else rank)
        ranks[path] = k
        paths.set_in(out, target.keys + (LORA_A,), a.astype(dtype))
        paths.set_in(out, target.keys + (LORA_B,), b.astype(dtype))
    config = _combined_config(targets, ranks, [c for _, c, _ in adapters])
    _combine_copies(base, out, config, adapters)
    return out, config


def _combine_copies(base, out, config, adapters) -> None:
    expected = expected_adapter(base, config)
    leaves = {keys: leaf for keys, _, leaf in paths.flatten(base)}
    for keys, names, _ in paths.flatten(expected):
        if names[-1] in (LORA_A, LORA_B):
            continue
        original = leaves[keys]
        value = original.astype(jnp.float32)
        for lora, _, weight in adapters:
            copy = paths.get_in(lora, keys)
            if copy is not None:
                value = value + weight * (copy.astype(jnp.float32) - original.astype(jnp.float32))
        paths.set_in(out, keys, value.astype(original.dtype))


def stack(adapters: Sequence[LoraTree]) -> LoraTree:
    """Same-shaped adapters on a new leading axis, for ``jax.vmap`` (e.g. a seed sweep).

    Raises:
        ValueError: when the adapters differ in structure or shapes.
    """
    if not adapters:
        raise ValueError("`adapters` is empty")
    first = _by_path(adapters[0])
    for i, lora in enumerate(adapters[1:], 1):
        check_fits(_by_path(lora), first, f"`adapters[{i}]` (vs `adapters[0]`)")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def unstack(stacked: LoraTree) -> list[LoraTree]:
    """The inverse of :func:`stack`."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def pad_rank(
    base: Params, lora: LoraTree, config: LoraConfig, rank: int
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
    padded_scales = {t.path: t.scale for t in find_targets(base, padded_config)}
    for target in find_targets(base, config):
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
        **kwargs: passed unbatched to :func:`jaxlora.apply` (e.g. ``deterministic``).

    Returns:
        The model's outputs for the whole batch, batch on axis 0.

    Raises:
        ValueError: when ``index`` is not one-dimensional or does not match the batch size.
    """
    from jaxlora.apply import apply

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
