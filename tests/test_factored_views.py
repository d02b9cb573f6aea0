"""``jaxlora.factored`` sees an adapted weight through layout ops and every contraction pattern,
and handles DoRA modules, quantised bases and grad / vmap inside the function.

One function uses two adapted kernels in many ways at once (transposed, reshaped, sliced,
indexed, cast, batched over a stack, on the left of a product); each output and the gradients
must equal the merged path's. One compile covers them all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from tests.treeutil import assert_trees_close

pytestmark = pytest.mark.slow  # one program of many uses and their gradients: seconds to compile


def _uses(p, x4, x6, xs):
    w, s = p["w"]["kernel"], p["s"]["kernel"]  # (4, 6) "io"; (3, 4, 5) "sio"
    return (
        x4 @ w,  # A side: the fused dense call
        x6 @ w.T,  # B side: (x·Bᵀ)·Aᵀ
        jnp.einsum("bo,io->bi", x6, w),  # B side by einsum
        jnp.einsum("bi,ihk->bhk", x4, w.reshape(4, 2, 3)),  # output axis split
        x4[:, :2] @ w[1:3],  # input rows sliced: A sliced
        x4 @ w[:, 2:5],  # output columns sliced: B sliced
        x4 @ s[1],  # one layer of a stack (slice + squeeze)
        jnp.einsum("lbi,lio->lbo", xs, s),  # batched over the stack axis
        jnp.einsum("lbo,loi->lbi", xs[..., :4] @ s, s.transpose(0, 2, 1)),  # both sides
        x4[None] @ w[None],  # unit axes added
        jnp.dot(w, x6[0]),  # the weight on the left, contracted over its output axis
        x4 @ s.reshape(12, 5)[4:8],  # stack and input merged: folded, still exact
        x4 @ jax.nn.relu(w),  # a custom_jvp function of the weight: folded
        jax.jit(lambda a, b: a @ b)(x4, w),  # inside a nested jit
        (x4.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32),  # a cast
    )


def test_every_use_equals_the_merged_weights():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    params = {"w": {"kernel": normal(4, 6)}, "s": {"kernel": normal(3, 4, 5)}}
    config = jaxlora.LoraConfig(r=2, target_modules=["w", "s"], layouts={"s": "sio"})
    _, shapes = jax.eval_shape(lambda p: jaxlora.split(p, config, jax.random.key(0)), params)
    lora = jax.tree.map(lambda s: normal(*s.shape), shapes)
    inputs = (normal(2, 4), normal(2, 6), normal(3, 2, 4))
    factored = jaxlora.factored(_uses, config)

    def both(lora, *inputs):
        merged = lambda t: _uses(jaxlora.merge(params, t, config), *inputs)  # noqa: E731
        ours = lambda t: factored(params, t, *inputs)  # noqa: E731

        # A fixed random projection of each output (a loss whose gradient does not amplify
        # rounding as sin(large y) would); the float32 uses only, the bfloat16 one is checked
        # forward within its own rounding.
        def loss(f):
            def total(t):
                ys = f(t)[:-1]
                keys = jax.random.split(jax.random.key(1), len(ys))
                pairs = zip(keys, ys, strict=True)
                return sum(jnp.sum(y * jax.random.normal(k, y.shape)) for k, y in pairs)

            return total

        return ours(lora), merged(lora), jax.grad(loss(ours))(lora), jax.grad(loss(merged))(lora)

    got, want, grads, grads_want = jax.jit(both)(lora, *inputs)
    assert_trees_close(got[:-1], want[:-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[-1], want[-1], rtol=0.05, atol=0.1)  # bfloat16
    assert_trees_close(grads, grads_want, rtol=1e-4, atol=1e-4)


def test_dora_modules_run_on_their_merged_weight():
    """A variant whose output is not the plain sum (DoRA) reaches the function folded."""
    rng = np.random.default_rng(1)
    params = {"w": {"kernel": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)}}
    config = jaxlora.LoraConfig(r=2, target_modules=["w"], init_lora_weights=False)
    _, lora = jaxlora.split(params, config, jax.random.key(0), variant="dora")
    x = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    fn = lambda p, x: jnp.tanh(x @ p["w"]["kernel"])  # noqa: E731
    got = jaxlora.factored(fn, config)(params, lora, x)
    np.testing.assert_allclose(got, fn(jaxlora.merge(params, lora, config), x), rtol=1e-6)


def test_quantised_base():
    """Adapted and plain quantised kernels reach the function dequantised, as in ``merge``."""
    from tests import plain_models

    case = plain_models.mlp()
    config = jaxlora.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False)
    quantised = jaxlora.quant.quantize(case.params, ["fc1", "fc2"], "int8")
    frozen, lora = jaxlora.quant.split_quantized(quantised, config, jax.random.key(0))
    got = jax.jit(jaxlora.factored(case.fn, config))(frozen, lora, *case.args)
    want = case.fn(jaxlora.merge(frozen, lora, config), *case.args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_inside_grad_and_vmap():
    """``fn`` taking per-example input gradients (``vmap`` of ``grad`` inside it): the
    transposed contractions of the backward pass are factored too; outputs and the outer
    gradient equal the merged path's."""
    from tests import plain_models

    case = plain_models.mlp()
    config = jaxlora.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False)
    frozen, lora = jaxlora.split(case.params, config, jax.random.key(0))

    def fn(p, x):
        return jax.vmap(jax.grad(lambda z: jnp.sum(case.fn(p, z[None]))))(x)

    factored = jaxlora.factored(fn, config)

    def both(t, x):
        loss = lambda f: lambda t: jnp.sum(f(t) ** 2)  # noqa: E731
        ours = lambda t: factored(frozen, t, x)  # noqa: E731
        merged = lambda t: fn(jaxlora.merge(frozen, t, config), x)  # noqa: E731
        return ours(t), merged(t), jax.grad(loss(ours))(t), jax.grad(loss(merged))(t)

    got, want, grads, grads_want = jax.jit(both)(lora, *case.args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, grads_want, rtol=1e-4, atol=1e-5)
