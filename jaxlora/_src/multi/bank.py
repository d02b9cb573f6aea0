"""Many adapters on one frozen base: keep them by name, switch, disable, add them weighted.

Switching merges the chosen adapter into the *base* each time (never unmerges one from another),
so every switch is exact, and disabling returns the base params themselves.

Weighted combinations have exact semantics: the result's update is ``Σ_i w_i·ΔW_i`` with
``ΔW_i = s_i·A_i·B_i``. ``"cat"`` concatenates the factors along the rank axis (rank ``Σ r_i``),
which is exact. ``"svd"`` forms the summed dense update and keeps its best rank-``k``
approximation. A naive "linear" mix, ``A = Σ w_i A_i`` and ``B = Σ w_i B_i``, is *not* the weighted
sum of updates: its product has cross terms ``w_i w_j A_i B_j`` (PEFT's ``"linear"`` combination
has this pitfall), so it is not offered.

Training several adapters at once (:func:`stack`, :func:`pad_rank`, :func:`apply_mixed`) is
in ``sweeps``; :mod:`jaxlora.adapters` exports both.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.core
import jax.numpy as jnp

from jaxlora._src import paths, validate
from jaxlora._src.config.lora_config import LoraConfig, require_config
from jaxlora._src.config.targets import Target, find_targets
from jaxlora._src.tree.checks import check_lora_tree, require_tree
from jaxlora._src.tree.core import delta, merge
from jaxlora._src.tree.fit import check_fits, expected_adapter
from jaxlora._src.types import LORA_A, LORA_B, LoraTree, Params

METHODS = ("cat", "svd")


class AdapterBank:
    """Named adapters on one frozen base.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> frozen = {"dense": {"kernel": jnp.ones((4, 4))}}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["dense"], init_lora_weights=False)
        >>> bank = jaxlora.AdapterBank(frozen)
        >>> for name, seed in [("fr", 0), ("de", 1)]:
        ...     bank.add(name, jaxlora.split(frozen, config, jax.random.key(seed))[1], config)
        >>> bank.names
        ['fr', 'de']
        >>> bank.params(None) is frozen  # disabled: the base itself
        True
        >>> bool((bank.params("fr")["dense"]["kernel"] != 1).any())
        True
    """

    def __init__(self, frozen: Params):
        require_tree(frozen=frozen)
        self.frozen = frozen
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
        check_lora_tree(lora, "AdapterBank.add")
        require_config(config, "AdapterBank.add")
        where = f"the adapter {name!r}"
        expected = expected_adapter(self.frozen, config, caller="AdapterBank.add")
        check_fits(paths.by_path(lora), paths.by_path(expected), where)
        self._adapters[name] = (lora, config)

    def remove(self, name: str) -> None:
        self.get(name)
        del self._adapters[name]

    def get(self, name: str) -> tuple[LoraTree, LoraConfig]:
        """``(lora, config)`` of the adapter ``name``.

        Raises:
            KeyError: naming the adapters there are.
        """
        validate.string("name", name)
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r}; adapters: {self.names}")
        return self._adapters[name]

    def params(self, name: str | None) -> Params:
        """The params to run with adapter ``name`` merged in; ``None`` disables every adapter
        and returns the base itself, so outputs are exactly the base model's."""
        if name is None:
            return self.frozen
        lora, config = self.get(name)
        return merge(self.frozen, lora, config)

    def add_weighted(
        self, weights: Mapping[str, float], method: str = "cat", rank: int | None = None
    ) -> tuple[LoraTree, LoraConfig]:
        """:func:`add_weighted` of the named adapters, ``{name: weight}``."""
        if not isinstance(weights, Mapping):
            raise TypeError(
                "`weights` must be a dict {adapter name: weight}, got "
                f"{type(weights).__name__}; e.g. `bank.add_weighted({{'fr': 0.5, 'de': 0.5}})`"
            )
        if not weights:
            raise ValueError(
                f"`weights` is empty; name at least one adapter of the bank ({self.names})"
            )
        chosen = [(*self.get(name), weight) for name, weight in weights.items()]
        return add_weighted(self.frozen, chosen, method=method, rank=rank)


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


