"""Which leaves of a params tree a ``LoraConfig`` adapts, and how each kernel's axes split.

A kernel's axes are described by a *layout* string, one letter per axis in order: ``s`` a stacked
layer axis (``nn.scan`` / ``nn.vmap``), ``w`` a convolution window axis, ``i`` a contracted input
axis, ``o`` an output axis. A 2-D Dense kernel is ``"io"``; linen attention's query kernel
(embed, heads, head_dim) is ``"ioo"`` and its out kernel (heads, head_dim, embed) ``"iio"``; a
scanned Dense kernel is ``"sio"``; a Conv2D kernel ``"wwio"``. 2-D kernels and embedding tables
need no layout; any other kernel takes one from ``LoraConfig.layouts`` (see
:func:`jaxlora.infer_layouts`, which reads them off a linen module).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.types import Params

#: Leaf names of the weights LoRA can adapt (Flax's names for Dense/Conv/Einsum and Embed).
KERNEL = "kernel"
EMBEDDING = "embedding"
BIAS = "bias"
#: Module names that ``target_modules="all-linear"`` treats as the output head and leaves alone.
OUTPUT_HEAD_NAMES = ("lm_head", "head", "classifier", "score", "output_head", "logits")


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel: where it is, how its axes split, and its rank and scale.

    ``a`` has shape ``stack + window + input + (rank,)`` and ``b`` ``stack + (rank,) + output``.
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

    @property
    def kind(self) -> str:
        """``"embed"``, ``"conv"`` or ``"dense"``."""
        if self.leaf == EMBEDDING:
            return "embed"
        return "conv" if "w" in self.layout else "dense"

    @property
    def n_stack(self) -> int:
        return self.layout.count("s")

    @property
    def n_out(self) -> int:
        return self.layout.count("o")

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[self.n_stack : len(self.shape) - self.n_out])

    @property
    def a_shape(self) -> tuple[int, ...]:
        return self.shape[: len(self.shape) - self.n_out] + (self.rank,)

    @property
    def b_shape(self) -> tuple[int, ...]:
        return (
            self.shape[: self.n_stack] + (self.rank,) + self.shape[len(self.shape) - self.n_out :]
        )


@dataclasses.dataclass(frozen=True)
class _Candidate:
    keys: tuple[Any, ...]
    path: str
    leaf: str
    shape: tuple[int, ...]
    dtype: Any


def _candidates(params: Params) -> list[_Candidate]:
    found = []
    for keys, names, leaf in paths.flatten(params):
        shape = getattr(leaf, "shape", None)
        if names and names[-1] in (KERNEL, EMBEDDING) and shape is not None and len(shape) >= 2:
            found.append(
                _Candidate(keys[:-1], paths.join(names[:-1]), names[-1], tuple(shape), leaf.dtype)
            )
    return found


def module_paths(params: Params) -> list[str]:
    """Every module path of ``params`` that holds a kernel or embedding LoRA could adapt."""
    return [c.path for c in _candidates(params)]


def _is_head(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in OUTPUT_HEAD_NAMES


def _layout(config: LoraConfig, cand: _Candidate) -> str | None:
    found = paths.first_match(config.layouts, cand.path)
    if found is not None:
        layout = found[1]
        if len(layout) != len(cand.shape):
            raise ValueError(
                f"`layouts[{found[0]!r}]`={layout!r} has {len(layout)} axes but the {cand.leaf} at "
                f"`{cand.path}` has shape {cand.shape}; give one letter per axis"
            )
        if cand.leaf == EMBEDDING and layout.strip("s") != "io":
            raise ValueError(
                f"`layouts[{found[0]!r}]`={layout!r} does not fit the embedding table at "
                f"`{cand.path}`: an embedding takes 'io' with optional leading 's' axes"
            )
        return layout
    if len(cand.shape) == 2:
        return "io"
    return None


def _select(config: LoraConfig, cands: list[_Candidate]) -> list[_Candidate]:
    spec = config.target_modules
    if spec is None:
        raise ValueError(
            "`target_modules` is None: say which modules to adapt, e.g. ['query', 'value'], a "
            f"regex, or 'all-linear'. Modules seen: {paths.preview(c.path for c in cands)}"
        )
    saved = config.modules_to_save or ()
    if spec == "all-linear":
        chosen = [
            c
            for c in cands
            if c.leaf == KERNEL
            and not _is_head(c.path)
            and "w" not in (_layout(config, c) or "")
            and not any(paths.matches_literal(name, c.path) for name in saved)
        ]
    else:
        chosen = [c for c in cands if paths.match_targets(spec, c.path)]
        clash = [c.path for c in chosen if any(paths.matches_literal(n, c.path) for n in saved)]
        if clash:
            raise ValueError(
                f"modules {clash} are in both `target_modules` and `modules_to_save`; a module is "
                "either adapted with LoRA or trained in full, not both"
            )
    if config.exclude_modules is not None:
        excl = config.exclude_modules
        if not isinstance(excl, str):
            unused = [n for n in excl if not any(paths.matches_literal(n, c.path) for c in cands)]
            if unused:
                raise ValueError(
                    f"`exclude_modules` entries {unused} match no module; modules seen: "
                    f"{paths.preview(c.path for c in cands)}"
                )
        chosen = [c for c in chosen if not paths.match_targets(excl, c.path)]
    if not chosen:
        raise ValueError(
            f"no module matched `target_modules`={spec!r}"
            + (
                f" (after `exclude_modules`={config.exclude_modules!r})"
                if config.exclude_modules
                else ""
            )
            + f"; modules seen: {paths.preview(c.path for c in cands)}"
        )
    return chosen


def _check_patterns(field: str, patterns: Any, where: list[str], what: str) -> None:
    for pattern in patterns:
        if not any(paths.matches_name(pattern, p) for p in where):
            raise ValueError(
                f"`{field}` key {pattern!r} matches no {what}; {what}s: {paths.preview(where)}"
            )


def find_targets(params: Params, config: LoraConfig) -> list[Target]:
    """The kernels of ``params`` that ``config`` adapts, in the tree's flattening order.

    Args:
        params: a params pytree (linen ``params`` dict, ``nnx.State``, nested dicts); its leaves
            may be arrays or ``jax.ShapeDtypeStruct``.
        config: the LoRA config.

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
    cands = _candidates(params)
    if not cands:
        raise ValueError(
            "`params` holds no 'kernel' or 'embedding' leaf of 2 or more dimensions, so nothing "
            "can be adapted; pass the model's `params` collection (variables['params'])"
        )
    all_paths = [c.path for c in cands]
    _check_patterns("layouts", config.layouts, all_paths, "module")
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
                layout=_layout(config, c),
                rank=rank,
                alpha=config.alpha_for(c.path),
                scale=config.scale_for(c.path, rank),
            )
        )
    return targets


