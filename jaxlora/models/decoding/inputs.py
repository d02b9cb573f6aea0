"""The inputs of :func:`jaxlora.models.decoding.generate`: left-padded prompt batches, stop
tokens, the model's cache function and the adapter arguments, each checked with an error that
names the argument.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

import jaxlora
from jaxlora._src import validate
from jaxlora.models.token_ids import check_token_id, check_token_ids

__all__ = ["left_pad"]


def left_pad(
    prompts: Sequence[Sequence[int] | np.ndarray | jax.Array], pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token-id lists (or 1-D int arrays) to one length: ``(ids int32[batch, L],
    mask int32[batch, L])``.

    A negative id, or one past what int32 holds, is a ValueError naming ``prompts[i]`` and the
    position; ``generate`` also checks the ids against the model's vocabulary.

    Example:
        >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or not prompts:
        raise _not_prompts(prompts)
    rows = []
    for i, prompt in enumerate(prompts):
        row = np.asarray(prompt)
        if row.ndim != 1 or row.size == 0 or not jnp.issubdtype(row.dtype, jnp.integer):
            raise ValueError(
                f"`prompts[{i}]` must be a non-empty list of int token ids, got {prompt!r:.60}"
            )
        check_token_ids(row, None, f"prompts[{i}]")  # before int32 could wrap it into range
        rows.append(row.astype(np.int32))
    pad_id = check_token_id(pad_id, None, "pad_id")
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return ids, mask


def as_batch(prompts: Any, attention_mask: ArrayLike | None, pad_id: int):
    """``(ids, mask)`` from a list of lists, a 1-D prompt or a left-padded 2-D array."""
    if isinstance(prompts, np.ndarray | jax.Array) and prompts.ndim == 2:
        ids = np.asarray(prompts)
        if ids.size == 0 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"`prompts` must be a non-empty int array [batch, length], got {ids.dtype} "
                f"{ids.shape}"
            )
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else attention_mask
        mask = np.asarray(mask)
        if mask.shape != ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `prompts` {ids.shape}, got {mask.shape}"
            )
        check_left_padded(mask)
        check_token_ids(ids, None, "prompts")  # before int32 could wrap it into range
        return ids.astype(np.int32), (mask > 0).astype(np.int32)
    if attention_mask is not None:
        raise ValueError(
            "`attention_mask` goes with a left-padded int array `prompts` [batch, length]; for "
            "a list of prompts of different lengths leave it out (they are padded for you)"
        )
    if isinstance(prompts, np.ndarray | jax.Array):
        if prompts.ndim != 1 or prompts.size == 0:  # 0-D included: it has no len()
            raise _not_prompts(prompts)
        prompts = [prompts]  # one prompt
    elif isinstance(prompts, Sequence) and len(prompts) and np.ndim(prompts[0]) == 0:
        prompts = [prompts]  # one prompt
    return left_pad(prompts, pad_id)


def _not_prompts(prompts: object) -> ValueError:
    return ValueError(f"`prompts` must be a non-empty list of token-id lists, got {prompts!r:.60}")


def check_left_padded(mask: np.ndarray) -> None:
    real = mask > 0
    bad = [i for i, row in enumerate(real) if not row[-1] or (np.diff(row.astype(int)) < 0).any()]
    if bad:
        raise ValueError(
            f"`attention_mask` rows {bad[:8]} are not left-padded (zeros, then ones, ending in a "
            "real token); pad prompts on the left, e.g. with `left_pad`"
        )


def model_init_cache(model: Any) -> Callable[..., Any]:
    """The ``init_cache`` function of the module that defines ``model``'s class."""
    module = importlib.import_module(type(model).__module__)
    init_cache = getattr(module, "init_cache", None)
    if init_cache is None or not hasattr(model, "config"):
        raise TypeError(
            f"`model` ({type(model).__name__}) does not follow the KV-cache contract: its module "
            f"`{module.__name__}` needs `init_cache(config, batch, max_length, dtype)` and the "
            "model a `config` attribute; pass `init_cache=` yourself"
        )
    return init_cache


def check_stop_tokens(stop_tokens: Any, vocab_size: int | None = None) -> tuple[int, ...]:
    if isinstance(stop_tokens, int | np.integer):
        stop_tokens = (stop_tokens,)
    if isinstance(stop_tokens, str | bytes) or not isinstance(stop_tokens, Iterable):
        raise validate.fail_type("stop_tokens", "a list of int token ids", stop_tokens)
    values = tuple(stop_tokens)
    if any(isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0 for t in values):
        raise ValueError(f"`stop_tokens` must be non-negative int token ids, got {values!r:.80}")
    # An id the model cannot emit would never stop a row.
    check_token_ids(np.asarray(values, np.int64), vocab_size, "stop_tokens")
    return tuple(sorted({int(t) for t in values}))


def stop_array(stop_tokens: tuple[int, ...]) -> jax.Array:
    """The stop ids padded with -1 (never a token) to a multiple of 8: one compilation serves
    any handful of stop tokens."""
    size = 8 * max(1, -(-len(stop_tokens) // 8))
    return jnp.asarray(stop_tokens + (-1,) * (size - len(stop_tokens)), jnp.int32)


def check_length(model: Any, total: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and total > limit:
        raise ValueError(
            f"the longest prompt plus `max_new_tokens` is {total} tokens, beyond the model's "
            f"`max_position_embeddings` ({limit}); shorten the prompts or `max_new_tokens`"
        )


def check_adapter(lora: Any, lora_config: Any, mode: str) -> str:
    if mode not in ("factored", "merged"):
        raise ValueError(f"`mode` must be 'factored' or 'merged', got {mode!r}")
    if (lora is None) != (lora_config is None):
        raise ValueError(
            "`lora` and `lora_config` go together: pass both (the adapter and the config it was "
            "made with) or neither"
        )
    if lora_config is not None and not isinstance(lora_config, jaxlora.LoraConfig):
        raise TypeError(
            f"`lora_config` must be a jaxlora.LoraConfig, got {type(lora_config).__name__}"
        )
    return mode


def check_index(adapter_index: Any, lora: Any, batch: int, mode: str) -> jax.Array | None:
    if adapter_index is None:
        return None
    if lora is None:
        raise ValueError("`adapter_index` needs `lora`: a stack of adapters (adapters.stack)")
    if mode != "factored":
        raise ValueError(
            "`adapter_index` (one adapter per row) runs factored; pass mode='factored'"
        )
    index = np.asarray(adapter_index)
    if not jnp.issubdtype(index.dtype, jnp.integer) or index.shape != (batch,):
        raise ValueError(
            f"`adapter_index` must be int[batch={batch}] (one adapter per prompt), got "
            f"{index.dtype} {index.shape}"
        )
    members = {int(np.shape(x)[0]) for x in jax.tree.leaves(lora) if np.ndim(x)}
    if len(members) != 1:
        raise ValueError(
            "`lora` with `adapter_index` must be a stack of adapters (`jaxlora.adapters.stack`), "
            f"whose leaves share one leading axis; got leading sizes {sorted(members)}"
        )
    count = members.pop()
    if index.min() < 0 or index.max() >= count:
        raise ValueError(
            f"`adapter_index` values must lie in [0, {count}) for a stack of {count} adapters, "
            f"got {index.tolist()}"
        )
    return jnp.asarray(index, jnp.int32)
