"""The models of ``test_fused.py``: each adapted layer is one dense kind of linen or NNX, and each
table entry says how many calls take the fast path (``custom_vjp`` calls in the forward jaxpr)."""

from __future__ import annotations

import flax.linen as nn
from flax import nnx

D, H = 8, 2


class LinenDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(nn.tanh(nn.Dense(D, name="fc")(x)))


class LinenDenseGeneral(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((H, D // H), name="split")(x)  # (…, D) -> (…, H, D/H)
        return nn.DenseGeneral(4, axis=(-2, -1), name="merge")(nn.tanh(h))


class LinenEinsum(nn.Module):
    """Two einsums that are dense layers on trailing axes (fast path) and one that is not."""

    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((D, H, D // H), "btd,dnh->btnh", name="split")(x)
        y = nn.Einsum((H, D // H, D), "btnh,nhd->btd", name="merge")(nn.tanh(h))
        return nn.Einsum((H, D, 2), "btd,ndk->btnk", name="heads")(nn.tanh(y))  # layout oio


class LinenAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(H, name="attn")(x, x)


class LinenScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return nn.tanh(nn.Dense(D, name="fc")(x)), None

        stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True,
                        "dropout": True}, length=3)  # fmt: skip
        return stack(name="layers")(x, None)[0]


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.split = nnx.LinearGeneral(D, (H, D // H), rngs=rngs)
        self.merge = nnx.LinearGeneral((H, D // H), 4, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        return self.merge(nnx.tanh(self.split(nnx.tanh(self.fc(x)))))


class NnxEinsum(nnx.Module):
    def __init__(self, rngs):
        self.split = nnx.Einsum("btd,dnh->btnh", (D, H, D // H), (H, D // H), rngs=rngs)
        self.merge = nnx.Einsum("btnh,nhd->btd", (H, D // H, D), (D,), rngs=rngs)
        self.heads = nnx.Einsum("btd,ndk->btnk", (H, D, 2), (H, 2), rngs=rngs)

    def __call__(self, x):
        return self.heads(nnx.tanh(self.merge(nnx.tanh(self.split(x)))))


class NnxAttention(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(H, D, decode=False, rngs=rngs)

    def __call__(self, x):
        return self.attn(x)


class NnxScan(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(D, D, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return nnx.tanh(layer(x))

        return body(x, self.layers)


LINEN = {
    "dense": (LinenDense, 2),
    "dense_general": (LinenDenseGeneral, 2),
    "einsum": (LinenEinsum, 2),
    "attention": (LinenAttention, 4),
    "scan": (LinenScan, 2),  # nn.scan traces its body twice: two calls in the jaxpr, one layer
}
NNX = {
    "mlp": (NnxMlp, 3),
    "einsum": (NnxEinsum, 2),
    "attention": (NnxAttention, 4),
    "scan": (NnxScan, 1),
}
