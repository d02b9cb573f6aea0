"""LoRA+ (Hayou, Ghosh and Yu, 2024): a larger learning rate for B than for A.

In a width-n layer, A multiplies an n-dimensional input while B multiplies the rank-r vector
``x·A``; for both to learn at a useful rate B's learning rate should be larger by a factor that
grows with n (the paper suggests ``ratio`` ≈ 16). :func:`loraplus` builds that optimizer with
``optax.multi_transform`` from any optax factory taking a learning rate.

Groups follow PEFT's ``create_loraplus_optimizer``: ``lora_b`` and every other 1-D trainable leaf
(biases, DoRA's ``lora_magnitude``) get ``lr · ratio``; ``lora_a`` and other leaves (whole
``modules_to_save`` kernels) get ``lr``; both factors of an embedding table get ``embedding_lr``.
An embedding's input is a one-hot row, not an n-dimensional activation, so the width argument
behind the ratio does not apply to it; the authors' reference code and PEFT give embedding factors
a small fixed rate instead, 1e-6 by default, which is the default here too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import optax

from jaxlora._src import paths, validate
from jaxlora._src.types import LORA_A, LORA_B, LoraTree

LABELS = ("lora_a", "lora_b", "embedding")
_EMBEDDING_LEAF = "embedding"


def loraplus_labels(tree: LoraTree, embedding_paths: Iterable[str] = ()) -> Any:
    """The LoRA+ group of each leaf of Θ (or of a combined tree): ``"lora_a"``, ``"lora_b"`` or
    ``"embedding"``.

    A module counts as an embedding when its ``/``-joined path is in ``embedding_paths`` (Θ alone
    does not say; pass ``[t.path for t in jaxlora.find_targets(params, config) if t.kind ==
    "embed"]``) or when the tree holds an ``embedding`` leaf beside its factors.

    Example:
        >>> import jax.numpy as jnp
        >>> lora = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4)),
        ...               "bias": jnp.ones(4)}, "emb": {"lora_a": jnp.ones((9, 2))}}
        >>> loraplus_labels(lora, ["emb"])
        {'emb': {'lora_a': 'embedding'},
         'q': {'bias': 'lora_b', 'lora_a': 'lora_a', 'lora_b': 'lora_b'}}
    """
    validate.tree("tree", tree)
    embeddings = set(check_embedding_paths(embedding_paths))
    adapted = set()

    def label(keys, names, leaf):
        module = paths.join(names[:-1])
        if names[-1] in (LORA_A, LORA_B):
            adapted.add(module)
            holder = paths.get_in(tree, keys[:-1])
            if module in embeddings or _EMBEDDING_LEAF in holder:
                return "embedding"
            return names[-1]
        vector = names[-1] in ("bias", "lora_magnitude") or getattr(leaf, "ndim", 0) == 1
        return "lora_b" if vector else "lora_a"

    labels = paths.map_with_keys(label, tree)
    unknown = sorted(embeddings - adapted)
    if unknown:
        # A path that names no adapted module would leave that embedding at B's rate unseen.
        raise ValueError(
            f"`embedding_paths` entries {unknown} name no adapted module of the tree; adapted "
            f"modules: {sorted(adapted)[:20]}"
        )
    return labels


def check_embedding_paths(embedding_paths: Any) -> tuple[str, ...]:
    """``embedding_paths`` as a tuple of str; a bare str (read as its letters) is a TypeError."""
    if isinstance(embedding_paths, str | bytes):
        raise TypeError(
            f"`embedding_paths` must be a sequence of module paths, got the str "
            f"{embedding_paths!r} (it would read as its letters); write [{embedding_paths!r}]"
        )
    if not isinstance(embedding_paths, Iterable):
        raise TypeError(
            f"`embedding_paths` must be a sequence of module paths, got "
            f"{type(embedding_paths).__name__}"
        )
    entries = tuple(embedding_paths)
    bad = [p for p in entries if not isinstance(p, str)]
    if bad:
        raise TypeError(f"`embedding_paths` entries must be '/'-joined str paths, got {bad!r:.80}")
    return entries


def _check_rate(value: Any, name: str, *, zero_ok: bool) -> None:
    """A learning rate: an optax schedule (callable), or a finite number > 0 (>= 0 when
    ``zero_ok``); NaN or inf would make every update of its group non-finite."""
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a number or an optax schedule, got {type(value).__name__} "
            f"{value!r:.40}"
        )
    low = ">= 0" if zero_ok else "> 0"
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"`{name}` must be a finite number {low}, got {value!r}")


def _scaled(lr: float | optax.Schedule, factor: float) -> float | optax.Schedule:
    if callable(lr):
        return lambda step: factor * lr(step)
    return factor * lr


def loraplus(
    optimizer_factory: Callable[[Any], optax.GradientTransformation],
    lr: float | optax.Schedule,
    ratio: float = 16.0,
    embedding_lr: float | optax.Schedule = 1e-6,
    embedding_paths: Iterable[str] = (),
) -> optax.GradientTransformation:
    """An optax optimizer for Θ with LoRA+ learning rates: ``lr`` for A, ``lr · ratio`` for B.

    Args:
        optimizer_factory: a function from a learning rate (float or schedule) to an optax
            transformation, e.g. ``optax.adamw`` or
            ``lambda lr: optax.adamw(lr, weight_decay=0.01)``.
        lr: A's learning rate (a float or an optax schedule).
        ratio: ``lr_B / lr_A``, at least 1 (the paper's default is 16).
        embedding_lr: the rate of both factors of embedding tables (see the module docstring);
            0 freezes them.
        embedding_paths: module paths of embedding targets, as for :func:`loraplus_labels`.

    Raises:
        ValueError: when ``ratio`` is below 1 or not finite, ``lr`` not a finite number > 0,
            ``embedding_lr`` not a finite number >= 0 (0 freezes embedding factors), or (when
            the optimizer first sees Θ) an ``embedding_paths`` entry names no adapted module.
        TypeError: for a ``ratio`` or rate that is not a number (a rate may be an optax
            schedule), a str ``embedding_paths`` (a sequence of paths is expected), or an
            ``optimizer_factory`` that is not callable.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> lora = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}}
        >>> opt = loraplus(optax.sgd, 0.1, ratio=4.0)
        >>> updates, _ = opt.update(lora, opt.init(lora))
        >>> float(updates["q"]["lora_a"][0, 0]), float(updates["q"]["lora_b"][0, 0])
        (-0.1, -0.4)
    """
    if not callable(optimizer_factory):
        raise TypeError(
            "`optimizer_factory` must be a function from a learning rate to an optax "
            f"transformation (e.g. optax.adamw), got {type(optimizer_factory).__name__}"
        )
    _check_rate(lr, "lr", zero_ok=False)
    _check_rate(embedding_lr, "embedding_lr", zero_ok=True)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"`ratio` (lr_B / lr_A) must be a number >= 1, got {ratio!r:.40}")
    if not math.isfinite(ratio) or ratio < 1:
        raise ValueError(
            f"`ratio` (lr_B / lr_A) must be a number >= 1, got {ratio!r} (and finite: NaN or "
            "inf makes every update of B non-finite)"
        )
    embedding_paths = check_embedding_paths(embedding_paths)
    transforms: dict[Hashable, optax.GradientTransformation] = {
        "lora_a": optimizer_factory(lr),
        "lora_b": optimizer_factory(_scaled(lr, ratio)),
        "embedding": optimizer_factory(embedding_lr),
    }
    return optax.multi_transform(transforms, lambda tree: loraplus_labels(tree, embedding_paths))


__all__ = ["LABELS", "loraplus", "loraplus_labels"]
