"""The JAX configurations of ``bench_train_step.py``: each a compiled training step (or forward).

A ``JaxRunner`` (``bench_jax_runner.py``) holds one compiled step; the builders below make the
runners of each group (a model and the fine-tuning variants compared with its own full
fine-tuning):

* ``linen``: the GPT of ``models_gpt.py`` (separate ``nn.Dense`` q/k/v/o), float32 (with
  ``--tiny`` without its q,v dropout and merged all-linear rows: the same code as the all-linear
  dropout and merged q,v rows);
* ``linen-mha``: the same GPT with Flax's ``nn.MultiHeadDotProductAttention``;
* ``nnx``: the same GPT in Flax NNX (``nnx.MultiHeadAttention``, ``nnx.Linear``), with qwix's LoRA
  beside jaxlora's when qwix is installed;
* ``bf16``: the linen GPT with bfloat16 weights and activations, a float32 adapter (PEFT's default);
* ``plain``: the same GPT as a plain JAX function of its params dict (``models_gpt.plain_gpt``),
  adapted by ``jaxlora.factored``;
* ``equinox``: the same GPT in Equinox (``models_gpt_eqx.py``: ``eqx.nn.Linear`` layers holding the
  linen GPT's params, so the same function), adapted by ``jaxlora.factored`` over the model's own
  call (skipped when Equinox is not installed);
* ``inference``: forwards of the linen GPT: base, merged adapter, factored adapter.

Every training group also has the *floor* rows of ``bench_baselines.py``: the least work any
adapter on the same layers does, so that each adapter row can be read against its own bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import jaxlora
from experiments.benchmarks import models_gpt
from experiments.benchmarks.bench_baselines import (
    equinox_floors,
    function_floors,
    linen_floors,
    nnx_floors,
    qwix_rows,
)
from experiments.benchmarks.bench_jax_runner import JaxRunner

QV = ["q_proj", "v_proj"]
QV_MHA = ["query", "value"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out"]
ALL_LINEAR_MHA = ["query", "key", "value", "out", "fc_in", "fc_out"]
GROUPS = ("linen", "linen-mha", "nnx", "bf16", "plain", "equinox", "inference")


def _lora_config(args, targets, dropout=0.0, layouts=None) -> jaxlora.LoraConfig:
    return jaxlora.LoraConfig(
        r=args.r, lora_alpha=args.alpha, target_modules=targets, lora_dropout=dropout,
        layouts=layouts,
    )  # fmt: skip


def linen_rows(group, model, params, batch, configs) -> list[JaxRunner]:
    """Full FT, then each ``(name, config, mode)`` of ``configs`` on a linen model."""

    def full(t, f, inputs, key):
        return model.apply({"params": t}, inputs)

    rows = [JaxRunner("full FT", group, full, params, None, batch)]
    for name, config, mode in configs:
        frozen, lora = jaxlora.split(params, config, jax.random.key(1))

        def lora_fwd(t, f, inputs, key, config=config, mode=mode):
            rngs = {"dropout": key} if config.lora_dropout else None
            return jaxlora.apply(model, f, t, config, inputs, mode=mode, rngs=rngs)

        rows.append(JaxRunner(name, group, lora_fwd, lora, frozen, batch))
    return rows


def linen_group(args, c, batch) -> list[JaxRunner]:
    model, params = models_gpt.init(c, jax.random.key(0))
    configs = [
        ("jaxlora factored q,v", _lora_config(args, QV), "factored"),
        ("jaxlora factored all-linear", _lora_config(args, "all-linear"), "factored"),
        ("jaxlora factored all-linear, dropout 0.1", _lora_config(args, "all-linear", 0.1),
         "factored"),
    ]  # fmt: skip
    if not args.quick:
        configs += [
            ("jaxlora factored q,v, dropout 0.1", _lora_config(args, QV, 0.1), "factored"),
            ("jaxlora merged q,v", _lora_config(args, QV), "merged"),
            ("jaxlora merged all-linear", _lora_config(args, "all-linear"), "merged"),
        ]
    if args.tiny:  # the smoke test: these rows run the code of the rows kept, on other layers
        skipped = ("jaxlora factored q,v, dropout 0.1", "jaxlora merged all-linear")
        configs = [config for config in configs if config[0] not in skipped]
    rows = linen_rows("linen", model, params, batch, configs)
    floors = [("floor q,v", QV), ("floor all-linear", ALL_LINEAR)]
    return rows + linen_floors("linen", model, params, batch, floors)


def linen_mha_group(args, c, batch) -> list[JaxRunner]:
    model, params = models_gpt.init_attention(c, jax.random.key(0))
    layouts = jaxlora.infer_layouts(model, batch[:, :-1])
    configs = [
        ("jaxlora factored q,v", _lora_config(args, QV_MHA, layouts=layouts), "factored"),
        ("jaxlora factored all-linear", _lora_config(args, "all-linear", layouts=layouts),
         "factored"),
        ("jaxlora factored all-linear, dropout 0.1",
         _lora_config(args, "all-linear", 0.1, layouts), "factored"),
    ]  # fmt: skip
    rows = linen_rows("linen-mha", model, params, batch, configs)
    floors = [("floor q,v", QV_MHA), ("floor all-linear", ALL_LINEAR_MHA)]
    return rows + linen_floors("linen-mha", model, params, batch, floors)


def bf16_group(args, c, batch) -> list[JaxRunner]:
    model, params = models_gpt.init(c, jax.random.key(0))
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    configs = [("jaxlora factored all-linear", _lora_config(args, "all-linear"), "factored")]
    rows = linen_rows("bf16", model, params, batch, configs)
    return rows + linen_floors("bf16", model, params, batch, [("floor all-linear", ALL_LINEAR)])


def nnx_group(args, c, batch) -> list[JaxRunner]:
    module = models_gpt.init_nnx(c)
    layouts = jaxlora.infer_layouts(module)
    graphdef, state = nnx.split(module)

    def full(t, f, inputs, key):
        return nnx.merge(graphdef, t)(inputs)

    rows = [JaxRunner("full FT", "nnx", full, state, None, batch)]
    configs = [
        ("jaxlora factored q,v", _lora_config(args, QV_MHA, layouts=layouts)),
        ("jaxlora factored all-linear", _lora_config(args, "all-linear", layouts=layouts)),
        ("jaxlora factored all-linear, dropout 0.1",
         _lora_config(args, "all-linear", 0.1, layouts)),
    ]  # fmt: skip
    for name, config in configs:
        frozen, lora = jaxlora.split(state, config, jax.random.key(1))

        def lora_fwd(t, f, inputs, key, config=config):
            rngs = {"dropout": key} if config.lora_dropout else None
            return jaxlora.apply(graphdef, f, t, config, inputs, rngs=rngs)

        rows.append(JaxRunner(name, "nnx", lora_fwd, lora, frozen, batch))
    rows += nnx_floors(c, batch, [("floor q,v", QV_MHA), ("floor all-linear", ALL_LINEAR_MHA)])
    if not args.quick:
        rows += qwix_rows(args, c, batch)
    return rows


#: ``(row name, targets, LoRA dropout)`` of the groups run by ``jaxlora.factored``; their floors.
FACTORED_VARIANTS = [("q,v", QV, 0.0), ("all-linear", "all-linear", 0.0),
                     ("all-linear, dropout 0.1", "all-linear", 0.1)]  # fmt: skip
FUNCTION_FLOORS = [("floor q,v", QV), ("floor all-linear", ALL_LINEAR)]


def _factored_rows(args, group, fn, params, batch, variants) -> list[JaxRunner]:
    """Full FT of ``fn(params, inputs)``'s every leaf, then one ``jaxlora.factored`` row per
    variant of ``(name, targets, dropout)``."""

    def full(t, f, inputs, key):
        return fn(t, inputs)

    rows = [JaxRunner("full FT", group, full, params, None, batch)]
    for name, targets, dropout in variants:
        config = _lora_config(args, targets, dropout)
        frozen, lora = jaxlora.split(params, config, jax.random.key(1))
        forward = jaxlora.factored(fn, config)

        def lora_fwd(t, f, inputs, key, forward=forward, dropout=dropout):
            return forward(f, t, inputs, lora_key=key if dropout else None)

        rows.append(JaxRunner(f"jaxlora factored {name}", group, lora_fwd, lora, frozen, batch))
    return rows


def plain_group(args, c, batch) -> list[JaxRunner]:
    """The GPT as a plain JAX function: full FT, ``jaxlora.factored`` adapters, floors."""
    _, params = models_gpt.init(c, jax.random.key(0))

    def fn(p, inputs):
        return models_gpt.plain_gpt(p, inputs, c)

    rows = _factored_rows(args, "plain", fn, params, batch, FACTORED_VARIANTS)
    return rows + function_floors("plain", fn, params, batch, FUNCTION_FLOORS)


def equinox_group(args, c, batch) -> list[JaxRunner]:
    """The GPT in Equinox (``models_gpt_eqx.py``, holding the linen GPT's params): full FT of every
    float array, ``jaxlora.factored`` adapters over the model's own call, floors. Skipped (no rows)
    when Equinox, an optional extra, is not installed."""
    try:
        import equinox as eqx

        from experiments.benchmarks import models_gpt_eqx
    except ImportError:
        print("equinox is not installed (`pip install jaxlora[equinox]`): its group is skipped")
        return []
    _, params = models_gpt.init(c, jax.random.key(0))
    model = models_gpt_eqx.from_params(params, c)
    # The arrays are trained or frozen; the rest (none in this model, but any field that is not a
    # float array) stays a Python constant of the step.
    arrays, static = eqx.partition(model, eqx.is_inexact_array)

    def fn(arrays, inputs):
        return jax.vmap(eqx.combine(arrays, static))(inputs)

    variants, floors = FACTORED_VARIANTS, FUNCTION_FLOORS
    if args.tiny:  # the smoke test: q,v runs the all-linear rows' code on fewer layers
        variants, floors = variants[1:], floors[1:]
    rows = _factored_rows(args, "equinox", fn, arrays, batch, variants)
    return rows + equinox_floors("equinox", fn, arrays, batch, floors)


def inference_group(args, c, batch) -> list[JaxRunner]:
    """Forwards: the base model, the merged adapter (merged once, then the plain model: the same
    function as the base) and factored adapters. All take the same arguments, so the base and
    merged rows time identical programs; any gap between them is noise."""
    model, params = models_gpt.init(c, jax.random.key(0))

    def plain(t, f, inputs, key):
        return model.apply({"params": t}, inputs)

    rows = [JaxRunner("base", "inference", plain, params, None, batch, "infer")]
    qv = _lora_config(args, QV)
    frozen, lora = jaxlora.split(params, qv, jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # a trained-looking adapter
    merged = jaxlora.merge(frozen, lora, qv)
    rows.append(JaxRunner("jaxlora merged q,v", "inference", plain, merged, None, batch, "infer"))
    for name, config in [("q,v", qv), ("all-linear", _lora_config(args, "all-linear"))]:
        frozen, lora = jaxlora.split(params, config, jax.random.key(1))

        def factored(t, f, inputs, key, config=config):
            return jaxlora.apply(model, f, t, config, inputs)

        rows.append(
            JaxRunner(
                f"jaxlora factored {name}", "inference", factored, lora, frozen, batch, "infer"
            )  # fmt: skip
        )
    return rows


BUILDERS: dict[str, Callable[..., list[JaxRunner]]] = {
    "linen": linen_group,
    "linen-mha": linen_mha_group,
    "nnx": nnx_group,
    "bf16": bf16_group,
    "plain": plain_group,
    "equinox": equinox_group,
    "inference": inference_group,
}


def build(args: Any, c: models_gpt.GPTConfig, batch: jax.Array) -> list[JaxRunner]:
    """Every runner of the groups in ``args.groups``."""
    return [runner for group in args.groups for runner in BUILDERS[group](args, c, batch)]
