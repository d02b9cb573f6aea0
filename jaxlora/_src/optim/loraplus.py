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

from collections.abc import Callable, Hashable, Iterable
from typing import Any

import optax

from jaxlora._src import paths
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
    embeddings = set(embedding_paths)

    def label(keys, names, leaf):
        module = paths.join(names[:-1])
        if names[-1] in (LORA_A, LORA_B):
            holder = paths.get_in(tree, keys[:-1])
            if module in embeddings or _EMBEDDING_LEAF in holder:
                return "embedding"
            return names[-1]
        vector = names[-1] in ("bias", "lora_magnitude") or getattr(leaf, "ndim", 0) == 1
        return "lora_b" if vector else "lora_a"

    return paths.map_with_keys(label, tree)


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
        embedding_lr: the rate of both factors of embedding tables (see the module docstring).
        embedding_paths: module paths of embedding targets, as for :func:`loraplus_labels`.

    Raises:
        ValueError: when ``ratio`` < 1.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> lora = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}}
        >>> opt = loraplus(optax.sgd, 0.1, ratio=4.0)
        >>> updates, _ = opt.update(lora, opt.init(lora))
        >>> float(updates["q"]["lora_a"][0, 0]), float(updates["q"]["lora_b"][0, 0])
        (-0.1, -0.4)
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio < 1:
        raise ValueError(f"`ratio` (lr_B / lr_A) must be a number >= 1, got {ratio!r}")
    embedding_paths = tuple(embedding_paths)
    transforms: dict[Hashable, optax.GradientTransformation] = {
        "lora_a": optimizer_factory(lr),
        "lora_b": optimizer_factory(_scaled(lr, ratio)),
        "embedding": optimizer_factory(embedding_lr),
    }
    return optax.multi_transform(transforms, lambda tree: loraplus_labels(tree, embedding_paths))


__all__ = ["LABELS", "loraplus", "loraplus_labels"]
