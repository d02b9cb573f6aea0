"""A BERT-style encoder in Flax linen (the architecture of all-MiniLM-L6-v2).

Every projection is a plain 2-D ``nn.Dense``, so LoRA targets are simple ``(in, out)`` kernels.
Module paths follow Hugging Face's ``BertModel`` closely::

    embeddings/{word,position,token_type}_embeddings, embeddings/layer_norm
    encoder/layer_{i}/attention/{query,key,value,output}
    encoder/layer_{i}/attention_layer_norm
    encoder/layer_{i}/intermediate, encoder/layer_{i}/output, encoder/layer_{i}/output_layer_norm

so ``target_modules=["query", "value"]`` selects exactly the query and value kernels of every layer.
:class:`BertClassifier` nests the encoder under ``bert`` and adds a head named ``classifier``,
mirroring ``BertForSequenceClassification``. Pretrained weights, the tokenizer and the Hugging Face
name map are in :mod:`jaxlora.models.bert.weights`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxlora._src import validate
from jaxlora.models.token_ids import check_token_ids

__all__ = ["BertClassifier", "BertConfig", "BertEncoder", "mean_pool"]


_HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder; the defaults are those of all-MiniLM-L6-v2."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        validate.dataclass_fields(self, probabilities=("hidden_dropout", "attention_dropout"))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by "
                f"`num_heads` ({self.num_heads})"
            )

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> BertConfig:
        """Builds a config from a Hugging Face ``config.json`` dict of a ``BertModel``.

        Raises:
            ValueError: If the config uses an activation or position scheme this model lacks.
        """
        validate.mapping("hf_config", hf_config)
        if hf_config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"`hidden_act` must be 'gelu', got {hf_config['hidden_act']!r}")
        if hf_config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only `position_embedding_type='absolute'` is supported")
        missing = [k for k in _HF_FIELDS if k not in hf_config]
        if missing:
            raise ValueError(f"`hf_config` (a BertModel config.json) lacks the fields {missing}")
        return cls(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            num_layers=hf_config["num_hidden_layers"],
            num_heads=hf_config["num_attention_heads"],
            intermediate_size=hf_config["intermediate_size"],
            max_position_embeddings=hf_config["max_position_embeddings"],
            type_vocab_size=hf_config["type_vocab_size"],
            layer_norm_eps=hf_config["layer_norm_eps"],
            hidden_dropout=hf_config.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf_config.get("attention_probs_dropout_prob", 0.1),
        )


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool):
        cfg = self.config
        positions = jnp.arange(input_ids.shape[-1], dtype=jnp.int32)[None, :]
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
        x = x + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings")(
            positions
        )
        x = x + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")(
            token_type_ids
        )
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="layer_norm")(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class BertAttention(nn.Module):
    """Multi-head self-attention with separate 2-D query/key/value/output projections."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        batch, length, _ = x.shape
        head_dim = cfg.hidden_size // cfg.num_heads

        def heads(name: str) -> jax.Array:
            y = nn.Dense(cfg.hidden_size, name=name)(x)
            return y.reshape(batch, length, cfg.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
        probs = jax.nn.softmax(scores + mask_bias, axis=-1)
        probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, cfg.hidden_size)
        return nn.Dense(cfg.hidden_size, name="output")(context)


class BertLayer(nn.Module):
    """One post-LayerNorm transformer block: attention, then a GELU feed-forward."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        dropout = nn.Dropout(cfg.hidden_dropout)
        attended = BertAttention(cfg, name="attention")(x, mask_bias, deterministic)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="attention_layer_norm")(
            x + dropout(attended, deterministic=deterministic)
        )
        hidden = nn.gelu(nn.Dense(cfg.intermediate_size, name="intermediate")(x), approximate=False)
        out = nn.Dense(cfg.hidden_size, name="output")(hidden)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="output_layer_norm")(
            x + dropout(out, deterministic=deterministic)
        )


class BertLayers(nn.Module):
    """The stack of :class:`BertLayer` blocks (``layer_0`` … ``layer_{n-1}``)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array, deterministic: bool) -> jax.Array:
        for i in range(self.config.num_layers):
            x = BertLayer(self.config, name=f"layer_{i}")(x, mask_bias, deterministic)
        return x


