"""Gradient checkpointing by module path (``jaxlora.remat``, ``jaxlora.apply(..., remat=...)``).

The laws: the same loss and gradients as without it, for every forward path jaxlora has; less
activation memory in XLA's own accounting (compile-time sizes, not timings); and clear errors.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxlora
from jaxlora import quant, remat
from jaxlora.models.bert import BertClassifier, BertConfig
from jaxlora.models.llama import LlamaConfig, LlamaForCausalLM
from tests import linen_models
from tests.treeutil import assert_trees_close

BLOCKS = r"layers_\d+"


@functools.cache  # one model per size for the module (its arrays are immutable)
def _llama(layers=2, hidden=32, intermediate=64):
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate,
                      num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
                      tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
    return model, jax.jit(model.init)(jax.random.key(0), ids)["params"], ids


def _value_and_grad(model, frozen, lora, config, ids, use_jit, **kwargs):
    def loss(lora, checkpointing):
        logits = jaxlora.apply(model, frozen, lora, config, ids, remat=checkpointing, **kwargs)
        return jnp.mean(jnp.sin(logits))

    fn = jax.value_and_grad(loss)
    if use_jit:
        fn = jax.jit(fn, static_argnums=1)
    return fn(lora, None), fn(lora, BLOCKS)


#: Every variant under jit; the factored path and LoRA dropout (whose masks the recomputation
#: must draw again) also eagerly. The other variants change what is recomputed, not how jaxlora
#: enters the blocks, and eager runs are the slowest (every op compiles on its own).
REMAT_VARIANTS = ["factored", "merged", "dropout", "nf4", "dora", "trainable_head", "bf16"]
EAGER_VARIANTS = ["factored", "dropout"]


@pytest.mark.parametrize(
    ("variant", "use_jit"),
    [pytest.param(v, True, id=f"{v}-jit",
                  marks=[pytest.mark.standard_dtypes] if v == "bf16" else [])
     for v in REMAT_VARIANTS]
    + [pytest.param(v, False, id=f"{v}-eager") for v in EAGER_VARIANTS],
)  # fmt: skip
@pytest.mark.slow
def test_same_loss_and_gradients_as_without_remat(variant, use_jit):
    model, params, ids = _llama()
    options = dict(r=4, target_modules="all-linear", init_lora_weights=False)
    kwargs = {}
    if variant == "merged":
        kwargs["mode"] = "merged"
    if variant == "dropout":
        options["lora_dropout"] = 0.3
        kwargs["rngs"] = {"dropout": jax.random.key(5)}
    if variant == "trainable_head":
        options["modules_to_save"] = ("lm_head",)
    if variant == "bf16":
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    config = jaxlora.LoraConfig(**options)
    if variant == "dora":
        frozen, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    elif variant == "nf4":
        qparams = quant.quantize(params, "all-linear", "nf4", 16, double_quant=False)
        frozen, lora = quant.split_quantized(qparams, config, jax.random.key(1))
    else:
        frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    if variant == "bf16":
        lora = jax.tree.map(lambda p: p.astype(jnp.float32), lora)
    (loss, grads), (loss_remat, grads_remat) = _value_and_grad(
        model, frozen, lora, config, ids, use_jit, **kwargs
    )
    assert_trees_close(loss_remat, loss, rtol=1e-5)  # XLA may fuse the two programs differently
    assert_trees_close(grads_remat, grads, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_full_fine_tuning_gradients_unchanged():
    model, params, ids = _llama()

    def loss(params, checkpointing):
        if checkpointing:
            with remat.checkpointed(BLOCKS):
                return jnp.mean(jnp.sin(model.apply({"params": params}, ids)))
        return jnp.mean(jnp.sin(model.apply({"params": params}, ids)))

    fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (loss_plain, grads), (loss_remat, grads_remat) = fn(params, False), fn(params, True)
    assert_trees_close(loss_remat, loss_plain, rtol=1e-6)
    assert_trees_close(grads_remat, grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_blocks_with_tuple_outputs_and_scanned_stacks(scan):
    model = linen_models.Decoder(scan=scan)
    params = linen_models.init(model, linen_models.ids())
    layouts = jaxlora.infer_layouts(model, linen_models.ids())
    config = jaxlora.LoraConfig(r=2, target_modules=["query", "value", "fc1"], layouts=layouts,
                                init_lora_weights=False)  # fmt: skip
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    blocks = "layers" if scan else r"layer_\d"

    def loss(lora, checkpointing):
        y = jaxlora.apply(model, frozen, lora, config, linen_models.ids(), remat=checkpointing)
        return jnp.mean(y**2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # eager remat: the law test's eager cases
    assert_trees_close(grad(lora, blocks), grad(lora, None), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_init_inside_the_context_is_a_plain_init():
    model, _, ids = _llama(layers=2)
    params = model.init(jax.random.key(0), ids)["params"]  # eagerly, as inside the context
    with remat.checkpointed(BLOCKS):
        inited = model.init(jax.random.key(0), ids)["params"]
    assert_trees_close(inited, params)


@pytest.mark.slow
def test_model_dropout_draws_the_same_masks_when_recomputed():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            for i in range(2):
                x = nn.Dropout(0.5, deterministic=not train, name=f"drop_{i}")(x)
                x = nn.Dense(8, name=f"dense_{i}")(x)
            return x

    model, x = Net(), jnp.ones((4, 8))
    params = model.init(jax.random.key(0), x, False)["params"]
    config = jaxlora.LoraConfig(r=2, target_modules=r"dense_\d", init_lora_weights=False)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))

    def loss(lora, checkpointing):
        y = jaxlora.apply(model, frozen, lora, config, x, True, remat=checkpointing,
                          rngs={"dropout": jax.random.key(2)}, lora_deterministic=True)  # fmt: skip
        return jnp.sum(y**2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # eager remat: the law test's eager cases
    plain = grad(lora, None)
    assert_trees_close(grad(lora, ("drop_0", "drop_1")), plain, rtol=1e-6, atol=0)


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.slow
def test_remat_lowers_activation_memory(quantized):
    """XLA's temporaries for a LoRA training gradient: with every block recomputed they are well
    under half of what keeping all the activations costs (XLA:CPU keeps them all under
    ``nn.remat``, whose barrier it drops)."""
    model, params, _ = _llama(layers=4, hidden=64, intermediate=256)
    ids = jax.random.randint(jax.random.key(3), (4, 64), 0, 64)
    config = jaxlora.LoraConfig(r=4, target_modules="all-linear")
    if quantized:
        params = quant.quantize(params, "all-linear", "nf4", 64, double_quant=True)
    frozen, lora = quant.split_quantized(params, config, jax.random.key(1))

    def grad(checkpointing):
        def loss(lora):
            logits = jaxlora.apply(model, frozen, lora, config, ids, remat=checkpointing)
            return jnp.mean(logits**2)

        return jax.grad(loss)

    plain = _temp_bytes(grad(None), lora)
    assert _temp_bytes(grad(BLOCKS), lora) < 0.5 * plain


@pytest.mark.slow
def test_recompute_keeps_only_inputs():
    layers, width = 8, 256

    def block(w, x):
        return x + jnp.tanh(x @ w) @ w.T

    def loss(ws, x, wrap):
        for w in ws:
            x = wrap(block)(w, x)
        return jnp.sum(x**2)

    ws = [0.01 * jax.random.normal(jax.random.key(i), (width, 4 * width)) for i in range(layers)]
    x = jax.random.normal(jax.random.key(9), (512, width))
    plain, rematted = (jax.grad(functools.partial(loss, wrap=w), argnums=(0, 1))
                       for w in (lambda f: f, remat.recompute))  # fmt: skip
    assert_trees_close(rematted(ws, x), plain(ws, x), rtol=1e-5, atol=1e-6)
    assert _temp_bytes(rematted, ws, x) < 0.5 * _temp_bytes(plain, ws, x)


@pytest.mark.standard_dtypes
@pytest.mark.slow
def test_narrow_kernels_are_not_kept_in_float32():
    """A bfloat16 base under float32 compute: the factored Dense keeps the bf16 kernel for the
    backward pass and casts again there. XLA's temporaries then match a float32 base's instead
    of adding a float32 copy of every kernel."""
    model, params, ids = _llama(layers=2, hidden=128, intermediate=512)
    config = jaxlora.LoraConfig(r=4, target_modules="all-linear")
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))

    def loss(lora, frozen):
        return jnp.mean(jaxlora.apply(model, frozen, lora, config, ids) ** 2)

    narrow = jax.tree.map(lambda p: p.astype(jnp.bfloat16), frozen)
    kernels = sum(4 * t.shape[0] * t.shape[1] for t in jaxlora.find_targets(params, config))
    wide_temp = _temp_bytes(jax.grad(loss), lora, frozen)
    assert _temp_bytes(jax.grad(loss), lora, narrow) < wide_temp + kernels / 4


@pytest.mark.slow
def test_errors():
    model, params, ids = _llama(layers=2)
    config = jaxlora.LoraConfig(r=2, target_modules=["q_proj"])
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    with pytest.raises(ValueError, match=r'`remat="block_\\d"` matched no module.*layers_0'):
        jaxlora.apply(model, frozen, lora, config, ids, remat=r"block_\d")
    with pytest.raises(TypeError, match="`remat` must be a regular expression"):
        jaxlora.apply(model, frozen, lora, config, ids, remat=3)
    with pytest.raises(TypeError, match="`remat` must be a regular expression"):
        jaxlora.apply(model, frozen, lora, config, ids, remat=[])

    class Normed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False, name="bn")(nn.Dense(4, name="fc")(x))

    x = jnp.ones((3, 4))
    variables = Normed().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="`remat` selected `bn`, which writes variables"):
        with remat.checkpointed("bn"):
            Normed().apply(variables, x, mutable=["batch_stats"])

    class Tiny(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.fc(x)

    graphdef, state = nnx.split(Tiny())
    nnx_config = jaxlora.LoraConfig(r=2, target_modules=["fc"])
    nnx_frozen, nnx_lora = jaxlora.split(state, nnx_config, jax.random.key(1))
    with pytest.raises(ValueError, match=r'`remat="block_\\d"` matched no submodule.*fc'):
        jaxlora.apply(graphdef, nnx_frozen, nnx_lora, nnx_config, x, remat=r"block_\d")
    with pytest.raises(TypeError, match="`remat` must be a regular expression"):
        jaxlora.apply(graphdef, nnx_frozen, nnx_lora, nnx_config, x, remat=[])


@pytest.mark.slow
def test_python_arguments_of_a_selected_block_stay_static():
    """BERT's blocks take ``deterministic: bool``; with model dropout on, the recomputation must
    draw the same masks."""
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                     intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    model, ids = BertClassifier(cfg), jnp.ones((2, 5), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    config = jaxlora.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))

    def loss(lora, checkpointing):
        rngs = {"dropout": jax.random.key(2)}
        logits = jaxlora.apply(model, frozen, lora, config, ids, deterministic=False, rngs=rngs,
                               remat=checkpointing)  # fmt: skip
        return jnp.sum(logits**2)

    grad, blocks = jax.jit(jax.grad(loss), static_argnums=1), r"bert/encoder/layer_\d+"
    assert_trees_close(grad(lora, blocks), grad(lora, None), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_scanned_stack_with_lora_dropout():
    """Inside ``nn.scan`` the dropout keys are scan-loop values: the recomputation must take them
    as inputs, not find them dead in the backward pass."""

    class Body(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(8, name="fc1")(h)) + h, None

    class ScanNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(Body, variable_axes={"params": 0}, length=3,
                            split_rngs={"params": True, "dropout": True})  # fmt: skip
            return stack(name="layers")(x, None)[0]

    model, x = ScanNet(), jax.random.normal(jax.random.key(0), (4, 8))
    params = model.init(jax.random.key(1), x)["params"]
    config = jaxlora.LoraConfig(r=2, target_modules=["fc1"], layouts={"fc1": "sio"},
                                lora_dropout=0.3, init_lora_weights=False)  # fmt: skip
    frozen, lora = jaxlora.split(params, config, jax.random.key(2))

    def loss(lora, checkpointing):
        y = jaxlora.apply(model, frozen, lora, config, x, remat=checkpointing,
                          rngs={"dropout": jax.random.key(4)})  # fmt: skip
        return jnp.mean(y**2)

    plain = jax.jit(jax.grad(loss), static_argnums=1)(lora, None)
    for blocks in ("layers", "layers/fc1"):
        rematted = jax.jit(jax.grad(loss), static_argnums=1)(lora, blocks)
        assert_trees_close(rematted, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.standard_dtypes
@pytest.mark.slow
def test_an_inf_in_one_row_stays_in_that_row():
    model, x = nn.Dense(4), jnp.ones((3, 8)).at[0, 0].set(jnp.inf)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), linen_models.init(model, x))
    config = jaxlora.LoraConfig(r=2, target_modules=".*")
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    lora = jax.tree.map(lambda p: p.astype(jnp.float32), lora)
    y = jaxlora.apply(model, frozen, lora, config, x)
    assert jnp.isfinite(y).all(axis=1).tolist() == [False, True, True]


@pytest.mark.standard_dtypes
@pytest.mark.slow
def test_per_example_gradients_share_one_cast_kernel():
    """Under ``jax.vmap`` the tie's zero stays unbatched, so a bf16 kernel is not cast once per
    example (16 examples would need 16 float32 copies, 64 MiB)."""
    model, x = nn.Dense(1024, use_bias=False), jax.random.normal(jax.random.key(0), (16, 4, 1024))
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), linen_models.init(model, x[0]))
    config = jaxlora.LoraConfig(r=4, target_modules=".*")
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    lora = jax.tree.map(lambda p: p.astype(jnp.float32), lora)

    def loss(lora, x, frozen):
        return jnp.sum(jnp.tanh(jaxlora.apply(model, frozen, lora, config, x)))

    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, None))
    assert _temp_bytes(per_example, lora, x, frozen) < 4 * 1024 * 1024 * 4  # < 4 f32 copies


@pytest.mark.slow  # compiles a remat step (4 s in the fast core)
def test_context_entered_outside_jit_says_so():
    model, params, ids = _llama(layers=2)
    step = jax.jit(lambda p: model.apply({"params": p}, ids))
    step(params)
    with pytest.raises(ValueError, match="no model was traced inside the block. Enter the block"):
        with remat.checkpointed(BLOCKS):
            step(params)  # compiled already: nothing is traced, nothing recomputed


# --- NNX: the same ``remat=`` on an NNX model -------------------------------------------------

D, HIDDEN, N_BLOCKS = 16, 32, 3


class NnxBlock(nnx.Module):
    def __init__(self, rngs, norm=False, rate=0.0, hidden=HIDDEN, width=D):
        self.up = nnx.Linear(width, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, width, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, rngs=rngs) if norm else None
        self.drop = nnx.Dropout(rate, rngs=rngs) if rate else None

    def __call__(self, x):
        h = jnp.tanh(self.up(x))
        h = h if self.norm is None else self.norm(h)
        h = h if self.drop is None else self.drop(h)
        return x + self.down(h)


class NnxStack(nnx.Module):
    def __init__(self, rngs, n=N_BLOCKS, **block):
        self.blocks = nnx.List([NnxBlock(rngs, **block) for _ in range(n)])
        self.head = nnx.Linear(block.get("width", D), 4, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class LinenBlock(nn.Module):
    hidden: int
    width: int

    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(self.width, name="down")(jnp.tanh(nn.Dense(self.hidden, name="up")(x)))


class LinenStack(nn.Module):
    n: int
    hidden: int
    width: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.n):
            x = LinenBlock(self.hidden, self.width, name=f"blocks_{i}")(x)
        return nn.Dense(4, name="head")(x)


NNX_CASES = ["plain", "merged", "lora_dropout", "norm_and_model_dropout"]
NNX_EAGER = ["plain", "lora_dropout"]  # as REMAT_VARIANTS / EAGER_VARIANTS for linen


@pytest.mark.parametrize(
    ("case", "use_jit"),
    [pytest.param(c, True, id=f"{c}-jit") for c in NNX_CASES]
    + [pytest.param(c, False, id=f"{c}-eager") for c in NNX_EAGER],
)
@pytest.mark.slow
def test_nnx_same_loss_gradients_and_state_as_without_remat(case, use_jit):
    block = {"norm": True, "rate": 0.3} if case == "norm_and_model_dropout" else {}
    graphdef, state = nnx.split(NnxStack(nnx.Rngs(0, dropout=1), **block))
    config = jaxlora.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False,
                                lora_dropout=0.3 if case == "lora_dropout" else 0.0)  # fmt: skip
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (4, 5, D)).reshape(20, D)
    mode = "merged" if case == "merged" else "factored"

    def loss(lora, checkpointing):
        y, updates = jaxlora.apply(graphdef, frozen, lora, config, x, mode=mode, mutable=True,
                                   rngs=jax.random.key(3), remat=checkpointing)  # fmt: skip
        return jnp.mean(jnp.sin(y)), updates

    fn = jax.value_and_grad(loss, has_aux=True)
    if use_jit:
        fn = jax.jit(fn, static_argnums=1)
    (value, updates), grads = fn(lora, None)
    (value_remat, updates_remat), grads_remat = fn(lora, r"blocks/\d+")
    assert_trees_close(value_remat, value, rtol=1e-6)
    # (batch norm's variance sums round differently when XLA fuses the two programs apart)
    assert_trees_close(grads_remat, grads, rtol=1e-5, atol=1e-6)
    stats = [nnx.filter_state(u, nnx.Not(nnx.RngKey)) for u in (updates_remat, updates)]
    assert_trees_close(*stats, rtol=1e-6, atol=1e-7)
    if block:  # batch statistics and the dropout streams' counters moved, in both
        assert int(updates_remat["blocks"][2]["drop"]["rngs"]["count"][...]) == 1
        assert float(jnp.abs(updates_remat["blocks"][0]["norm"]["mean"][...]).max()) > 0


def test_nnx_stack_run_by_scan_is_never_called_directly():
    class Scanned(nnx.Module):
        def __init__(self):
            @nnx.split_rngs(splits=2)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return nnx.Linear(4, 4, rngs=rngs)

            self.layers = make(nnx.Rngs(0))

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, layer):
                return jnp.tanh(layer(x))

            return body(x, self.layers)

    graphdef, state = nnx.split(Scanned())
    config = jaxlora.LoraConfig(r=2, target_modules=["layers"], layouts={"layers": "sio"})
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))
    with pytest.raises(ValueError, match="matched NNX modules that were never called"):
        jaxlora.apply(graphdef, frozen, lora, config, jnp.ones((2, 4)), remat="layers")


def _lora_grad_temp_bytes(model, frozen, config, x, checkpointing):
    _, lora = jaxlora.split(frozen, config, jax.random.key(1))

    def loss(lora):
        return jnp.mean(jaxlora.apply(model, frozen, lora, config, x, remat=checkpointing) ** 2)

    return _temp_bytes(jax.grad(loss), lora)


@pytest.mark.slow
def test_nnx_remat_saves_what_linen_remat_saves():
    """XLA's temporaries of a LoRA gradient through 8 MLP blocks, linen and NNX models of the
    same shape: recomputing every block cuts them well under half, by the same bytes on both
    (``nnx.remat`` in the model itself saves nothing on XLA:CPU, which drops its barrier)."""
    n, hidden, width = 8, 256, 64
    x = jax.random.normal(jax.random.key(0), (256, width))
    config = jaxlora.LoraConfig(r=4, target_modules=["up", "down"])
    linen_model = LinenStack(n, hidden, width)
    linen_params = linen_model.init(jax.random.key(1), x)["params"]
    graphdef, state = nnx.split(NnxStack(nnx.Rngs(1), n=n, hidden=hidden, width=width))
    linen_plain, linen_remat = (
        _lora_grad_temp_bytes(linen_model, linen_params, config, x, r)
        for r in (None, r"blocks_\d+")
    )
    nnx_plain, nnx_remat = (
        _lora_grad_temp_bytes(graphdef, state, config, x, r) for r in (None, r"blocks/\d+")
    )
    assert nnx_remat < 0.5 * nnx_plain and linen_remat < 0.5 * linen_plain
    assert abs(nnx_plain - linen_plain) <= 0.05 * linen_plain
    assert abs(nnx_remat - linen_remat) <= 0.05 * linen_remat
