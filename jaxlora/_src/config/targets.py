"""Which leaves of a params tree a ``LoraConfig`` adapts, and how each kernel's axes split.

A kernel's axes are described by a *layout* string, one letter per axis in order: ``s`` a stacked
layer axis (``nn.scan`` / ``nn.vmap``), ``w`` a convolution window axis, ``i`` a contracted input
axis, ``o`` an output axis. A 2-D Dense kernel is ``"io"``; linen attention's query kernel
(embed, heads, head_dim) is ``"ioo"`` and its out kernel (heads, head_dim, embed) ``"iio"``; a
Gemma-style query einsum kernel (heads, embed, head_dim) ``"oio"``; a scanned Dense kernel is
``"sio"``; a Conv2D kernel ``"wwio"``. Stacked axes lead; the others come in any order
(:mod:`jaxlora._src.config.axes_order`). 2-D kernels and embedding tables need no layout; any other
kernel takes one from ``LoraConfig.layouts`` (see :func:`jaxlora.infer_layouts`, which reads them
off a linen or NNX module).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import jax

from jaxlora._src import paths, validate
from jaxlora._src.config import axes_order, conventions, peft_rules, target_checks
from jaxlora._src.config.conventions import EMBEDDING as EMBEDDING
from jaxlora._src.config.conventions import KERNEL as KERNEL
from jaxlora._src.config.conventions import WEIGHT as WEIGHT
from jaxlora._src.config.conventions import WEIGHT_LEAVES as WEIGHT_LEAVES
from jaxlora._src.config.lora_config import LoraConfig, require_config
from jaxlora._src.types import Params

BIAS = "bias"
#: What to pass when a tree holds no weight at all (a model object, or its variables by mistake).
PARAMS_HINT = "pass the model's `params` collection (variables['params'])"


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel: where it is, how its axes split, and its rank and scale.

    ``shape`` is the kernel's own, in its order (``layout``); ``a`` has shape
    ``stack + window + input + (rank,)`` and ``b`` ``stack + (rank,) + output``, the axes of each
    group in their kernel order, whatever the order of the groups in the kernel
    (``canonical_shape``: the kernel transposed by ``perm`` to that order).
    """

    keys: tuple[Any, ...]
    path: str
    leaf: str
    shape: tuple[int, ...]
    dtype: Any
    layout: str
    rank: int
    alpha: float
    scale: float
    #: An embedding table under another leaf name (an ``eqx.nn.Embedding``'s ``weight``).
    embed: bool = False

    @property
    def kind(self) -> str:
        """``"embed"``, ``"conv"`` or ``"dense"``."""
        if self.leaf == EMBEDDING or self.embed:
            return "embed"
        return "conv" if "w" in self.layout else "dense"

    @property
    def n_stack(self) -> int:
        return self.layout.count("s")

    @property
    def n_out(self) -> int:
        return self.layout.count("o")

    @property
    def perm(self) -> tuple[int, ...]:
        """The kernel axes in the factors' order: stack, window, input, output."""
        return axes_order.canonical_perm(self.layout)

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        """The kernel's shape in the factors' order (``shape`` when the layout is canonical)."""
        return axes_order.canonical_shape(self.shape, self.layout)

    @property
    def fan_in(self) -> int:
        shape = self.canonical_shape
        return math.prod(shape[self.n_stack : len(shape) - self.n_out])

    @property
    def a_shape(self) -> tuple[int, ...]:
        shape = self.canonical_shape
        return shape[: len(shape) - self.n_out] + (self.rank,)

    @property
    def b_shape(self) -> tuple[int, ...]:
        shape = self.canonical_shape
        return shape[: self.n_stack] + (self.rank,) + shape[len(shape) - self.n_out :]


@dataclasses.dataclass(frozen=True)
class _Candidate:
    keys: tuple[Any, ...]
    path: str
    leaf: str
    shape: tuple[int, ...]
    dtype: Any
    embed: bool = False