def find_trainable_leaves(
    params: Params, config: LoraConfig, targets: list[Target]
) -> list[tuple[tuple[Any, ...], str]]:
    """Leaves trained in full: biases (per ``config.bias``) and everything in ``modules_to_save``.

    Returns ``(raw keys, "/"-joined path)`` pairs.
    """
    target_paths = {t.path for t in targets}
    saved = config.modules_to_save or ()
    seen_saved: set[str] = set()
    out = []
    for keys, names, leaf in paths.flatten(params):
        if not names or not hasattr(leaf, "shape"):
            continue
        module = paths.join(names[:-1])
        prefixes = [paths.join(names[:k]) for k in range(1, len(names))]
        hit = [n for n in saved if any(paths.matches_literal(n, p) for p in prefixes)]
        seen_saved.update(hit)
        is_bias = names[-1] == BIAS and (
            config.bias == "all" or (config.bias == "lora_only" and module in target_paths)
        )
        if hit or is_bias:
            out.append((keys, paths.join(names)))
    missing = [n for n in saved if n not in seen_saved]
    if missing:
        raise ValueError(
            f"`modules_to_save` entries {missing} match no module; modules seen: "
            f"{paths.preview(sorted({paths.join(n[:-1]) for _, n, _ in paths.flatten(params)}))}"
        )
    return out