def add_weighted(
    frozen: Params,
    adapters: Sequence[tuple[LoraTree, LoraConfig, float]],
    method: str = "cat",
    rank: int | None = None,
) -> tuple[LoraTree, LoraConfig]:
    """One adapter whose update is the weighted sum ``Σ_i w_i·s_i·A_i·B_i`` of several.

    Args:
        frozen: the base params the adapters belong to.
        adapters: ``(lora, config, weight)`` triples.
        method: ``"cat"``: factors concatenated along the rank axis, rank ``Σ r_i``, exact.
            ``"svd"``: the summed dense update truncated to ``rank`` by SVD (exact when ``rank``
            reaches the update's rank; the best rank-``rank`` approximation otherwise).
        rank: the rank for ``"svd"`` (default ``Σ r_i``), capped per module by its shape.

    Returns:
        ``(lora, config)``; the config has scale 1 (``lora_alpha = r``) and names each module
        and rank exactly. Trainable copies (biases, ``modules_to_save``) combine as
        ``frozen + Σ w_i (copy_i - frozen)``.

    Raises:
        ValueError: for an unknown ``method``, no adapters, or adapters with different ``bias``
            or ``modules_to_save``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> frozen = {"d": {"kernel": jnp.zeros((3, 3))}}
        >>> config = jaxlora.LoraConfig(r=1, target_modules=["d"], init_lora_weights=False)
        >>> one, two = (jaxlora.split(frozen, config, jax.random.key(k))[1] for k in (0, 1))
        >>> lora, cat = add_weighted(frozen, [(one, config, 0.5), (two, config, 2.0)])
        >>> cat.r, lora["d"]["lora_a"].shape
        (2, (3, 2))
    """
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {METHODS}, got {method!r} (a 'linear' mix of A and B is "
            "not the weighted sum of the updates, so it is not offered)"
        )
    if isinstance(adapters, Sequence) and not isinstance(adapters, str) and not adapters:
        raise ValueError("`adapters` is empty; give at least one (lora, config, weight)")
    validate.sequence("adapters", adapters)
    require_tree(frozen=frozen)
    _check_rank(method, rank)
    targets: dict[str, Target] = {}
    parts: dict[str, list[tuple[jax.Array, jax.Array, float]]] = {}
    for i, item in enumerate(adapters):
        if not (isinstance(item, tuple | list) and len(item) == 3):
            raise TypeError(
                f"`adapters[{i}]` must be a (lora, config, weight) triple, got {item!r:.80}"
            )
        lora, config, weight = item
        require_config(config, "add_weighted")
        _check_weight(weight, i)
        check_lora_tree(lora, "add_weighted", f"adapters[{i}]")
        expected = paths.by_path(expected_adapter(frozen, config))
        check_fits(paths.by_path(lora), expected, f"`adapters[{i}]`")
        for target in find_targets(frozen, config, argument="frozen", caller="add_weighted"):
            factors = paths.get_in(lora, target.keys)
            if not isinstance(factors, Mapping) or not {LORA_A, LORA_B} <= set(factors):
                raise ValueError(
                    f"`adapters[{i}]` has no `lora_a` / `lora_b` at `{target.path}`, which its "
                    "config targets; give each adapter with the config it was made with"
                )
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
            # cast: parts[path] is never empty, so the sum is an array, not the start value 0.
            update = cast(jax.Array, sum(w * delta(a, b, n) for a, b, w in parts[path]))
            total = sum(a.shape[-1] for a, _, _ in parts[path])
            a, b, k = _svd(update, target, total if rank is None else rank)
        ranks[path] = k
        paths.set_in(out, target.keys + (LORA_A,), a.astype(dtype))
        paths.set_in(out, target.keys + (LORA_B,), b.astype(dtype))
    config = _combined_config(targets, ranks, [c for _, c, _ in adapters])
    _combine_copies(frozen, out, config, adapters)
    return out, config


def _check_rank(method: str, rank: Any) -> None:
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"`rank` must be a positive int or None, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"`rank` must be a positive int (the rank to keep), got {rank}")
    if method != "svd":
        raise ValueError(
            f"`rank`={rank} is only used by method='svd' (method={method!r} keeps every rank, "
            "Σ r_i); pass method='svd' or drop `rank`"
        )


def _check_weight(weight: Any, i: int) -> None:
    """A TypeError / ValueError unless ``weight`` is a finite real number (or a scalar array)."""
    if isinstance(weight, jax.core.Tracer):
        return
    scalar = getattr(weight, "shape", None) == () and jnp.issubdtype(
        getattr(weight, "dtype", None) or jnp.float32, jnp.number
    )
    if not scalar and (isinstance(weight, bool) or not isinstance(weight, numbers.Real)):
        raise TypeError(f"the weight of `adapters[{i}]` must be a real number, got {weight!r:.40}")
    if not math.isfinite(float(weight)):
        raise ValueError(f"the weight of `adapters[{i}]` must be finite, got {float(weight)}")


def _combine_copies(frozen, out, config, adapters) -> None:
    expected = expected_adapter(frozen, config)
    leaves = {keys: leaf for keys, _, leaf in paths.flatten(frozen)}
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