def _candidates(params: Params) -> list[_Candidate]:
    """Every weight leaf of 2 or more axes: Flax's ``kernel`` / ``embedding``, Equinox's (and
    PyTorch-style trees') ``weight`` (:mod:`jaxlora._src.config.conventions`)."""
    embeds, norms = conventions.embedding_paths(params), conventions.norm_paths(params)
    found = []
    for keys, names, leaf in paths.flatten(params):
        shape = getattr(leaf, "shape", None)
        if names and names[-1] in WEIGHT_LEAVES and shape is not None and len(shape) >= 2:
            path = paths.join(names[:-1])
            if path in norms:
                continue
            found.append(
                _Candidate(keys[:-1], path, names[-1], tuple(shape), leaf.dtype, path in embeds)
            )
    return found


def module_paths(params: Params) -> list[str]:
    """Every module path of ``params`` that holds a kernel or embedding LoRA could adapt."""
    validate.pytree("params", params)
    return [c.path for c in _candidates(params)]


def _layout(config: LoraConfig, cand: _Candidate) -> str | None:
    found = paths.first_match(config.layouts, cand.path)
    if found is not None:
        layout = found[1]
        if len(layout) != len(cand.shape):
            raise ValueError(
                f"`layouts[{found[0]!r}]`={layout!r} has {len(layout)} axes but the {cand.leaf} at "
                f"`{cand.path}` has shape {cand.shape}; give one letter per axis"
            )
        if (cand.leaf == EMBEDDING or cand.embed) and layout.strip("s") != "io":
            raise ValueError(
                f"`layouts[{found[0]!r}]`={layout!r} does not fit the embedding table at "
                f"`{cand.path}`: an embedding takes 'io' with optional leading 's' axes"
            )
        return layout
    if len(cand.shape) == 2 and cand.leaf != WEIGHT:
        return "io"
    return None


def _as_flax(cand: _Candidate, layout: str | None) -> tuple[str, str, tuple[int, ...], str | None]:
    """``(path, leaf, shape, layout)`` as Flax would name and order it, for PEFT's rules: an
    Equinox ``weight`` is a ``kernel`` or an ``embedding``, its axes in canonical order."""
    leaf = EMBEDDING if cand.embed else KERNEL if cand.leaf == WEIGHT else cand.leaf
    if layout is None:
        return cand.path, leaf, cand.shape, None
    shape = axes_order.canonical_shape(cand.shape, layout)
    return cand.path, leaf, shape, axes_order.canonical_layout(layout)


def _select(config: LoraConfig, cands: list[_Candidate]) -> list[_Candidate]:
    """PEFT's choice (:func:`peft_rules.select`); layouts are read only for ``"all-linear"``,
    which also skips integer and bool kernels (an explicit choice of one is an error)."""
    every = config.target_modules == peft_rules.ALL_LINEAR
    if every:
        cands = [c for c in cands if target_checks.is_float_kernel(c.dtype)]
    kernels = [_as_flax(c, _layout(config, c) if every else None) for c in cands]
    chosen = peft_rules.select(config, kernels)
    out = [c for c, keep in zip(cands, chosen, strict=True) if keep]
    target_checks.check_float_targets(out)
    return out


def _check_patterns(field: str, patterns: Any, where: list[str], what: str) -> None:
    for pattern in patterns:
        if not any(paths.matches_name(pattern, p) for p in where):
            raise ValueError(
                f"`{field}` key {pattern!r} matches no {what}; {what}s: {paths.preview(where)}"
            )


