"""A Dense layer on a narrow stored kernel, cast a block of columns at a time (forward/chunked).

Laws: the layer's outputs and gradients, for every shape and block size; and no float32 copy of
the whole kernel in XLA's temporaries.
"""

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxlora
from jaxlora._src.forward import chunked
from jaxlora.models.llama import LlamaConfig, LlamaForCausalLM
from tests.treeutil import assert_trees_close

pytestmark = pytest.mark.standard_dtypes  # a bf16 kernel under float32 compute is the point


def _plain(x, kernel):
    return x @ kernel.astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _blocked_and_plain(rows, n_in, n_out, block, lead, transposed):
    """Outputs and gradients of the blocked and the plain layer on one drawn case, data drawn
    inside: one compiled program a case (eagerly, every op of every new shape compiled alone)."""
    keys = jax.random.split(jax.random.key(rows * 1000 + n_in * 100 + n_out), 3)
    x = jax.random.normal(keys[0], (*lead, rows, n_in))
    shape = (n_out, n_in) if transposed else (n_in, n_out)
    kernel = jax.random.normal(keys[1], shape).astype(jnp.bfloat16)
    probe = jax.random.normal(keys[2], (*lead, rows, n_out))

    def loss(fn):
        return lambda x, k: jnp.sum(jnp.sin(fn(x, k)) * probe)

    blocked = lambda x, k: chunked.dense(x, k, block, None, transposed)  # noqa: E731
    plain = (lambda x, k: _plain(x, k.T)) if transposed else _plain
    outputs = blocked(x, kernel), plain(x, kernel)
    grads = (jax.grad(loss(fn), argnums=(0, 1))(x, kernel) for fn in (blocked, plain))
    return outputs, tuple(grads)


@given(
    rows=st.integers(1, 5),
    n_in=st.integers(1, 9),
    n_out=st.integers(1, 23),
    block=st.integers(1, 30),
    lead=st.sampled_from([(), (2,)]),
    transposed=st.booleans(),
)
@pytest.mark.slow
def test_outputs_and_gradients_are_the_plain_layers(rows, n_in, n_out, block, lead, transposed):
    (y, y_plain), (grads, grads_plain) = _blocked_and_plain(
        rows, n_in, n_out, block, lead, transposed
    )
    assert_trees_close(y, y_plain, rtol=1e-6, atol=1e-6)
    assert_trees_close(grads, grads_plain, rtol=1e-2, atol=1e-5)  # kernel gradient rounded to bf16
    assert grads[1].dtype == jnp.bfloat16


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.slow
def test_interceptor_gives_the_layers_outputs_and_gradients(use_bias, use_jit):
    head, x = nn.Dense(300, use_bias=use_bias), jax.random.normal(jax.random.key(0), (3, 4, 64))
    params = head.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)

    def loss(params, x, blocked):
        if not blocked:
            return jnp.sum(jnp.tanh(head.apply({"params": params}, x)))
        with nn.intercept_methods(chunked.blocked_cast_interceptor(block_bytes=64 * 4 * 128)):
            return jnp.sum(jnp.tanh(head.apply({"params": params}, x)))

    fn = jax.value_and_grad(loss, argnums=(0, 1))
    if use_jit:
        fn = jax.jit(fn, static_argnums=2)
    (value, grads), (value_blocked, grads_blocked) = fn(params, x, False), fn(params, x, True)
    assert_trees_close(value_blocked, value, rtol=1e-6)
    assert_trees_close(grads_blocked, grads, rtol=2e-2, atol=1e-4)  # bf16 param gradients


