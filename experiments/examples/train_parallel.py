"""LoRA training of a tiny decoder LM on many devices, one parallelism mode at a time.

Each mode trains the same adapter on the same batches as a single-device run and must end with the
same losses and adapter within fp32 tolerance, its adapter carrying exactly the shardings that
``jaxlora.lora_shardings`` derives from the base:

  dp         jax.jit + NamedSharding, batch over "data", base and adapter replicated
  fsdp       ZeRO-3: base sharded over "fsdp" (its embed axis), batch over ("data", "fsdp")
  tp         column/row tensor parallel on a (data, model) mesh: q/k/v and MLP-up column
             sharded, out and MLP-down row sharded, vocab sharded; batch over "data"
  pmap       jax.pmap data parallel with pmean gradients
  shard_map  FSDP + data parallel written by hand in jax.shard_map (all_gather in, grads reduced
             by the all_gather transpose and by psum over the replicated axes)

Run on 8 simulated CPU devices (the default here):

    python experiments/examples/train_parallel.py --mode all --out experiments/results/parallel
    python experiments/examples/train_parallel.py --model nnx --mode all   # the same LM in NNX

which prints one JSON line per mode with its max difference to the single-device run. With
``--model nnx`` the base is an ``nnx.State`` whose ``nnx.Param`` s carry ``nnx.with_partitioning``
logical names; the adapter's shardings come from that metadata and the same logical rules, and the
forward is ``jaxlora.apply`` on the model's graphdef (factored).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora.sharding import init_sharded, lora_shardings

VOCAB, DIM, HEADS, HEAD_DIM, MLP, LAYERS = 64, 32, 4, 8, 64, 2
BATCH, SEQ, STEPS, LR = 16, 17, 5, 0.5
MODES = ("dp", "fsdp", "tp", "pmap", "shard_map")
TOLERANCE = 1e-5

# Logical axis -> mesh axes, per mode. Axes a rule does not name stay replicated.
RULES = {
    "single": (),
    "dp": (),
    "pmap": (),
    "fsdp": (("embed", "fsdp"),),
    "shard_map": (("embed", "fsdp"),),
    "tp": (("heads", "model"), ("mlp", "model"), ("vocab", "model")),
}
MESHES = {
    "dp": ((8,), ("data",)),
    "fsdp": ((2, 4), ("data", "fsdp")),
    "shard_map": ((2, 4), ("data", "fsdp")),
    "tp": ((2, 4), ("data", "model")),
}
BATCH_AXES = {"dp": ("data",), "fsdp": ("data", "fsdp"), "shard_map": ("data", "fsdp"),
              "tp": ("data",)}  # fmt: skip


def _dense(features, names, axis=-1, name=None):
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features,
        axis=axis,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names[-n_out:]),
    )


class Block(nn.Module):
    """Pre-LN attention (DenseGeneral q/k/v/out) and MLP, with logical axis names on each kernel."""

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (
            _dense((HEADS, HEAD_DIM), ("embed", "heads", "kv"), name=n)(h)
            for n in ("query", "key", "value")
        )
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        attn = nn.dot_product_attention(q, k, v, mask=mask)
        x = x + _dense(DIM, ("heads", "kv", "embed"), axis=(-2, -1), name="out")(attn)
        h = nn.gelu(_dense(MLP, ("embed", "mlp"), name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + _dense(DIM, ("mlp", "embed"), name="down")(h), None


class TinyLM(nn.Module):
    """Embedding, ``nn.scan`` over ``LAYERS`` blocks (a stacked "layers" axis), output head."""

    @nn.compact
    def __call__(self, ids):
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
        x = nn.Embed(VOCAB, DIM, embedding_init=init, name="embed")(ids)
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(name="layers")(x, None)
        return _dense(VOCAB, ("embed", "vocab"), name="lm_head")(nn.LayerNorm(name="ln_f")(x))


MODEL = TinyLM()
CONFIG = jaxlora.LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=["query", "key", "value", "out", "up", "down", "embed"],
    bias="lora_only",
    # Read off the model: 'sioo' for the scanned q/k/v, 'siio' for out, 'sio' for the MLP.
    layouts=jaxlora.infer_layouts(MODEL, jax.ShapeDtypeStruct((1, SEQ - 1), jnp.int32)),
)


@functools.cache
def abstract_params():
    """The boxed (logically partitioned) abstract params: shapes plus logical axis names (traced
    once: every mode reads its shardings off the same tree)."""
    ids = jax.ShapeDtypeStruct((BATCH, SEQ - 1), jnp.int32)
    return jax.eval_shape(MODEL.init, jax.random.key(0), ids)["params"]


def make_mesh(mode):
    shape, names = MESHES[mode]
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def base_shardings(mode, mesh):
    specs = nn.get_partition_spec(abstract_params())
    return nn.logical_to_mesh_sharding(specs, mesh, RULES[mode])


def init_base(shardings):
    """Base params created in place (jit + out_shardings); the same values for every sharding."""
    ids = jnp.zeros((BATCH, SEQ - 1), jnp.int32)
    init = jax.jit(lambda key: nn.unbox(MODEL.init(key, ids)["params"]), out_shardings=shardings)
    return init(jax.random.key(0))


def batches(steps=STEPS):
    """Global batches of token ids (a fixed pattern plus noise, so the loss falls)."""
    rng = np.random.default_rng(0)
    base = (np.arange(SEQ)[None, :] * 3 + np.arange(BATCH)[:, None]) % VOCAB
    noise = rng.integers(0, 4, size=(steps, BATCH, SEQ))
    return ((base[None] + noise) % VOCAB).astype(np.int32)


def loss_fn(lora, frozen, tokens):
    params = jaxlora.merge(frozen, lora, CONFIG)
    logits = MODEL.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


class Linen:
    """The linen TinyLM: boxed abstract params, base shardings from logical names, merged loss."""

    config = CONFIG
    abstract = staticmethod(abstract_params)
    base_shardings = staticmethod(base_shardings)
    init_base = staticmethod(init_base)
    loss = staticmethod(loss_fn)


# ---- the same LM in NNX ---------------------------------------------------------------------


def _nnx_dense(cls, d_in, d_out, names, rngs, **kwargs):
    n_out = len(d_out) if isinstance(d_out, tuple) else 1
    return cls(
        d_in,
        d_out,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
        bias_init=nnx.with_partitioning(nnx.initializers.normal(0.02), names[-n_out:]),
        rngs=rngs,
        **kwargs,
    )


class NnxBlock(nnx.Module):
    """``Block`` in NNX: LinearGeneral q/k/v/out, Linear MLP, logical names on every kernel."""

    def __init__(self, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(DIM, rngs=rngs), nnx.LayerNorm(DIM, rngs=rngs)
        heads = (HEADS, HEAD_DIM)
        self.query, self.key, self.value = (
            _nnx_dense(nnx.LinearGeneral, DIM, heads, ("embed", "heads", "kv"), rngs)
            for _ in range(3)
        )
        names = ("heads", "kv", "embed")
        self.out = _nnx_dense(nnx.LinearGeneral, heads, DIM, names, rngs, axis=(-2, -1))
        self.up = _nnx_dense(nnx.Linear, DIM, MLP, ("embed", "mlp"), rngs)
        self.down = _nnx_dense(nnx.Linear, MLP, DIM, ("mlp", "embed"), rngs)

    def __call__(self, x):
        h = self.ln1(x)
        q, k, v = self.query(h), self.key(h), self.value(h)
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        x = x + self.out(nnx.dot_product_attention(q, k, v, mask=mask))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NnxTinyLM(nnx.Module):
    """Embedding, ``LAYERS`` blocks (a list: ``layers/0/query``, ...), output head."""

    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed"))
        self.embed = nnx.Embed(VOCAB, DIM, embedding_init=init, rngs=rngs)
        self.layers = nnx.List([NnxBlock(rngs) for _ in range(LAYERS)])
        self.ln_f = nnx.LayerNorm(DIM, rngs=rngs)
        self.lm_head = _nnx_dense(nnx.Linear, DIM, VOCAB, ("embed", "vocab"), rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


def _nnx_build(key):
    # Logical names are no mesh axes: create unplaced; jit's out_shardings place the state.
    with nnx.use_eager_sharding(False):
        return NnxTinyLM(nnx.Rngs(key))


class Nnx:
    """The NNX TinyLM: abstract ``nnx.State`` with partitioning metadata, factored loss.

    Built on first use, not at import: the script sets up its CPU devices after importing.
    """

    @functools.cached_property
    def abstract_model(self):
        return nnx.eval_shape(lambda: _nnx_build(0))

    @functools.cached_property
    def graphdef(self):
        return nnx.graphdef(self.abstract_model)

    @functools.cached_property
    def config(self):
        # Read off the layers: 'ioo' for q/k/v, 'iio' for out.
        return dataclasses.replace(CONFIG, layouts=jaxlora.infer_layouts(self.abstract_model))

    def abstract(self):
        return nnx.state(self.abstract_model)

    def base_shardings(self, mode, mesh):
        specs = nnx.get_partition_spec(self.abstract())
        return nn.logical_to_mesh_sharding(specs, mesh, RULES[mode])

    def init_base(self, shardings):
        build = jax.jit(lambda key: nnx.state(_nnx_build(key)), out_shardings=shardings)
        return build(jax.random.key(0))

    def loss(self, lora, frozen, tokens, mode="factored"):
        logits = jaxlora.apply(self.graphdef, frozen, lora, self.config, tokens[:, :-1], mode=mode)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


MODELS = {"linen": Linen(), "nnx": Nnx()}


# SGD with momentum, not Adam: Adam divides each gradient entry by its own running RMS, so an entry
# that is zero in exact arithmetic but rounding noise in float32 (the key projection's bias: softmax
# ignores a shift shared by all keys) moves by up to lr·noise/(|noise|+eps), a few 1e-3 here, and
# differently for every way of splitting the sums. SGD keeps rounding differences at rounding size.
OPTIMIZER = optax.sgd(LR, momentum=0.9)


def opt_shardings(lora_sh, replicated):
    abstract = jax.eval_shape(OPTIMIZER.init, jax.tree.map(lambda s: jnp.zeros(()), lora_sh))
    return optax.tree_map_params(
        OPTIMIZER, lambda _, s: s, abstract, lora_sh, transform_non_params=lambda _: replicated
    )


def jit_step(lora_sh, opt_sh, replicated, grad_fn=None, lm=MODELS["linen"]):
    grad_fn = grad_fn or jax.value_and_grad(lm.loss)

    @partial(jax.jit, donate_argnums=(0, 1), out_shardings=(lora_sh, opt_sh, replicated))
    def step(lora, opt_state, frozen, tokens):
        loss, grads = grad_fn(lora, frozen, tokens)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return step


def _gather(x, spec):
    """All-gathers a local shard to the full array along every sharded dimension."""
    for dim, entry in enumerate(spec):
        names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
        for name in reversed(names):
            x = jax.lax.all_gather(x, name, axis=dim, tiled=True)
    return x


def shard_map_grad(mesh, frozen_specs, lora_specs, batch_axes, lm=MODELS["linen"]):
    """(loss, grads) of the global mean loss, computed per shard with explicit collectives."""
    n_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))

    def body(lora, frozen, tokens):
        full = jax.tree.map(_gather, frozen, frozen_specs)

        def local_loss(lora):
            return lm.loss(jax.tree.map(_gather, lora, lora_specs), full, tokens) / n_shards

        loss, grads = jax.value_and_grad(local_loss)(lora)
        return jax.lax.psum(loss, batch_axes), grads

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(lora_specs, frozen_specs, P(batch_axes)),
        out_specs=(P(), lora_specs),
    )


def spec_tree(tree):
    return jax.tree.map(lambda x: x.sharding.spec, tree)


def train_single(data, device=None, lm=MODELS["linen"]):
    """The reference: everything on one device (by default this process's first)."""
    device = device or jax.local_devices()[0]
    one = jax.sharding.SingleDeviceSharding(device)
    frozen = lm.init_base(one)
    lora = jax.device_put(jaxlora.split(frozen, lm.config, jax.random.key(1))[1], device)
    lora_sh = jax.tree.map(lambda _: one, lora)
    opt_state = jax.jit(OPTIMIZER.init, out_shardings=opt_shardings(lora_sh, one))(lora)
    step = jit_step(lora_sh, opt_shardings(lora_sh, one), one, lm=lm)
    losses = []
    for tokens in data:
        lora, opt_state, loss = step(lora, opt_state, frozen, jax.device_put(tokens, device))
        losses.append(float(loss))
    return losses, jax.tree.map(np.asarray, lora), None


def train_sharded(mode, data, lm=MODELS["linen"]):
    """dp / fsdp / tp (jit + NamedSharding) and shard_map: adapter initialised in its shardings.

    The adapter's shardings come from the base's logical partitioning metadata (linen boxes or
    ``nnx.Param`` metadata) and the mode's rules; the frozen base never moves (checked bitwise).
    """
    mesh = make_mesh(mode)
    base_sh = lm.base_shardings(mode, mesh)
    frozen = lm.init_base(base_sh)
    before = jax.tree.map(np.asarray, frozen)
    lora_sh = lora_shardings(lm.abstract(), lm.config, mesh=mesh, rules=RULES[mode])
    lora = init_sharded(frozen, lm.config, jax.random.key(1), base_sh)
    promised = jax.tree.map(lambda s: s.spec, lora_sh)
    if spec_tree(lora) != promised:
        raise AssertionError(f"{mode}: initial adapter specs {spec_tree(lora)} != {promised}")
    replicated = NamedSharding(mesh, P())
    opt_sh = opt_shardings(lora_sh, replicated)
    opt_state = jax.jit(OPTIMIZER.init, out_shardings=opt_sh)(lora)
    grad_fn = None
    if mode == "shard_map":
        frozen_specs = jax.tree.map(lambda s: s.spec, base_sh)
        grad_fn = shard_map_grad(mesh, frozen_specs, promised, BATCH_AXES[mode], lm)
    step = jit_step(lora_sh, opt_sh, replicated, grad_fn, lm)
    batch_sh = NamedSharding(mesh, P(BATCH_AXES[mode]))
    losses = []
    for tokens in data:
        lora, opt_state, loss = step(lora, opt_state, frozen, jax.device_put(tokens, batch_sh))
        losses.append(float(loss))
    if spec_tree(lora) != promised:
        raise AssertionError(f"{mode}: trained adapter specs {spec_tree(lora)} != {promised}")
    if max_diff(jax.tree.map(np.asarray, frozen), before) != 0.0:
        raise AssertionError(f"{mode}: the frozen base moved")
    return losses, jax.tree.map(np.asarray, lora), promised


def train_pmap(data, lm=MODELS["linen"]):
    """jax.pmap data parallel: every device holds the whole base and adapter, grads are pmean'ed."""
    n = jax.local_device_count()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    frozen = lm.init_base(one)
    lora = jaxlora.split(frozen, lm.config, jax.random.key(1))[1]
    # One copy per device, laid out as pmap lays out its mapped axis.
    per_device = NamedSharding(jax.sharding.Mesh(jax.local_devices(), ("batch",)), P("batch"))
    replicate = partial(
        jax.tree.map, lambda x: jax.device_put(jnp.broadcast_to(x, (n,) + x.shape), per_device)
    )
    lora, opt_state = replicate(lora), replicate(OPTIMIZER.init(lora))

    def step(lora, opt_state, frozen, tokens):
        loss, grads = jax.value_and_grad(lm.loss)(lora, frozen, tokens)
        grads, loss = jax.lax.pmean((grads, loss), "batch")
        updates, opt_state = OPTIMIZER.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    pstep = jax.pmap(step, "batch", in_axes=(0, 0, None, 0), donate_argnums=(0, 1))
    losses = []
    for tokens in data:
        lora, opt_state, loss = pstep(lora, opt_state, frozen, tokens.reshape(n, -1, SEQ))
        losses.append(float(loss[0]))
    replicas = jax.tree.map(np.asarray, lora)
    for leaf in jax.tree.leaves(replicas):
        if not (leaf == leaf[:1]).all():
            raise AssertionError("pmap replicas of the adapter differ")
    # One copy per device along the pmap axis; within a device the adapter is whole (replicated).
    for spec in jax.tree.leaves(spec_tree(lora), is_leaf=_is_spec):
        if any(entry is not None for entry in tuple(spec)[1:]):
            raise AssertionError(f"pmap adapter is split within a device: {spec}")
    return losses, jax.tree.map(lambda x: x[0], replicas), None


def _is_spec(x):
    return isinstance(x, P)


def max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(x - y))) for x, y in pairs)


