"""The benchmark GPT of ``models_gpt.py`` in Equinox: the model of the ``equinox`` group.

The same architecture, sizes and parameter count as the linen ``models_gpt.GPT``: pre-LayerNorm
blocks of ``eqx.nn.Linear`` layers named ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` /
``fc_in`` / ``fc_out``, ``eqx.nn.LayerNorm`` (epsilon 1e-6, Flax's), learned positions and a head
tied to the token embedding (``eqx.nn.Embedding``), so ``"all-linear"`` takes the same 6 kernels
per block. As Equinox layers do, the model maps one sequence ``int[seq]`` to ``float[seq, vocab]``;
the benchmark ``jax.vmap`` s it over the batch.

:func:`from_params` builds it from the linen GPT's ``params`` (each ``kernel`` ``(in, out)``
transposed into Equinox's ``weight`` ``(out, in)``), so the ``equinox``, ``linen`` and ``plain``
groups time the very same function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from experiments.benchmarks.models_gpt import GPTConfig

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")
_EPS = 1e-6  # Flax's nn.LayerNorm default (Equinox's is 1e-5)


class Block(eqx.Module):
    ln_1: eqx.nn.LayerNorm
    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    ln_2: eqx.nn.LayerNorm
    fc_in: eqx.nn.Linear
    fc_out: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, c: GPTConfig, key: jax.Array):
        keys = jax.random.split(key, 6)
        self.ln_1 = eqx.nn.LayerNorm(c.d_model, eps=_EPS)
        self.q_proj = eqx.nn.Linear(c.d_model, c.d_model, key=keys[0])
        self.k_proj = eqx.nn.Linear(c.d_model, c.d_model, key=keys[1])
        self.v_proj = eqx.nn.Linear(c.d_model, c.d_model, key=keys[2])
        self.o_proj = eqx.nn.Linear(c.d_model, c.d_model, key=keys[3])
        self.ln_2 = eqx.nn.LayerNorm(c.d_model, eps=_EPS)
        self.fc_in = eqx.nn.Linear(c.d_model, c.mlp, key=keys[4])
        self.fc_out = eqx.nn.Linear(c.mlp, c.d_model, key=keys[5])
        self.heads = c.heads

    def __call__(self, x: jax.Array) -> jax.Array:
        seq, d_model = x.shape
        h = jax.vmap(self.ln_1)(x)
        split = lambda t: t.reshape(seq, self.heads, d_model // self.heads)  # noqa: E731
        q, k, v = (split(jax.vmap(layer)(h)) for layer in (self.q_proj, self.k_proj, self.v_proj))
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + jax.vmap(self.o_proj)(attn.reshape(seq, d_model))
        h = jax.nn.gelu(jax.vmap(self.fc_in)(jax.vmap(self.ln_2)(x)), approximate=True)
        return x + jax.vmap(self.fc_out)(h)


class GPT(eqx.Module):
    """Token ids ``int[seq]`` -> logits ``float[seq, vocab]``."""

    wte: eqx.nn.Embedding
    wpe: eqx.nn.Embedding
    layers: list[Block]
    ln_f: eqx.nn.LayerNorm

    def __init__(self, c: GPTConfig, key: jax.Array):
        keys = jax.random.split(key, c.layers + 2)
        self.wte = eqx.nn.Embedding(c.vocab, c.d_model, key=keys[0])
        self.wpe = eqx.nn.Embedding(c.seq, c.d_model, key=keys[1])
        self.layers = [Block(c, k) for k in keys[2:]]
        self.ln_f = eqx.nn.LayerNorm(c.d_model, eps=_EPS)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jax.vmap(self.wte)(ids) + jax.vmap(self.wpe)(jnp.arange(ids.shape[0]))
        for layer in self.layers:
            x = layer(x)
        return jax.vmap(self.ln_f)(x) @ self.wte.weight.T


def from_params(params: Mapping[str, Any], config: GPTConfig) -> GPT:
    """The Equinox GPT holding the linen ``models_gpt.GPT``'s ``params``: the same function."""
    # Shapes only: every array leaf is replaced below, so none is initialised.
    model = eqx.filter_eval_shape(GPT, config, jax.random.key(0))

    def where(m: GPT) -> list[jax.Array]:
        leaves = [m.wte.weight, m.wpe.weight, m.ln_f.weight, m.ln_f.bias]
        for block in m.layers:
            leaves += [block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias]
            for name in LINEARS:
                linear = getattr(block, name)
                leaves += [linear.weight, linear.bias]
        return leaves

    values = [params["wte"]["embedding"], params["wpe"]["embedding"], params["ln_f"]["scale"],
              params["ln_f"]["bias"]]  # fmt: skip
    for i in range(config.layers):
        p = params[f"h_{i}"]
        values += [p["ln_1"]["scale"], p["ln_1"]["bias"], p["ln_2"]["scale"], p["ln_2"]["bias"]]
        for name in LINEARS:
            values += [p[name]["kernel"].T, p[name]["bias"]]
    return eqx.tree_at(where, model, values)
