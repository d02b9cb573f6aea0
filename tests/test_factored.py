"""``jaxlora.factored``: the factored path of plain JAX functions is the merged one, proven.

On each model of ``tests/plain_models.py``: outputs and gradients (w.r.t. the adapter and the
input) equal the merged path's; a fresh adapter gives the base output bit for bit; every adapter
leaf trains; an optax step leaves the base bit-identical. Plus: matmuls run without a d×k
temporary, the transform works under ``jit`` / ``vmap`` / ``grad``, inside ``while_loop`` /
``cond`` / ``shard_map``, and bad inputs are refused by name.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxlora
from tests import plain_models
from tests.treeutil import assert_trees_bitwise_equal, assert_trees_close

SLOW = pytest.mark.slow  # seconds of compiling: full suite only
LAW_CASES = ["mlp", pytest.param("transposed", marks=SLOW), pytest.param("cnn", marks=SLOW),
             "attention", "scan", pytest.param("fori_loop", marks=SLOW), "remat", "custom_vjp",
             pytest.param("shared_uses", marks=SLOW),
             pytest.param("llama", marks=SLOW)]  # fmt: skip


def _setup(name, init=False, layouts=None):
    """The case, its config, and ``(frozen, lora)``: a fresh adapter from ``jaxlora.split`` when
    ``init``, else one with every factor nonzero (numpy draws: nothing extra to compile)."""
    case = plain_models.CASES[name]()
    layouts = case.layouts if layouts is None else layouts
    config = jaxlora.LoraConfig(r=2, lora_alpha=4.0, target_modules=case.targets,
                                layouts=layouts)  # fmt: skip
    if init:
        split = jax.jit(lambda p: jaxlora.split(p, config, jax.random.key(3)))
        frozen, lora = split(case.params)
        return case, config, frozen, lora
    _, shapes = jax.eval_shape(lambda p: jaxlora.split(p, config, jax.random.key(3)), case.params)
    rng = np.random.default_rng(4)
    lora = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
    return case, config, case.params, lora


def _both_losses(case, config, frozen):
    """One compiled function: the value and gradients of a loss on the factored path and on the
    merged one (w.r.t. the adapter, and the input where it is a float array)."""
    factored = jaxlora.factored(case.fn, config)
    argnums = (0, 1) if case.float_input else 0

    def loss(forward):
        return jax.value_and_grad(lambda t, *a: jnp.sum(jnp.sin(forward(t, *a))), argnums)

    factored_loss = loss(lambda t, *a: factored(frozen, t, *a))
    merged_loss = loss(lambda t, *a: case.fn(jaxlora.merge(frozen, t, config), *a))
    return jax.jit(lambda t, *a: (factored_loss(t, *a), merged_loss(t, *a)))


def _check_laws(name, layouts=None):
    case, config, frozen, lora = _setup(name, layouts=layouts)
    before = jax.tree.map(np.asarray, frozen)
    both = _both_losses(case, config, frozen)
    (value, grads), (value_m, grads_m) = both(lora, *case.args)
    np.testing.assert_allclose(value, value_m, rtol=1e-5, atol=1e-5)
    assert_trees_close(grads, grads_m, rtol=1e-4, atol=1e-4)
    lora_grads = grads[0] if case.float_input else grads
    for path, g in jax.tree_util.tree_flatten_with_path(lora_grads)[0]:
        assert float(jnp.abs(g).max()) > 0, f"{jax.tree_util.keystr(path)} gets no gradient"
    # An optax step on the adapter moves it and leaves the base untouched, bit for bit.
    opt = optax.sgd(0.1)
    updates, _ = opt.update(lora_grads, opt.init(lora), lora)
    stepped = optax.apply_updates(lora, updates)
    (value_after, _), _ = both(stepped, *case.args)
    assert float(value_after) != float(value)
    assert_trees_bitwise_equal(frozen, before)


@pytest.mark.parametrize("name", LAW_CASES)
def test_factored_equals_merged(name):
    _check_laws(name)


EXPECTED_LAYOUTS = {"transposed": {"proj": "oi"}, "llama": {"lm_head": "io"}}


@pytest.mark.parametrize("name", list(plain_models.CASES))
def test_infer_layouts_reads_them_off_the_function(name):
    """The layout of each kernel, from how the function contracts it: what the cases state by
    hand, "io" for the 2-D kernels they leave out, "oi" for a weight used as ``x @ W.T``."""
    case = plain_models.CASES[name]()
    inferred = jaxlora.infer_layouts(case.fn, case.params, *case.args)
    kernels = [t.path for t in jaxlora.find_targets(case.params, jaxlora.LoraConfig(
        target_modules=case.targets, layouts=case.layouts)) if t.leaf == "kernel"]  # fmt: skip
    stated = lambda path: next(  # noqa: E731
        (v for k, v in case.layouts.items() if re.fullmatch(f"(?:.*/)?(?:{k})", path)), "io"
    )
    expected = {p: EXPECTED_LAYOUTS.get(name, {}).get(p) or stated(p) for p in kernels}
    assert {p: inferred[p] for p in kernels} == expected


def test_inferred_layout_of_a_transposed_weight_runs_fused():
    """``x @ W.T`` with W (out, in): with the inferred layout "oi", A is (in, r) as in PEFT and
    the dense fast path runs."""
    case = plain_models.transposed()
    layouts = jaxlora.infer_layouts(case.fn, case.params, *case.args)
    case, config, frozen, lora = _setup("transposed", layouts=layouts)
    assert lora["proj"]["lora_a"].shape == (5, 2)
    jaxpr = jax.make_jaxpr(jaxlora.factored(case.fn, config))(frozen, lora, *case.args)
    assert "custom_vjp_call" in str(jaxpr)


@pytest.mark.slow  # seconds of compiling: full suite only
def test_inferred_layout_of_a_transposed_weight_keeps_the_laws():
    case = plain_models.transposed()
    _check_laws("transposed", jaxlora.infer_layouts(case.fn, case.params, *case.args))


@pytest.mark.parametrize("name", ["mlp", pytest.param("attention", marks=SLOW),
                                  pytest.param("scan", marks=SLOW),
                                  pytest.param("shared_uses", marks=SLOW),
                                  pytest.param("llama", marks=SLOW)])  # fmt: skip
def test_fresh_adapter_is_the_base_bit_for_bit(name):
    case, config, frozen, lora = _setup(name, init=True)
    out = jax.jit(jaxlora.factored(case.fn, config))(frozen, lora, *case.args)
    assert_trees_bitwise_equal(out, jax.jit(case.fn)(case.params, *case.args))


def _all_avals(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                yield from _all_avals(inner)


@pytest.mark.parametrize("name", ["mlp", "transposed", "attention", "scan", "cnn"])
def test_no_weight_sized_temporary(name):
    """Matmuls, einsums and convolutions never form ``W + s·A·B`` (nor ΔW)."""
    case, config, frozen, lora = _setup(name)
    jaxpr = jax.make_jaxpr(jaxlora.factored(case.fn, config))(frozen, lora, *case.args).jaxpr
    weights = {tuple(x.shape) for x in jax.tree.leaves(case.params) if x.ndim >= 2}
    weights |= {tuple(x.shape[1:]) for x in jax.tree.leaves(case.params) if x.ndim >= 3}
    formed = {tuple(a.shape) for a in _all_avals(jaxpr)} & weights
    assert not formed, f"weight-sized values formed: {formed}"


def test_other_uses_see_the_merged_weight():
    """A norm of the kernel and an embedding lookup read ``W + s·A·B``, never the bare W."""
    case, config, frozen, lora = _setup("shared_uses")
    merged = jaxlora.merge(frozen, lora, config)

    def norm(p, ids):
        return jnp.sum(p["proj"]["kernel"] ** 2), p["embed"]["embedding"][ids]

    got = jax.jit(jaxlora.factored(norm, config))(frozen, lora, *case.args)
    assert_trees_close(got, jax.jit(norm)(merged, *case.args), rtol=1e-6, atol=1e-6)


def test_under_vmap_and_jit():
    case, config, frozen, lora = _setup("mlp")
    forward = jaxlora.factored(case.fn, config)
    x = case.args[0]
    got = jax.jit(jax.vmap(forward, in_axes=(None, None, 0)))(frozen, lora, x[:, None])
    want = case.fn(jaxlora.merge(frozen, lora, config), x)
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-6)


def test_inside_while_loop_and_cond():
    """A traced trip count makes a ``while_loop``; the weights stay lazy in body and branches."""
    case, config, frozen, lora = _setup("scan")

    def fn(p, x, n):
        w = p["layers"]["kernel"]
        x = lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ w[i]), x)
        return lax.cond(n > 1, lambda h: h @ w[0], lambda h: h @ w[1].T, x)

    args = (case.args[0], jnp.int32(3))
    got = jax.jit(jaxlora.factored(fn, config))(frozen, lora, *args)
    want = fn(jaxlora.merge(frozen, lora, config), *args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_inside_shard_map():
    from jax.sharding import PartitionSpec as P

    case, config, frozen, lora = _setup("mlp")
    mesh = jax.make_mesh((1,), ("data",))

    def fn(p, x):
        body = lambda p, x: case.fn(p, x)  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=P())(p, x)

    got = jax.jit(jaxlora.factored(fn, config))(frozen, lora, *case.args)
    want = case.fn(jaxlora.merge(frozen, lora, config), *case.args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_static_arguments_pass_through():
    case, config, frozen, lora = _setup("mlp")

    def fn(p, x, *, activation="tanh"):
        return getattr(jnp, activation)(case.fn(p, x))

    got = jaxlora.factored(fn, config)(frozen, lora, *case.args, activation="sin")
    want = jnp.sin(case.fn(jaxlora.merge(frozen, lora, config), *case.args))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused():
    case, config, frozen, lora = _setup("mlp")
    with pytest.raises(TypeError, match="`fn` must be a function"):
        jaxlora.factored("mlp", config)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`config` must be a jaxlora.LoraConfig"):
        jaxlora.factored(case.fn, {"r": 2})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"or a plain function `fn\(params, \*inputs\)`"):
        jaxlora.infer_layouts(case.fn, {"fc1": {"bias": jnp.ones(3)}}, *case.args)
    wrong = {"fc1": {"lora_a": jnp.zeros((5, 2)), "lora_b": jnp.zeros((2, 8))}}
    with pytest.raises(ValueError, match="`lora` factors at `fc1` do not fit"):
        jaxlora.factored(case.fn, config)(frozen, wrong, *case.args)


@pytest.mark.slow  # runs the README's example: 200 jitted steps
@pytest.mark.standard_dtypes  # optax's Adam
def test_readme_example_trains():
    from tests.test_readme import block

    namespace = {}
    exec(compile(block("any-jax-function"), "README.md", "exec"), namespace)
    x, y, frozen, lora, config = (namespace[n] for n in ("x", "y", "frozen", "lora", "config"))
    mlp, forward, deployed = namespace["mlp"], namespace["forward"], namespace["deployed"]
    assert namespace["layouts"] == {"down": "oi", "up": "io"}
    assert lora["down"]["lora_a"].shape == (64, 4)  # (in, r), as PEFT's A transposed
    start = float(jnp.mean((mlp(frozen, x) - y) ** 2))
    assert float(namespace["loss"]) < 0.5 * start
    np.testing.assert_allclose(forward(frozen, lora, x), mlp(deployed, x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # seconds of compiling (a vmap over keys, a scan): full suite only
def test_lora_dropout():
    """With ``lora_key``: a fresh adapter still gives the base, one key gives one output, two
    keys two, and over many keys the mean is the output without dropout (inverted
    dropout is unbiased for the linear low-rank term). Inside ``lax.scan`` too."""
    case = plain_models.scanned()
    config = jaxlora.LoraConfig(r=2, target_modules=case.targets, layouts=case.layouts,
                                lora_dropout=0.5)  # fmt: skip
    _, fresh = jax.jit(lambda p: jaxlora.split(p, config, jax.random.key(3)))(case.params)
    _, _, frozen, lora = _setup("scan")
    lin = lambda p, x: x @ p["layers"]["kernel"][0] + x @ p["layers"]["kernel"][1]  # noqa: E731
    forward = jaxlora.factored(lin, config)
    keys = jax.random.split(jax.random.key(5), 2000)

    @jax.jit
    def run(lora, keys):
        return jax.vmap(lambda k: forward(frozen, lora, *case.args, lora_key=k))(keys)

    outs = run(lora, keys)
    plain = forward(frozen, lora, *case.args)
    assert not np.allclose(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], run(lora, keys[:1])[0], rtol=1e-5, atol=1e-6)
    lora_term = plain - lin(frozen, *case.args)
    np.testing.assert_allclose(outs.mean(0), plain, atol=0.1 * float(jnp.abs(lora_term).max()))
    scanned = jax.jit(jaxlora.factored(case.fn, config))
    assert not np.allclose(scanned(frozen, lora, *case.args, lora_key=keys[0]),
                           scanned(frozen, lora, *case.args, lora_key=keys[1]))  # fmt: skip
    # A fresh adapter's term is zero under dropout too (XLA may fuse the sum differently from
    # the base program's: equal to within an ulp, not bit for bit).
    base = jax.jit(case.fn)(frozen, *case.args)
    np.testing.assert_allclose(scanned(frozen, fresh, *case.args, lora_key=keys[0]), base,
                               rtol=1e-6, atol=1e-7)  # fmt: skip