def find_targets(
    params: Params, config: LoraConfig, *, argument: str = "params", caller: str | None = None
) -> list[Target]:
    """The kernels of ``params`` that ``config`` adapts, in the tree's flattening order.

    Args:
        params: a params pytree (linen ``params`` dict, ``nnx.State``, nested dicts, an Equinox
            module or its ``eqx.partition`` arrays, dataclasses, lists, tuples); its leaves may be
            arrays or ``jax.ShapeDtypeStruct``. Module paths come from the tree's own keys
            (dict keys, attribute names, sequence indices): ``layers/0/q_proj``.
        config: the LoRA config.
        argument: the caller's name for ``params``, used in error messages (e.g. ``"frozen"``).
        caller: the public function that called, named in error messages (default: this one).

    Returns:
        One :class:`Target` per adapted kernel.

    Raises:
        ValueError: when nothing matches (the message lists the modules that exist), when a
            pattern of ``rank_pattern`` / ``alpha_pattern`` / ``layouts`` / ``exclude_modules``
            matches nothing, or when an N-D kernel's axes are ambiguous and no layout is given.

    Example:
        >>> import jax.numpy as jnp, jaxlora
        >>> params = {"attn": {"query": {"kernel": jnp.zeros((16, 16))}}}
        >>> [t.path for t in find_targets(params, jaxlora.LoraConfig(target_modules=["query"]))]
        ['attn/query']
    """
    validate.string("argument", argument)
    if caller is not None:
        validate.string("caller", caller)
    where = f"`{argument}` (in `{caller or 'find_targets'}`)"
    require_config(config, caller or "find_targets")
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(params)):
        raise TypeError(
            f"{where} must be the model's params, a pytree of arrays (a nested dict or nnx.State, "
            f"an Equinox module, a dataclass, list or tuple), got {type(params).__name__}; pass "
            "the model's `params` collection (variables['params']) or the Equinox model"
        )
    config = conventions.with_tree_layouts(config, params)
    cands = _candidates(params)
    if not cands:
        cells = target_checks.unadaptable_weights(params)
        hint = target_checks.why_unadaptable(cells) if cells else PARAMS_HINT
        raise ValueError(
            f"{where} holds no 'kernel', 'embedding' or 'weight' leaf of 2 or more dimensions, "
            f"so nothing can be adapted; {hint}"
        )
    all_paths = [c.path for c in cands]
    _check_patterns("layouts", config.layouts, all_paths, "module")
    target_checks.check_target_entries(config, params, all_paths)
    chosen = _select(config, cands)
    chosen_paths = [c.path for c in chosen]
    _check_patterns("rank_pattern", config.rank_pattern, chosen_paths, "target module")
    _check_patterns("alpha_pattern", config.alpha_pattern, chosen_paths, "target module")
    unknown = [(c.path, c.shape) for c in chosen if _layout(config, c) is None]
    if unknown:
        listing = ", ".join(f"`{p}` {s}" for p, s in unknown[:8])
        raise ValueError(
            f"cannot tell the input and output axes of the N-D kernels {listing} from their shape "
            "alone; state them with `LoraConfig(layouts={...})` (e.g. 'ioo' for an attention "
            "query, 'iio' for its out projection, 'sio' for a scanned Dense) or read them off the "
            "model with `jaxlora.infer_layouts(module, *sample_inputs)`"
        )
    targets = []
    for c in chosen:
        rank = config.rank_for(c.path)
        targets.append(
            Target(
                keys=c.keys,
                path=c.path,
                leaf=c.leaf,
                shape=c.shape,
                dtype=c.dtype,
                layout=cast(str, _layout(config, c)),  # not None: `unknown` is empty
                rank=rank,
                alpha=config.alpha_for(c.path),
                scale=config.scale_for(c.path, rank),
                embed=c.embed,
            )
        )
    return targets


def find_trainable_leaves(
    params: Params, config: LoraConfig, targets: list[Target]
) -> list[tuple[tuple[Any, ...], str]]:
    """Leaves trained in full: biases (per ``config.bias``) and everything in ``modules_to_save``
    or in a head of ``config.task_type`` (``classifier`` / ``score`` for ``"SEQ_CLS"`` and
    ``"TOKEN_CLS"``, ``qa_outputs`` for ``"QUESTION_ANS"``, as PEFT; a missing head is skipped).

    Returns ``(raw keys, "/"-joined path)`` pairs.
    """
    target_paths = {t.path for t in targets}
    saved = peft_rules.saved_modules(config.modules_to_save, config.task_type)
    seen_saved: set[str] = set()
    out = []
    for keys, names, leaf in paths.flatten(params):
        if not names or not hasattr(leaf, "shape"):
            continue
        module = paths.join(names[:-1])
        hit = [n for n in saved if peft_rules.within(n, module)]
        seen_saved.update(hit)
        is_bias = names[-1] == BIAS and (
            config.bias == "all" or (config.bias == "lora_only" and module in target_paths)
        )
        if hit or is_bias:
            out.append((keys, paths.join(names)))
    missing = [n for n in config.modules_to_save or () if n not in seen_saved]
    if missing:
        raise ValueError(
            f"`modules_to_save` entries {missing} match no module; modules seen: "
            f"{paths.preview(sorted({paths.join(n[:-1]) for _, n, _ in paths.flatten(params)}))}"
        )
    return out
