"""Checks and normalisation of :func:`jaxlora.apply`'s arguments: rngs, model keywords, dropout.

Every wrong input is an error naming the argument, raised before the model runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.forward import linen


def _is_key(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == jnp.uint32 and tuple(getattr(value, "shape", ())) == (2,)


def normalized_rngs(rngs: Any) -> dict[str, jax.Array]:
    if rngs is None:
        return {}
    if isinstance(rngs, Mapping):
        for name, key in rngs.items():
            if not _is_key(key):
                raise TypeError(
                    f"`rngs[{name!r}]` must be a PRNG key (`jax.random.key(seed)`), got {key!r:.60}"
                )
        return dict(rngs)
    if isinstance(rngs, jax.Array):
        return {linen.DROPOUT_RNG: rngs}
    raise TypeError(f"`rngs` must be a dict of PRNG keys, a PRNG key or None, got {rngs!r}")


def with_model_kwargs(kwargs: dict[str, Any], model_kwargs: Mapping[str, Any] | None) -> dict:
    if model_kwargs is None:
        return dict(kwargs)
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(f"`model_kwargs` must be a dict, got {type(model_kwargs).__name__}")
    twice = sorted(set(kwargs) & set(model_kwargs))
    if twice:
        raise ValueError(f"model keywords {twice} are given both directly and in `model_kwargs`")
    return {**kwargs, **model_kwargs}


def nnx_rngs(model: Any, rngs: nnx.Rngs, kwargs: dict[str, Any], wanted: bool) -> dict:
    """An ``nnx.Rngs`` goes to the model's own ``rngs`` keyword (put in ``kwargs``); the LoRA
    dropout key, when ``wanted``, is drawn from its ``dropout`` stream."""
    if not isinstance(model, nnx.Module | nnx.GraphDef):
        raise TypeError("`rngs` is an nnx.Rngs, which only NNX models take; give linen a dict")
    if "rngs" in kwargs:
        raise ValueError("the model's `rngs` is given twice: as `rngs` and in `model_kwargs`")
    kwargs["rngs"] = rngs
    return {linen.DROPOUT_RNG: rngs.dropout()} if wanted and "dropout" in rngs else {}


def dropout_on(config: LoraConfig, mode: str, rngs: dict, lora_deterministic: bool | None) -> bool:
    """Whether LoRA dropout acts in this call; errors where it was asked for but cannot."""
    wanted = (linen.DROPOUT_RNG in rngs) if lora_deterministic is None else not lora_deterministic
    if not wanted or config.lora_dropout == 0:
        return False
    if mode == "merged":
        raise ValueError(
            f"`mode='merged'` cannot apply LoRA dropout (`lora_dropout`={config.lora_dropout}): "
            "dropout acts on the LoRA input, which merged weights no longer have; train with "
            "`mode='factored'`, or pass `lora_deterministic=True` (evaluation), or set "
            "`lora_dropout=0`"
        )
    if linen.DROPOUT_RNG not in rngs:
        raise ValueError(
            f"`lora_deterministic=False` with `lora_dropout`={config.lora_dropout} needs a "
            f"`rngs={{'{linen.DROPOUT_RNG}': key}}`; got rngs for {sorted(rngs)}"
        )
    return True


def check_method(cls: type, base: type, method: Any) -> None:
    if isinstance(method, str) and not callable(getattr(cls, method, None)):
        own = sorted(n for n in set(dir(cls)) - set(dir(base)) if callable(getattr(cls, n, None)))
        raise ValueError(
            f"`method`={method!r} is not a method of the model ({cls.__name__}); its methods: {own}"
        )


def check_linen_inputs(model, frozen, method, variables) -> None:
    if isinstance(frozen, nnx.State):
        raise TypeError(
            "`frozen` is an nnx.State, but `model` is a linen Module: pass the NNX model (or its "
            "GraphDef) the state was split from, or the linen model's `params` collection"
        )
    if variables is not None and not isinstance(variables, Mapping):
        raise TypeError(
            "`variables` must be a dict of the model's other collections (e.g. "
            f"{{'batch_stats': ...}}) or None, got {type(variables).__name__}"
        )
    check_method(type(model), nn.Module, method)
