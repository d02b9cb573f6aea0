"""Abstract parameter trees of published Transformers, for counting and planning without memory.

Every leaf is a :class:`jax.ShapeDtypeStruct`, so a 175B-parameter model costs a few kilobytes.
Module names follow the linen convention used across jaxlora (``layer_i/attention/query``,
``layer_i/mlp/fc_in``), so ``target_modules=["query", "value"]`` selects W_q and W_v.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlora._src import validate

__all__ = ["PAPER_MODELS", "TransformerShape", "abstract_params"]


@dataclasses.dataclass(frozen=True)
class TransformerShape:
    """The sizes that decide a Transformer's parameter count."""

    name: str
    n_layers: int
    d_model: int
    d_ff: int
    vocab: int
    n_positions: int
    #: Relative-position tables (DeBERTa) are counted as extra (2 * buckets, d_model) embeddings.
    relative_buckets: int = 0

    def __post_init__(self) -> None:
        validate.string("name", self.name)
        validate.dataclass_fields(self, nonnegative=("relative_buckets",))


#: The models of the LoRA paper's tables, with their published configurations.
PAPER_MODELS = {
    "roberta-base": TransformerShape("RoBERTa base", 12, 768, 3072, 50265, 514),
    "roberta-large": TransformerShape("RoBERTa large", 24, 1024, 4096, 50265, 514),
    "deberta-xxl": TransformerShape("DeBERTa XXL", 48, 1536, 6144, 128100, 512, 256),
    "gpt2-medium": TransformerShape("GPT-2 medium", 24, 1024, 4096, 50257, 1024),
    "gpt2-large": TransformerShape("GPT-2 large", 36, 1280, 5120, 50257, 1024),
    "gpt3": TransformerShape("GPT-3 175B", 96, 12288, 49152, 50257, 2048),
}


def _dense(d_in: int, d_out: int, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        "kernel": jax.ShapeDtypeStruct((d_in, d_out), dtype),
        "bias": jax.ShapeDtypeStruct((d_out,), dtype),
    }


def _norm(d: int, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    return {"scale": jax.ShapeDtypeStruct((d,), dtype), "bias": jax.ShapeDtypeStruct((d,), dtype)}


def abstract_params(shape: TransformerShape, dtype=jnp.float16) -> dict:
    """The params tree of ``shape`` as ``ShapeDtypeStruct`` leaves (nothing is allocated).

    Example:
        >>> import jaxlora
        >>> params = abstract_params(PAPER_MODELS["gpt3"])
        >>> round(jaxlora.count(params).total / 1e9)
        175
    """
    if not isinstance(shape, TransformerShape):
        raise validate.fail_type("shape", "a TransformerShape (see PAPER_MODELS)", shape)
    validate.float_dtype("dtype", dtype)
    d, f = shape.d_model, shape.d_ff
    layer = {
        "attention": {name: _dense(d, d, dtype) for name in ("query", "key", "value", "out")},
        "ln_attention": _norm(d, dtype),
        "mlp": {"fc_in": _dense(d, f, dtype), "fc_out": _dense(f, d, dtype)},
        "ln_mlp": _norm(d, dtype),
    }
    params = {
        "embed": {"embedding": jax.ShapeDtypeStruct((shape.vocab, d), dtype)},
        "position": {"embedding": jax.ShapeDtypeStruct((shape.n_positions, d), dtype)},
        "ln_final": _norm(d, dtype),
    }
    if shape.relative_buckets:
        table = jax.ShapeDtypeStruct((2 * shape.relative_buckets, d), dtype)
        params["relative"] = {"embedding": table}
    for i in range(shape.n_layers):
        params[f"layer_{i}"] = layer
    return params
