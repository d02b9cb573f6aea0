"""Named shortcuts kept for DoRA: :func:`dora_split` and :func:`dora_merge`.

Both are the general functions with the variant spelled out: ``jaxlora.split(..., variant="dora")``
and ``jaxlora.merge``, which folds every module through its own variant.
"""

from __future__ import annotations

from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.tree import core
from jaxlora._src.types import LoraTree, Params, PRNGKey


def dora_split(params: Params, config: LoraConfig, key: PRNGKey) -> tuple[Params, LoraTree]:
    """``jaxlora.split(params, config, key, variant="dora")``: a DoRA magnitude ``‖W‖_c`` (in
    ``config.dtype``) beside each target's factors.

    Raises:
        ValueError: when a target is an embedding table (DoRA here covers dense and conv kernels).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"q": {"kernel": jnp.full((4, 3), 2.0)}}
        >>> frozen, lora = dora_split(params, jaxlora.LoraConfig(r=2, target_modules=["q"]),
        ...                           jax.random.key(0))
        >>> lora["q"]["lora_magnitude"]
        Array([4., 4., 4.], dtype=float32)
    """
    return core.split(params, config, key, variant="dora")


def dora_merge(frozen: Params, lora: LoraTree, config: LoraConfig) -> Params:
    """``jaxlora.merge``: ``m · V / ‖V‖_c`` for modules with a magnitude, ``W + s·A·B`` for plain
    LoRA modules. Use it inside the loss for training (the norm is stop-gradiented) and for
    deployment.

    Raises:
        ValueError: when a magnitude does not fit its kernel or has no kernel in ``frozen``.
    """
    return core.merge(frozen, lora, config)
