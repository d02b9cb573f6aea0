"""A zoo of small models written the way users write them, not with jaxlora in mind.

Each model exists in flax.linen and (where Flax has the layer) in NNX, uses Flax's layers as they
ship, and is small enough to compile in well under a second on CPU (dims <= 32, a few layers).
:data:`CASES` lists one :class:`Case` per model x framework; tests/test_unseen_models.py runs every
case through the same contract: ``jaxlora.apply(..., mode="factored")`` uses each adapted kernel
exactly as ``mode="merged"`` does.

What the zoo covers:

* Flax's own layers: ``MultiHeadDotProductAttention`` / ``MultiHeadAttention``, ``Dense`` /
  ``Linear``, ``DenseGeneral`` / ``LinearGeneral``, ``Einsum``, ``Conv``, ``ConvTranspose``,
  ``ConvLocal`` (linen only: NNX has none), ``Embed``, ``BatchNorm`` (train mode), ``Dropout``,
  ``LayerNorm``;
* Gemma-style attention, whose einsum kernels put output axes first: q (heads, d_model, head_dim)
  (layout ``oio``) and a fused kv (2, kv_heads, d_model, head_dim) (``ooio``);
* embeddings: an ``Embed`` subclass that scales its output by sqrt(d) (as Gemma does), tied
  embeddings through ``Embed.attend``, and logits computed as ``x @ embed.embedding.T`` by hand;
* recurrent cells through ``RNN``: linen ``OptimizedLSTMCell`` and ``GRUCell``, NNX ``LSTMCell``
  and ``GRUCell``;
* scanned stacks: linen ``nn.scan`` with ``variable_axes={"params": 0}``; NNX layers created with
  ``nnx.vmap`` over split rngs and run with ``nnx.scan`` (the Flax NNX docs' pattern);
* models that read a kernel themselves: a linen ``self.param("kernel", ...)`` / NNX
  ``nnx.Param`` used as ``x @ kernel``; a parent that reuses a child layer's kernel
  (``layer.kernel[...]``, ``self.fc.variables``) and reads ``kernel.shape``, ``features``,
  ``in_features``;
* a ``Dense`` / ``Linear`` subclass that post-processes its parent class's output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

D = 16  # model width
B, T = 2, 5  # batch, sequence length
VOCAB = 23
HEADS, KV_HEADS, HEAD_DIM = 2, 1, 8
# XLA's CPU backend optimisations triple the compile time of these tiny models and do not matter
# to them; float32 results stay within rounding.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class Built:
    """A model ready to run: what ``jaxlora.apply`` takes, and how to call it.

    ``model`` is a linen module or an NNX ``GraphDef``; ``params`` is the linen ``params``
    collection or the full NNX state (what ``jaxlora.split`` takes). ``variables`` (linen only)
    are the other collections, ``rngs`` the model's own PRNG streams (its ``Dropout``), ``kwargs``
    the keyword inputs (``train=True``, ``mutable=["batch_stats"]``).
    """

    model: Any
    params: Any
    args: tuple
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    variables: Mapping[str, Any] | None = None
    rngs: Mapping[str, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """One model in one framework, and the LoRA config a user would write for it."""

    name: str
    framework: str  # "linen" | "nnx"
    build: Callable[[], Built]
    layouts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    target_modules: str | tuple[str, ...] = ".*"

    @property
    def id(self) -> str:
        return f"{self.name}-{self.framework}"


def _x(feature=D, shape=(B, T)):
    return jax.random.normal(jax.random.key(10), (*shape, feature))


def _ids():
    return jax.random.randint(jax.random.key(11), (B, T), 0, VOCAB)


def _image(channels=3, size=6):
    return jax.random.normal(jax.random.key(12), (B, size, size, channels))


def _linen(model, *args, rngs=None, **kwargs):
    """Initialises a linen model: its params and other collections, ready for apply."""
    init_rngs = {"params": jax.random.key(0), **(rngs or {})}
    init_kwargs = {k: v for k, v in kwargs.items() if k != "mutable"}
    # Jitted (without XLA's backend optimisations): op by op, init costs seconds per model.
    init = jax.jit(lambda rngs, *args: model.init(rngs, *args, **init_kwargs))
    variables = dict(init.lower(init_rngs, *args).compile(COMPILER_OPTIONS)(init_rngs, *args))
    params = variables.pop("params")
    return Built(model, params, args, kwargs, variables or None, rngs)


def _nnx(cls, *args, **kwargs):
    graphdef, state = nnx.split(cls(nnx.Rngs(0)))
    return Built(graphdef, state, args, kwargs)


def _bias(bias, y):
    """``bias`` shaped to add onto ``y`` without implicit rank promotion."""
    return bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


DROPOUT_RNGS = {"dropout": jax.random.key(5)}

# --------------------------------------------------------------------------------------------------
# Dense + LayerNorm + Dropout (the model's own dropout, in train mode)


class LinenMlpNormDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(nn.Dense(2 * D, name="up")(x))
        h = nn.Dropout(0.3, deterministic=False, name="drop")(nn.gelu(h))
        return nn.Dense(D, name="down")(h)


class NnxMlpNormDropout(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.norm = nnx.LayerNorm(2 * D, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=nnx.Rngs(dropout=5))
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        return self.down(self.drop(nnx.gelu(self.norm(self.up(x)))))


# --------------------------------------------------------------------------------------------------
# BatchNorm in train mode: batch statistics of the adapted activations


class LinenBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(D, name="fc1")(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
        return nn.Dense(4, name="fc2")(jnp.tanh(h))


class NnxBatchNorm(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(D, D, rngs=rngs)
        self.bn = nnx.BatchNorm(D, use_running_average=False, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.bn(self.fc1(x))))


# --------------------------------------------------------------------------------------------------
# Flax's multi-head attention in a pre-norm transformer block

MHA_LAYOUTS = {"query": "ioo", "key": "ioo", "value": "ioo", "out": "iio"}


class LinenAttentionBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, name="attn")(h)
        h = nn.Dense(2 * D, name="mlp_up")(nn.LayerNorm(name="ln2")(x))
        return x + nn.Dense(D, name="mlp_down")(nn.gelu(h))


class NnxAttentionBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, qkv_features=D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.mlp_up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.mlp_down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_down(nnx.gelu(self.mlp_up(self.ln2(x))))


# --------------------------------------------------------------------------------------------------
# DenseGeneral / LinearGeneral over several axes, and an Einsum with the usual (in, out) order

GENERAL_LAYOUTS = {"split_heads": "ioo", "join_heads": "iio", "mix": "ioo"}


class LinenGeneral(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((HEADS, HEAD_DIM), name="split_heads")(x)  # (D, H, K)
        y = nn.DenseGeneral(D, axis=(-2, -1), name="join_heads")(jnp.tanh(h))  # (H, K, D)
        m = nn.Einsum((D, HEADS, HEAD_DIM), "btd,dhk->bthk", name="mix")(y)  # (D, H, K)
        return m.reshape(y.shape[:-1] + (HEADS * HEAD_DIM,))


class NnxGeneral(nnx.Module):
    def __init__(self, rngs):
        self.split_heads = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
        self.join_heads = nnx.LinearGeneral((HEADS, HEAD_DIM), D, axis=(-2, -1), rngs=rngs)
        self.mix = nnx.Einsum("btd,dhk->bthk", (D, HEADS, HEAD_DIM), (HEADS, HEAD_DIM), rngs=rngs)

    def __call__(self, x):
        y = self.join_heads(jnp.tanh(self.split_heads(x)))
        m = self.mix(y)
        return m.reshape(y.shape[:-1] + (HEADS * HEAD_DIM,))


# --------------------------------------------------------------------------------------------------
# Gemma-style attention: einsum kernels with output axes first; grouped (fused) kv

GEMMA_LAYOUTS = {"q_einsum": "oio", "kv_einsum": "ooio", "attn_vec_einsum": "iio"}


def _gqa(q, k, v):
    """Grouped-query attention on (B, T, heads, head_dim) q and (B, S, kv_heads, head_dim) k/v."""
    k = jnp.repeat(k, HEADS // KV_HEADS, axis=2)
    v = jnp.repeat(v, HEADS // KV_HEADS, axis=2)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(HEAD_DIM)
    return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v)


class LinenGemmaAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((HEADS, D, HEAD_DIM), "BTD,NDH->BTNH", use_bias=False, name="q_einsum")(x)
        kv = nn.Einsum(
            (2, KV_HEADS, D, HEAD_DIM), "BSD,CKDH->CBSKH", use_bias=False, name="kv_einsum"
        )(x)
        enc = _gqa(q, kv[0], kv[1])
        out = nn.Einsum((HEADS, HEAD_DIM, D), "BTNH,NHD->BTD", use_bias=False,
                        name="attn_vec_einsum")  # fmt: skip
        return x + out(enc)


class NnxGemmaAttention(nnx.Module):
    def __init__(self, rngs):
        self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (HEADS, D, HEAD_DIM), rngs=rngs)
        self.kv_einsum = nnx.Einsum("BSD,CKDH->CBSKH", (2, KV_HEADS, D, HEAD_DIM), rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (HEADS, HEAD_DIM, D), rngs=rngs)

    def __call__(self, x):
        kv = self.kv_einsum(x)
        return x + self.attn_vec_einsum(_gqa(self.q_einsum(x), kv[0], kv[1]))


# --------------------------------------------------------------------------------------------------
# Convolutions: Conv (2-D), ConvTranspose (2-D), ConvLocal (1-D, linen only)

CONV_LAYOUTS = {"conv1": "wwio", "conv2": "wwio"}
CONV_T_LAYOUTS = {"down": "wwio", "up": "wwio"}


class LinenConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(8, (3, 3), padding="SAME", name="conv1")(x))
        return nn.Conv(4, (3, 3), strides=2, padding="SAME", name="conv2")(h)


class NnxConv(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(8, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)

    def __call__(self, x):
        return self.conv2(nnx.relu(self.conv1(x)))


class LinenConvTranspose(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(8, (3, 3), strides=2, name="down")(x))
        return nn.ConvTranspose(4, (3, 3), strides=(2, 2), name="up")(h)


class NnxConvTranspose(nnx.Module):
    def __init__(self, rngs):
        self.down = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.up = nnx.ConvTranspose(8, 4, (3, 3), strides=2, rngs=rngs)

    def __call__(self, x):
        return self.up(jnp.tanh(self.down(x)))


class LinenConvLocal(nn.Module):
    """``ConvLocal``'s kernel is (positions, window * in, out): unshared weights per position."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.ConvLocal(8, (3,), padding="SAME", name="local")(x))
        return nn.Dense(4, name="head")(h)


