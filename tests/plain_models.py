"""Small plain-JAX models (functions of a nested-dict params pytree) for ``jaxlora.factored``.

Each builder returns a :class:`Case`: the function, its params, its inputs, the LoRA targets and
the layouts its N-D kernels need. Shapes are tiny: the tests compile each model a few times.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Case:
    fn: Callable[..., Any]
    params: dict[str, Any]
    args: tuple[Any, ...]
    targets: list[str]
    layouts: dict[str, str] = dataclasses.field(default_factory=dict)
    float_input: bool = True  # whether args[0] takes a gradient


def _normal(rng: np.random.Generator, shape, scale=0.5) -> jax.Array:
    """Drawn with numpy: building a case compiles nothing."""
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _keys(n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(seed) for seed in range(n)]


def mlp() -> Case:
    k = _keys(4)
    params = {"fc1": {"kernel": _normal(k[0], (4, 8)), "bias": _normal(k[1], (8,))},
              "fc2": {"kernel": _normal(k[2], (8, 3))}}  # fmt: skip

    def fn(p, x):
        return jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"][None]) @ p["fc2"]["kernel"]

    return Case(fn, params, (_normal(k[3], (2, 4)),), ["fc1", "fc2"])


def transposed() -> Case:
    """A weight stored (out, in), as PyTorch and Equinox store it, used as ``x @ W.T``."""
    k = _keys(2)
    params = {"proj": {"kernel": _normal(k[0], (3, 5))}}
    return Case(lambda p, x: jnp.tanh(x @ p["proj"]["kernel"].T), params,
                (_normal(k[1], (2, 5)),), ["proj"])  # fmt: skip


def cnn() -> Case:
    k = _keys(3)
    params = {"conv": {"kernel": _normal(k[0], (3, 3, 2, 4))},
              "head": {"kernel": _normal(k[1], (4, 3))}}  # fmt: skip

    def fn(p, x):
        h = lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        return jnp.mean(jax.nn.relu(h), axis=(1, 2)) @ p["head"]["kernel"]

    return Case(fn, params, (_normal(k[2], (2, 5, 5, 2)),), ["conv", "head"], {"conv": "wwio"})


def attention() -> Case:
    """Multi-head attention by einsum, kernels (d, heads, head_dim) and (heads, head_dim, d)."""
    k = _keys(5)
    d, h, hd = 6, 2, 3
    params = {n: {"kernel": _normal(kk, (d, h, hd))} for n, kk in zip("qkv", k[:3], strict=True)}
    params["o"] = {"kernel": _normal(k[3], (h, hd, d))}

    def fn(p, x):
        q, kk, v = (jnp.einsum("btd,dhk->bthk", x, p[n]["kernel"]) for n in "qkv")
        w = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, kk) / hd**0.5, axis=-1)
        return jnp.einsum("bthk,hkd->btd", jnp.einsum("bhts,bshk->bthk", w, v), p["o"]["kernel"])

    layouts = {"q|k|v": "ioo", "o": "iio"}
    return Case(fn, params, (_normal(k[4], (2, 4, d)),), ["q", "k", "v", "o"], layouts)


def scanned() -> Case:
    """A stack of layers run with ``lax.scan`` over the stacked kernel."""
    k = _keys(2)
    params = {"layers": {"kernel": _normal(k[0], (3, 4, 4))}}

    def fn(p, x):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["kernel"])[0]

    return Case(fn, params, (_normal(k[1], (2, 4)),), ["layers"], {"layers": "sio"})


def fori() -> Case:
    """The same stack indexed layer by layer inside ``lax.fori_loop``."""
    case = scanned()

    def fn(p, x):
        w = p["layers"]["kernel"]
        return lax.fori_loop(0, w.shape[0], lambda i, h: jnp.tanh(h @ w[i]), x)

    return dataclasses.replace(case, fn=fn)


def rematted() -> Case:
    case = mlp()

    def fn(p, x):
        block = jax.checkpoint(lambda h: jnp.tanh(h @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"])
        return block(x)

    return dataclasses.replace(case, fn=fn)


@jax.custom_vjp
def _scaled_matmul(x, w):
    return 2.0 * (x @ w)


def _scaled_fwd(x, w):
    return _scaled_matmul(x, w), (x, w)


def _scaled_bwd(res, g):
    x, w = res
    return 2.0 * (g @ w.T), 2.0 * (x.T @ g)


_scaled_matmul.defvjp(_scaled_fwd, _scaled_bwd)


def custom_vjp() -> Case:
    case = mlp()

    def fn(p, x):
        return _scaled_matmul(jnp.tanh(x @ p["fc1"]["kernel"]), p["fc2"]["kernel"])

    return dataclasses.replace(case, fn=fn)


def shared_uses() -> Case:
    """A kernel used in a matmul and in its own norm; an embedding looked up and tied to the
    output head."""
    k = _keys(3)
    params = {"proj": {"kernel": _normal(k[0], (5, 5))},
              "embed": {"embedding": _normal(k[1], (7, 5))}}  # fmt: skip

    def fn(p, ids):
        table, w = p["embed"]["embedding"], p["proj"]["kernel"]
        h = table[ids] @ w / jnp.sqrt(jnp.sum(w * w))
        return h @ table.T

    ids = jnp.asarray(k[2].integers(0, 7, (2, 3)), jnp.int32)
    return Case(fn, params, (ids,), ["proj", "embed"], float_input=False)


# A small Llama: RMSNorm, rotary positions, causal multi-head attention, SwiGLU MLP; its layers
# stacked (leading axis) and run with lax.scan; an untied output head.


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    inverse = lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * inverse * scale.reshape((1,) * (x.ndim - 1) + (-1,))


def rotary(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding of ``x`` (batch, seq, heads, head_dim), half-split form."""
    seq, half = x.shape[1], x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None]
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def llama_layer(x: jax.Array, p: dict[str, Any], heads: int) -> jax.Array:
    b, t, d = x.shape
    h = rms_norm(x, p["attn_norm"]["scale"])
    split = lambda y: y.reshape(b, t, heads, -1)  # noqa: E731
    q = rotary(split(h @ p["q_proj"]["kernel"]))
    k = rotary(split(h @ p["k_proj"]["kernel"]))
    v = split(h @ p["v_proj"]["kernel"])
    scores = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal[None, None], scores, -1e9), axis=-1)
    attn = jnp.einsum("bhts,bshk->bthk", weights, v).reshape(b, t, d)
    x = x + attn @ p["o_proj"]["kernel"]
    h = rms_norm(x, p["mlp_norm"]["scale"])
    gated = jax.nn.silu(h @ p["gate_proj"]["kernel"]) * (h @ p["up_proj"]["kernel"])
    return x + gated @ p["down_proj"]["kernel"]