class BertEncoder(nn.Module):
    """BERT without its pooler: token ids in, final hidden states ``(batch, length, hidden)`` out.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
        ...                  intermediate_size=16, max_position_embeddings=16)
        >>> ids = jnp.ones((2, 5), jnp.int32)
        >>> params = jax.jit(BertEncoder(cfg).init)(jax.random.key(0), ids)["params"]
        >>> jax.jit(BertEncoder(cfg).apply)({"params": params}, ids).shape
        (2, 5, 8)
    """

    config: BertConfig = BertConfig()

    @nn.compact
    def __call__(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        token_type_ids: ArrayLike | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Encodes a batch of token ids.

        Args:
            input_ids: Integer token ids, shape ``(batch, length)``.
            attention_mask: 1 for real tokens, 0 for padding; defaults to all ones.
            token_type_ids: Segment ids; defaults to all zeros.
            deterministic: If False, applies dropout (needs a ``"dropout"`` rng).

        Returns:
            The hidden states of the last layer, ``float32[batch, length, hidden_size]``.
        """
        cfg = self.config
        check_token_ids(input_ids, cfg.vocab_size, "input_ids")  # concrete ids only
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be (batch, length), got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            # A position past the table would read NaN position embeddings.
            raise ValueError(
                f"`input_ids` has {input_ids.shape[1]} tokens per row, more than the model's "
                f"`max_position_embeddings` ({cfg.max_position_embeddings}); truncate them"
            )
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        check_token_ids(token_type_ids, cfg.type_vocab_size, "token_type_ids")
        keep = jnp.asarray(attention_mask)[:, None, None, :] > 0
        mask_bias = jnp.where(keep, jnp.float32(0), jnp.finfo(jnp.float32).min)
        x = BertEmbeddings(self.config, name="embeddings")(
            input_ids, jnp.asarray(token_type_ids), deterministic
        )
        return BertLayers(self.config, name="encoder")(x, mask_bias, deterministic)


def mean_pool(hidden: ArrayLike, attention_mask: ArrayLike, normalize: bool = False) -> jax.Array:
    """Averages hidden states over the real (mask = 1) tokens, as sentence-transformers does.

    Args:
        hidden: ``float[batch, length, hidden]``.
        attention_mask: ``[batch, length]``, 1 for real tokens and 0 for padding.
        normalize: If True, scales each pooled vector to unit L2 norm (all-MiniLM-L6-v2's
            sentence embedding).

    Returns:
        ``float[batch, hidden]``.
    """
    hidden = jnp.asarray(validate.array_like("hidden", hidden, ndim=3, floating=True))
    validate.array_like("attention_mask", attention_mask, ndim=2)
    validate.boolean("normalize", normalize)
    weights = jnp.asarray(attention_mask).astype(hidden.dtype)[..., None]
    pooled = (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)
    if normalize:
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled


class BertClassifier(nn.Module):
    """:class:`BertEncoder` (under ``bert``) + masked mean pooling + a Dense head ``classifier``.

    Put pretrained weights in with ``params["bert"] = load_minilm()[1]`` after ``init``
    (:func:`jaxlora.models.bert.weights.load_minilm`).
    """

    config: BertConfig = BertConfig()
    num_labels: int = 2

    @nn.compact
    def __call__(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        token_type_ids: ArrayLike | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Returns logits ``float32[batch, num_labels]``; arguments as :class:`BertEncoder`."""
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        hidden = BertEncoder(self.config, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic
        )
        pooled = mean_pool(hidden, attention_mask)
        pooled = nn.Dropout(self.config.hidden_dropout)(pooled, deterministic=deterministic)
        return nn.Dense(self.num_labels, name="classifier")(pooled)