# --------------------------------------------------------------------------------------------------
# Embeddings: scaled (Gemma), tied through Embed.attend, tied by hand (x @ embedding.T)


class LinenScaledEmbed(nn.Embed):
    """Gemma's embedder: the looked-up rows times sqrt(d)."""

    def __call__(self, inputs):
        return super().__call__(inputs) * math.sqrt(self.features)


class NnxScaledEmbed(nnx.Embed):
    def __call__(self, inputs):
        return super().__call__(inputs) * math.sqrt(self.features)


class LinenScaledEmbedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = LinenScaledEmbed(VOCAB, D, name="embed")(ids)
        return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm(name="norm")(x))


class NnxScaledEmbedLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = NnxScaledEmbed(VOCAB, D, rngs=rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, ids):
        return self.lm_head(self.norm(self.embed(ids)))


class LinenTiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, D, name="embed")
        x = embed(ids)
        x = x + nn.Dense(D, name="mlp")(nn.LayerNorm(name="norm")(x))
        return embed.attend(x)


class NnxTiedLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        return self.embed.attend(x + self.mlp(self.norm(x)))


class LinenManualTiedLM(nn.Module):
    def setup(self):
        self.embed = nn.Embed(VOCAB, D)
        self.mlp = nn.Dense(D)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + jnp.tanh(self.mlp(x))
        return x @ self.embed.embedding.T


class NnxManualTiedLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + jnp.tanh(self.mlp(x))
        return x @ self.embed.embedding[...].T


# --------------------------------------------------------------------------------------------------
# Recurrent cells, run over the sequence by RNN


class LinenLSTM(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.RNN(nn.OptimizedLSTMCell(D), name="rnn")(x)
        return nn.Dense(4, name="head")(h)


class LinenGRU(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.RNN(nn.GRUCell(D), name="rnn")(x)
        return nn.Dense(4, name="head")(h)


class NnxLSTM(nnx.Module):
    def __init__(self, rngs):
        self.rnn = nnx.RNN(nnx.LSTMCell(D, D, rngs=rngs))
        self.head = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(self.rnn(x))


class NnxGRU(nnx.Module):
    def __init__(self, rngs):
        self.rnn = nnx.RNN(nnx.GRUCell(D, D, rngs=rngs))
        self.head = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(self.rnn(x))


# --------------------------------------------------------------------------------------------------
# Scanned stacks of blocks: stacked kernels (layers, in, out)

DEPTH = 3
SCAN_LAYOUTS = {"fc1": "sio", "fc2": "sio"}


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(2 * D, name="fc1")(nn.LayerNorm(name="norm")(x))
        return x + nn.Dense(D, name="fc2")(nn.gelu(h)), None


class LinenScanStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            LinenBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=DEPTH,
        )
        return stack(name="layers")(x, None)[0]


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(nnx.gelu(self.fc1(self.norm(x))))


class NnxScanStack(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=DEPTH)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_blocks(rngs):
            return NnxBlock(rngs)

        self.layers = create_blocks(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        return forward(x, self.layers)


# --------------------------------------------------------------------------------------------------
# A kernel read by hand: a custom layer holding its own "kernel"


class LinenRawProj(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        return x @ kernel


class LinenRawKernel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LinenRawProj(4, name="proj")(jnp.tanh(nn.Dense(D, name="fc")(x)))


class NnxRawProj(nnx.Module):
    def __init__(self, in_features, out_features, rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)))

    def __call__(self, x):
        return x @ self.kernel[...]


class NnxRawKernel(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.proj = NnxRawProj(D, 4, rngs)

    def __call__(self, x):
        return self.proj(jnp.tanh(self.fc(x)))


# --------------------------------------------------------------------------------------------------
# A parent that reads a child layer's attributes and reuses its kernel (weight sharing)


class LinenKernelReads(nn.Module):
    def setup(self):
        self.fc = nn.Dense(D)
        self.out = nn.Dense(4)

    def __call__(self, x):
        h = jnp.tanh(self.fc(x))
        kernel = self.fc.variables["params"]["kernel"]  # shared: fc applied a second time
        h = jnp.tanh(h @ kernel) + h
        h = h.reshape(h.shape[:-1] + (self.fc.features // 2, 2)).sum(-1)
        return self.out(jnp.concatenate([h, h], axis=-1))


class NnxKernelReads(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.out = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        assert x.shape[-1] == self.fc.in_features
        h = jnp.tanh(self.fc(x))
        h = jnp.tanh(h @ self.fc.kernel[...] + _bias(self.fc.bias[...], h)) + h
        h = h.reshape(h.shape[:-1] + (self.fc.kernel.shape[-1] // 2, 2)).sum(-1)
        assert h.shape[-1] * 2 == self.out.in_features == self.fc.out_features
        return self.out(jnp.concatenate([h, h], axis=-1))


# --------------------------------------------------------------------------------------------------
# A Dense subclass that post-processes its parent class's output


class LinenDoubledDense(nn.Dense):
    def __call__(self, inputs):
        return super().__call__(inputs) * 2.0


class NnxDoubledLinear(nnx.Linear):
    def __call__(self, inputs):
        return super().__call__(inputs) * 2.0


class LinenSubclassNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(jnp.tanh(LinenDoubledDense(D, name="fc")(x)))


class NnxSubclassNet(nnx.Module):
    def __init__(self, rngs):
        self.fc = NnxDoubledLinear(D, D, rngs=rngs)
        self.out = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.fc(x)))


# --------------------------------------------------------------------------------------------------


def _case(name, linen_build, nnx_build, **config):
    cases = [Case(name, "linen", linen_build, **config)]
    if nnx_build is not None:
        cases.append(Case(name, "nnx", nnx_build, **config))
    return cases


CASES: list[Case] = [
    *_case(
        "mlp_norm_dropout",
        lambda: _linen(LinenMlpNormDropout(), _x(), rngs=DROPOUT_RNGS),
        lambda: _nnx(NnxMlpNormDropout, _x()),
    ),
    *_case(
        "batchnorm_train",
        lambda: _linen(LinenBatchNorm(), _x(), train=True, mutable=["batch_stats"]),
        lambda: _nnx(NnxBatchNorm, _x()),
    ),
    *_case(
        "attention",
        lambda: _linen(LinenAttentionBlock(), _x()),
        lambda: _nnx(NnxAttentionBlock, _x()),
        layouts=MHA_LAYOUTS,
    ),
    *_case(
        "general",
        lambda: _linen(LinenGeneral(), _x()),
        lambda: _nnx(NnxGeneral, _x()),
        layouts=GENERAL_LAYOUTS,
    ),
    *_case(
        "gemma_attention",
        lambda: _linen(LinenGemmaAttention(), _x()),
        lambda: _nnx(NnxGemmaAttention, _x()),
        layouts=GEMMA_LAYOUTS,
    ),
    *_case(
        "conv",
        lambda: _linen(LinenConv(), _image()),
        lambda: _nnx(NnxConv, _image()),
        layouts=CONV_LAYOUTS,
    ),
    *_case(
        "conv_transpose",
        lambda: _linen(LinenConvTranspose(), _image()),
        lambda: _nnx(NnxConvTranspose, _image()),
        layouts=CONV_T_LAYOUTS,
    ),
    *_case(
        "conv_local",
        lambda: _linen(LinenConvLocal(), _x(8)),
        None,  # NNX has no ConvLocal
        layouts={"local": "wio"},
    ),
    *_case(
        "scaled_embed",
        lambda: _linen(LinenScaledEmbedLM(), _ids()),
        lambda: _nnx(NnxScaledEmbedLM, _ids()),
    ),
    *_case(
        "tied_embed_attend",
        lambda: _linen(LinenTiedLM(), _ids()),
        lambda: _nnx(NnxTiedLM, _ids()),
    ),
    *_case(
        "tied_embed_by_hand",
        lambda: _linen(LinenManualTiedLM(), _ids()),
        lambda: _nnx(NnxManualTiedLM, _ids()),
    ),
    *_case("lstm", lambda: _linen(LinenLSTM(), _x()), lambda: _nnx(NnxLSTM, _x())),
    *_case("gru", lambda: _linen(LinenGRU(), _x()), lambda: _nnx(NnxGRU, _x())),
    *_case(
        "scan_stack",
        lambda: _linen(LinenScanStack(), _x()),
        lambda: _nnx(NnxScanStack, _x()),
        layouts=SCAN_LAYOUTS,
    ),
    *_case(
        "raw_kernel",
        lambda: _linen(LinenRawKernel(), _x()),
        lambda: _nnx(NnxRawKernel, _x()),
    ),
    *_case(
        "kernel_reads",
        lambda: _linen(LinenKernelReads(), _x()),
        lambda: _nnx(NnxKernelReads, _x()),
    ),
    *_case(
        "dense_subclass",
        lambda: _linen(LinenSubclassNet(), _x()),
        lambda: _nnx(NnxSubclassNet, _x()),
    ),
]

BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES)
