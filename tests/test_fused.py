"""The dense fast path (``jaxlora._src.forward.fused``): one ``custom_vjp`` per adapted dense call.

Laws: the kernel's maths equals autodiff of ``x·W + b + s·(drop(x)·A)·B`` for any shapes, masks and
dtypes; through :func:`jaxlora.apply` every dense layer kind of linen and NNX takes it, with LoRA
dropout on, under scanned stacks, and gives the outputs and gradients of the general path (same
dropout masks) and, without dropout, of the merged path.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxlora
from jaxlora._src.forward import fused
from tests.fused_models import LINEN, NNX, D


def _reference(x, kernel, bias, a, b, keep, scale, rate, precision=None):
    x_lora = fused.apply_mask(x.astype(a.dtype), keep, rate)
    y = x @ kernel.astype(x.dtype) + (scale * ((x_lora @ a) @ b)).astype(x.dtype)
    return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def _grads(fn, x, kernel, bias, a, b, keep, weights):
    def loss(x, bias, a, b):
        y = fn(x, kernel, bias, a, b, keep, 0.5, 0.25, None)
        return jnp.sum(y.astype(jnp.float32) * weights), y

    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, bias, a, b)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _kernel_and_autodiff(key, lead, k, n, r, use_bias, use_dropout):
    """The kernel's and autodiff's outputs and gradients for one drawn case, data drawn inside:
    one compiled program a case (eagerly, every op and every random draw compiled on its own)."""
    keys = jax.random.split(key, 7)
    shape = (*lead, k)
    x = jax.random.normal(keys[0], shape)
    kernel = jax.random.normal(keys[1], (k, n))
    bias = jax.random.normal(keys[2], (n,)) if use_bias else None
    a, b = jax.random.normal(keys[3], (k, r)), jax.random.normal(keys[4], (r, n))
    keep = fused.keep_mask(keys[5], 0.25, shape) if use_dropout else None
    weights = jax.random.normal(keys[6], (*lead, n))
    return (
        _grads(fused.dense, x, kernel, bias, a, b, keep, weights),
        _grads(_reference, x, kernel, bias, a, b, keep, weights),
    )


@pytest.mark.slow
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    k=st.integers(1, 6),
    n=st.integers(1, 5),
    r=st.integers(1, 3),
    use_bias=st.booleans(),
    use_dropout=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_autodiff_for_all_shapes(lead, k, n, r, use_bias, use_dropout, seed):
    (got, y), (want, y_ref) = _kernel_and_autodiff(
        jax.random.key(seed), tuple(lead), k, n, r, use_bias, use_dropout
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        if w is not None:
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "x_dtype,kernel_dtype,factor_dtype",
    [
        (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
        (jnp.bfloat16, jnp.bfloat16, jnp.float32),  # bf16 model, float32 adapter
        (jnp.float32, jnp.bfloat16, jnp.float32),  # bf16 stored base under float32 compute
    ],
)
@pytest.mark.slow  # seconds of compiling: full suite only
def test_kernel_dtypes(x_dtype, kernel_dtype, factor_dtype):
    keys = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(keys[0], (2, 3, 6), x_dtype)
    kernel = jax.random.normal(keys[1], (6, 4), kernel_dtype)
    bias = jax.random.normal(keys[2], (4,), x_dtype)
    a = jax.random.normal(keys[3], (6, 2), factor_dtype)
    b = jax.random.normal(keys[4], (2, 4), factor_dtype)
    keep = fused.keep_mask(keys[5], 0.25, x.shape)
    weights = jnp.ones((2, 3, 4))
    both = jax.jit(lambda *args: (_grads(fused.dense, *args), _grads(_reference, *args)))
    ((dx, dbias, da, db), y), (want, y_ref) = both(x, kernel, bias, a, b, keep, weights)
    assert y.dtype == x_dtype and dx.dtype == x_dtype and dbias.dtype == x_dtype
    assert da.dtype == db.dtype == factor_dtype
    tol = 5e-2 if jnp.bfloat16 in (x_dtype, factor_dtype) else 1e-5
    for g, w in zip((dx, dbias, da, db, y), (*want, y_ref), strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol
        )


def _model(framework, name):
    x = jax.random.normal(jax.random.key(5), (2, 3, D))
    if framework == "linen":
        cls, n_fused = LINEN[name]
        model = cls()
        params = model.init(jax.random.key(0), x)["params"]
        layouts = jaxlora.infer_layouts(model, x)
    else:
        cls, n_fused = NNX[name]
        module = cls(nnx.Rngs(0))
        layouts = jaxlora.infer_layouts(module)
        model, params = nnx.split(module)
    config = jaxlora.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules="all-linear",
        lora_dropout=0.3,
        init_lora_weights=False,
        layouts=layouts,
    )
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    return model, x, frozen, lora, config, n_fused


def _loss(model, x, frozen, config, **kwargs):
    def loss(lora):
        y = jaxlora.apply(model, frozen, lora, config, x, **kwargs)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

    return loss


def _loss_and_grad(model, x, frozen, config, **kwargs):
    return jax.value_and_grad(_loss(model, x, frozen, config, **kwargs), has_aux=True)


def _fused_calls(fn, *args) -> int:
    """How many ``custom_vjp`` calls (fast-path layers) the forward jaxpr of ``fn`` has."""
    return str(jax.make_jaxpr(fn)(*args)).count("custom_vjp_call")


# One case of each framework in the fast core, the rest in the full suite.
CASES = [
    pytest.param(f, n, marks=() if n in ("dense", "mlp") else pytest.mark.slow)
    for f, names in (("linen", LINEN), ("nnx", NNX))
    for n in names
]


@pytest.mark.parametrize("framework,name", CASES)
@pytest.mark.slow  # seconds of compiling: full suite only
def test_fast_path_with_dropout_matches_general_path(framework, name):
    model, x, frozen, lora, config, n_fused = _model(framework, name)
    rngs = {"dropout": jax.random.key(9)}
    assert _fused_calls(_loss(model, x, frozen, config, rngs=rngs), lora) == n_fused

    def loss(lora, key):  # the key an argument: both keys below run one compiled program
        return _loss(model, x, frozen, config, rngs={"dropout": key})(lora)

    fast = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, y_fast), g_fast = fast(lora, rngs["dropout"])
    with fused.disabled():
        assert _fused_calls(_loss(model, x, frozen, config, rngs=rngs), lora) == 0
        general = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, y_general), g_general = general(lora, rngs["dropout"])
    np.testing.assert_allclose(y_fast, y_general, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
                 g_fast, g_general)  # fmt: skip
    # Dropout really acts: another key gives another output.
    (_, y_other), _ = fast(lora, jax.random.key(10))
    assert not np.allclose(y_fast, y_other)


@pytest.mark.parametrize("framework,name", CASES)
def test_fast_path_without_dropout_matches_merged(framework, name):
    model, x, frozen, lora, config, _ = _model(framework, name)
    (_, y_fast), g_fast = jax.jit(_loss_and_grad(model, x, frozen, config))(lora)
    (_, y_merged), g_merged = jax.jit(_loss_and_grad(model, x, frozen, config, mode="merged"))(lora)
    np.testing.assert_allclose(y_fast, y_merged, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
                 g_fast, g_merged)  # fmt: skip


@pytest.mark.slow  # seconds of compiling: full suite only
def test_bf16_model_takes_fast_path():
    model, x, frozen, lora, config, n_fused = _model("linen", "dense")
    frozen = jax.tree.map(lambda p: p.astype(jnp.bfloat16), frozen)
    x = x.astype(jnp.bfloat16)
    forward = lambda t: jnp.sum(jaxlora.apply(model, frozen, t, config, x).astype(float))  # noqa: E731
    assert _fused_calls(forward, lora) == n_fused
    fast = jax.jit(jax.grad(forward))  # jitted: eagerly every op compiles on its own
    with fused.disabled():
        general = jax.jit(
            jax.grad(lambda t: jnp.sum(jaxlora.apply(model, frozen, t, config, x).astype(float)))
        )
        want = general(lora)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=5e-2, atol=5e-2),
                 fast(lora), want)  # fmt: skip


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_keep_mask_statistics(rate):
    key = jax.random.key(11)
    mask = np.asarray(fused.keep_mask(key, rate, (512, 1024)))
    n = mask.size
    assert abs(1 - mask.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)  # 5 sigma
    m = mask.astype(float)
    for a, b in [(m[:, :-1], m[:, 1:]), (m[:-1], m[1:])]:  # neighbours along each axis
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    np.testing.assert_array_equal(mask, fused.keep_mask(key, rate, (512, 1024)))
    other = np.asarray(fused.keep_mask(jax.random.key(12), rate, (512, 1024)))
    assert 0.5 * rate < (mask != other).mean() < 3 * rate  # independent masks differ often
    assert fused.keep_mask(key, 0.0, (3, 4)).all()


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.slow  # seconds of compiling: full suite only
def test_fast_path_under_shard_map(framework):
    """Inside ``shard_map`` the cotangents of replicated inputs (frozen kernel, factors) are
    summed over the data axis, as autodiff would: the gradient equals the merged path's."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    name = "dense" if framework == "linen" else "mlp"
    model, x, frozen, lora, config, _ = _model(framework, name)
    mesh = jax.make_mesh((1,), ("data",))

    def grads(mode):
        def body(lora, frozen, x):
            loss = lambda t: jnp.sum(jaxlora.apply(model, frozen, t, config, x, mode=mode) ** 2)  # noqa: E731
            return jax.grad(loss)(lora)

        sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P())
        put = lambda t, s: jax.device_put(t, NamedSharding(mesh, s))  # noqa: E731
        return jax.jit(sharded)(put(lora, P()), put(frozen, P()), put(x, P("data")))

    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
                 grads("factored"), grads("merged"))  # fmt: skip