def spec_strings(promised):
    if promised is None:
        return None
    flat = jax.tree_util.tree_flatten_with_path(promised, is_leaf=_is_spec)[0]
    return {"/".join(str(k.key) for k in path): str(spec) for path, spec in flat}


def run(modes, out_dir=None, steps=STEPS, model="linen"):
    lm = MODELS[model]
    data = batches(steps)
    ref_losses, ref_lora, _ = train_single(data, lm=lm)
    results = {"model": model, "single": {"losses": ref_losses}}
    print(json.dumps({"model": model, "mode": "single", "losses": ref_losses}), flush=True)
    for mode in modes:
        start = time.perf_counter()
        try:
            if mode == "pmap":
                losses, lora, promised = train_pmap(data, lm)
            else:
                losses, lora, promised = train_sharded(mode, data, lm)
            row = {
                "losses": losses,
                "max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
                "max_adapter_diff": max_diff(lora, ref_lora),
                "specs": spec_strings(promised),
            }
        except Exception:  # noqa: BLE001 - one mode's failure is reported, the others still run
            row = {"error": traceback.format_exc()}
        row["seconds"] = round(time.perf_counter() - start, 2)
        results[mode] = row
        shown = {k: v for k, v in row.items() if k != "specs"}
        print(json.dumps({"mode": mode, **shown}), flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        name = "parallel.json" if model == "linen" else f"parallel_{model}.json"
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mode", default="all", help=f"'all' or a comma-separated list of {', '.join(MODES)}"
    )
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=8,
        help="run on this many simulated CPU devices; 0 uses the default backend (8 devices)",
    )
    parser.add_argument(
        "--model", default="linen", choices=tuple(MODELS), help="the LM in linen or in NNX"
    )
    parser.add_argument("--out", default=None, help="folder for parallel[_nnx].json")
    args = parser.parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    modes = MODES if args.mode == "all" else tuple(args.mode.split(","))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--mode: unknown modes {unknown}; choose 'all' or from {', '.join(MODES)}")
    results = run(modes, args.out, args.steps, args.model)
    bad = [
        m for m in modes
        if "error" in results[m]
        or max(results[m]["max_loss_diff"], results[m]["max_adapter_diff"]) > TOLERANCE
    ]  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