def llama_forward(params: dict[str, Any], ids: jax.Array, heads: int = 2) -> jax.Array:
    """Token ids (batch, seq) -> logits (batch, seq, vocab)."""
    x = params["embed"]["embedding"][ids]
    x = lax.scan(lambda x, p: (llama_layer(x, p, heads), None), x, params["layers"])[0]
    return rms_norm(x, params["norm"]["scale"]) @ params["lm_head"]["kernel"]


LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_params(seed: int, vocab=11, d=8, layers=2, mlp=12) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
              "gate_proj": (d, mlp), "up_proj": (d, mlp), "down_proj": (mlp, d)}  # fmt: skip
    stack: dict[str, Any] = {n: {"kernel": _normal(rng, (layers, *s), 0.3)}
                             for n, s in shapes.items()}  # fmt: skip
    stack["attn_norm"] = {"scale": 1.0 + _normal(rng, (layers, d), 0.1)}
    stack["mlp_norm"] = {"scale": 1.0 + _normal(rng, (layers, d), 0.1)}
    return {"embed": {"embedding": _normal(rng, (vocab, d))}, "layers": stack,
            "norm": {"scale": jnp.ones((d,))},
            "lm_head": {"kernel": _normal(rng, (d, vocab))}}  # fmt: skip


def llama() -> Case:
    params = llama_params(1)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 5)), jnp.int32)
    layouts = {"layers/.*": "sio"}
    return Case(llama_forward, params, (ids,), LLAMA_PROJECTIONS + ["lm_head"], layouts,
                float_input=False)  # fmt: skip


CASES: dict[str, Callable[[], Case]] = {
    "mlp": mlp,
    "transposed": transposed,
    "cnn": cnn,
    "attention": attention,
    "scan": scanned,
    "fori_loop": fori,
    "remat": rematted,
    "custom_vjp": custom_vjp,
    "shared_uses": shared_uses,
    "llama": llama,
}