@pytest.mark.slow
def test_interceptor_runs_a_tied_embedding_head_in_blocks():
    """``Embed.attend`` on a bf16 table: the layer's value and gradients, and no float32 copy of
    the whole table in XLA's temporaries."""
    table = nn.Embed(8192, 128)
    x = jax.random.normal(jax.random.key(0), (3, 128))
    params = table.init(jax.random.key(1), jnp.zeros((1,), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)

    def loss(params, x, blocked):
        call = lambda: table.apply({"params": params}, x, method="attend")  # noqa: E731
        if not blocked:
            return jnp.sum(jnp.tanh(call()))
        with nn.intercept_methods(chunked.blocked_cast_interceptor(block_bytes=2**17)):
            return jnp.sum(jnp.tanh(call()))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (value, grads), (value_blocked, grads_blocked) = fn(params, x, False), fn(params, x, True)
    assert_trees_close(value_blocked, value, rtol=1e-6)
    assert_trees_close(grads_blocked, grads, rtol=2e-2, atol=1e-4)
    # The table is frozen (as under LoRA): only the input's gradient, which needs the table too.
    plain_temp, blocked_temp = (
        _temp_bytes(lambda p, x, b=blocked: jax.grad(loss, argnums=1)(p, x, b), params, x)
        for blocked in (False, True)
    )
    table_copy = 4 * 8192 * 128  # 4 MiB
    assert plain_temp >= table_copy
    assert blocked_temp < plain_temp - table_copy / 2


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_no_float32_copy_of_the_kernel():
    x = jax.random.normal(jax.random.key(0), (16, 512))
    kernel = jax.random.normal(jax.random.key(1), (512, 8192)).astype(jnp.bfloat16)
    full_copy = 4 * kernel.size  # 16 MiB

    def grad(fn):
        return jax.grad(lambda x, k: jnp.sum(jnp.tanh(fn(x, k))))

    assert _temp_bytes(grad(_plain), x, kernel) >= full_copy
    blocked = lambda x, k: chunked.dense(x, k, 1024)  # noqa: E731  # 2 MiB blocks
    assert _temp_bytes(grad(blocked), x, kernel) < full_copy / 4


@pytest.mark.slow
def test_apply_casts_a_bf16_head_in_blocks(monkeypatch):
    """Through ``jaxlora.apply`` on a bf16 base: same loss and LoRA gradients as without the
    blocks, and the head's float32 copy is gone from the temporaries."""
    sizes = dict(vocab_size=8192, hidden_size=128, intermediate_size=256, num_layers=2)
    cfg = LlamaConfig(**sizes, num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(3), (2, 16), 0, cfg.vocab_size)
    params = model.init(jax.random.key(0), ids)["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    config = jaxlora.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    lora = jax.tree.map(lambda p: p.astype(jnp.float32), lora)

    def value_and_grad(blocked):
        def loss(lora, frozen):
            if blocked:
                logits = jaxlora.apply(model, frozen, lora, config, ids)
            else:  # the same factored forward, without the blocks
                with nn.intercept_methods(jaxlora.lora_interceptor(config)):
                    tree = {"params": jaxlora.adapted_params(frozen, lora, config)}
                    logits = model.apply(tree, ids)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        # One compile serves both the run and XLA's accounting of its temporaries.
        compiled = jax.jit(jax.value_and_grad(loss)).lower(lora, frozen).compile()
        return compiled, compiled.memory_analysis().temp_size_in_bytes

    monkeypatch.setattr(chunked, "DEFAULT_BLOCK_BYTES", 2**20)  # the 4 MiB head in 4 blocks
    blocked, blocked_temp = value_and_grad(blocked=True)
    plain, plain_temp = value_and_grad(blocked=False)
    (value, grads), (value_blocked, grads_blocked) = plain(lora, frozen), blocked(lora, frozen)
    assert_trees_close(value_blocked, value, rtol=1e-6)
    assert_trees_close(grads_blocked, grads, rtol=1e-5, atol=1e-7)
    head_copy = 4 * cfg.hidden_size * cfg.vocab_size  # 4 MiB
    assert blocked_temp < plain_temp - head_copy / 2, (blocked_temp, plain_temp, head_copy)


def _compile_seconds(n_out):
    """Seconds to compile a bf16 ``Dense`` of ``n_out`` columns asked to run one column a block."""
    head, x = nn.Dense(n_out, use_bias=False), jnp.ones((2, 16))
    params = {"params": {"kernel": jnp.ones((16, n_out), jnp.bfloat16)}}

    def forward(params):
        with nn.intercept_methods(chunked.blocked_cast_interceptor(block_bytes=1)):
            return head.apply(params, x)

    start = time.perf_counter()
    jax.jit(forward).lower(params).compile()
    return time.perf_counter() - start


@pytest.mark.slow
def test_block_count_is_bounded():
    """One column a block is asked for; a layer 128 times wider compiles about as fast, because at
    most ``MAX_BLOCKS`` blocks are unrolled (without the bound: 128 times the program)."""
    head, x = nn.Dense(1000, use_bias=False), jax.random.normal(jax.random.key(0), (2, 64))
    params = {"params": {"kernel": jax.random.normal(jax.random.key(1), (64, 1000), jnp.bfloat16)}}
    with nn.intercept_methods(chunked.blocked_cast_interceptor(block_bytes=1)):
        y = jax.jit(head.apply)(params, x)
    assert_trees_close(y, _plain(x, params["params"]["kernel"]), rtol=1e-5, atol=1e-5)
    _compile_seconds(chunked.MAX_BLOCKS)  # warm up
    narrow = _compile_seconds(chunked.MAX_BLOCKS)
    assert _compile_seconds(128 * chunked.MAX_BLOCKS) < 4 * narrow + 1.0


def test_errors():
    with pytest.raises(ValueError, match="`block_bytes` must be a positive int"):
        chunked.blocked_cast_interceptor(block_bytes=0)