@given(
    lead=st.integers(0, 2),
    n_in=st.integers(1, 2),
    n_out=st.integers(0, 2),
    shuffle=st.sampled_from(["none", "contracted", "out", "lead"]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow  # seconds of compiling: full suite only
def test_trailing_contraction_agrees_with_einsum(lead, n_in, n_out, shuffle, seed):
    """Where ``trailing_contraction`` says an equation is a dense layer on ``n`` trailing axes, the
    2-D product the fast path computes equals ``jnp.einsum``; a reordered equation is refused."""
    from jaxlora._src.config import axes_order

    p, c, o = "abc"[:lead], "ijk"[:n_in], "uvw"[:n_out]
    x_spec, k_spec, out = p + c, c + o, p + o
    if shuffle == "contracted" and n_in > 1:
        k_spec = c[::-1] + o
    elif shuffle == "out" and n_out > 1:
        out = p + o[::-1]
    elif shuffle == "lead" and lead > 1:
        out = p[::-1] + o
    spec = f"{x_spec},{k_spec}->{out}"
    reordered = (x_spec, k_spec, out) != (p + c, c + o, p + o)
    got = axes_order.trailing_contraction(spec)
    assert got == (None if reordered else n_in)
    if got is None:
        return
    drawn = np.random.default_rng(seed).integers(1, 4, 9).tolist()
    size = dict(zip("abcijkuvw", drawn, strict=True))
    x = jax.random.normal(jax.random.key(seed), tuple(size[ch] for ch in x_spec))
    kernel = jax.random.normal(jax.random.key(seed + 1), tuple(size[ch] for ch in k_spec))
    k = int(np.prod([size[ch] for ch in c]))
    flat = x.reshape(x.shape[:lead] + (k,)) @ kernel.reshape(k, -1)
    np.testing.assert_allclose(flat.reshape(jnp.einsum(spec, x, kernel).shape),
                               jnp.einsum(spec, x, kernel), rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_einsum_with_a_misshapen_input_raises_as_the_layer_does(framework):
    """An input whose trailing axes hold the kernel's input size in another shape is not reshaped
    into the fast path: the layer itself raises, as it would without an adapter."""
    model, x, frozen, lora, config, _ = _model(framework, "einsum")
    wrong = x.reshape(x.shape[:-1] + (2, D // 2))
    with pytest.raises((ValueError, TypeError)):
        jaxlora.apply(model, frozen, lora, config, wrong)


def test_linen_einsum_without_an_equation_raises_as_the_layer_does():
    """An ``Einsum`` given its equation neither at construction nor at the call raises the layer's
    own ValueError through the fast path (it once failed there on ``None.replace``)."""

    class Net(nn.Module):
        with_equation: bool = True

        @nn.compact
        def __call__(self, x):
            layer = nn.Einsum((D, 3), None, name="e")
            return layer(x, "bd,do->bo") if self.with_equation else layer(x)

    x = jnp.ones((2, D))
    params = Net().init(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(r=2, target_modules=["e"])
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    assert jaxlora.apply(Net(), frozen, lora, config, x).shape == (2, 3)
    with pytest.raises(ValueError, match="einsum_str"):
        jaxlora.apply(Net(with_equation=False), frozen, lora, config, x)
