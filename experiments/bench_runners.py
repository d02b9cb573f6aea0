"""The JAX configurations of ``bench_train_step.py``: each a compiled training step (or forward).

A :class:`JaxRunner` holds one compiled step and its state; the builders below make the runners of
each group (a model and the fine-tuning variants compared with its own full fine-tuning):

* ``linen``: the GPT of ``models_gpt.py`` (separate ``nn.Dense`` q/k/v/o), float32;
* ``linen-mha``: the same GPT with Flax's ``nn.MultiHeadDotProductAttention``;
* ``nnx``: the same GPT in Flax NNX (``nnx.MultiHeadAttention``, ``nnx.Linear``), with qwix's LoRA
  beside jaxlora's when qwix is installed;
* ``bf16``: the linen GPT with bfloat16 weights and activations, a float32 adapter (PEFT's default);
* ``inference``: forwards of the linen GPT: base, merged adapter, factored adapter.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxlora
from experiments import models_gpt

QV = ["q_proj", "v_proj"]
QV_MHA = ["query", "value"]
GROUPS = ("linen", "linen-mha", "nnx", "bf16", "inference")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _xla_memory(compiled) -> dict[str, float]:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    return {"temp_mb": round(stats.temp_size_in_bytes / 2**20, 1)}


def _size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


class JaxRunner:
    """One configuration, compiled ahead of time; :meth:`run` times one step (or forward).

    Args:
        name: the row's name; group: the model group (ratios are to the group's full FT).
        forward: ``forward(trainable, frozen, inputs, key) -> logits``.
        trainable, frozen: the trained tree and everything else (None for full fine-tuning).
        batch: ``int[batch, seq + 1]`` token ids.
        kind: ``"train"`` (AdamW step on ``trainable``) or ``"infer"`` (forward only).
    """

    def __init__(self, name, group, forward, trainable, frozen, batch, kind="train"):
        rss_before = _rss_mb()
        self.name, self.group, self.kind = name, group, kind
        self.trainable = _size(trainable) if kind == "train" else 0
        inputs, targets = batch[:, :-1], batch[:, 1:]
        self.key = jax.random.key(7)
        if kind == "train":
            opt = optax.adamw(1e-4)

            def step(trainable, opt_state, frozen, key):
                def loss_fn(t):
                    return models_gpt.next_token_loss(forward(t, frozen, inputs, key), targets)

                loss, grads = jax.value_and_grad(loss_fn)(trainable)
                updates, opt_state = opt.update(grads, opt_state, trainable)
                return optax.apply_updates(trainable, updates), opt_state, loss

            # A copy: the step donates its trainable tree, which other runners may share.
            trainable = jax.tree.map(lambda x: x.copy(), trainable)
            self.args = [trainable, opt.init(trainable), frozen]
            self.fn = jax.jit(step, donate_argnums=(0, 1))
        else:
            self.args = [trainable, frozen]
            self.fn = jax.jit(lambda t, f, key: forward(t, f, inputs, key))
        self.fn = self.fn.lower(*self.args, self.key).compile()
        self.memory = _xla_memory(self.fn)
        self.run()  # the first call, outside the timings
        self.memory["rss_delta_mb"] = round(_rss_mb() - rss_before, 1)
        self.times: list[float] = []

    def run(self) -> float:
        self.key = jax.random.fold_in(self.key, 1)  # a fresh dropout mask each step
        start = time.perf_counter()
        out = self.fn(*self.args, self.key)
        if self.kind == "train":
            self.args[:2] = out[:2]
        jax.block_until_ready(out)
        return time.perf_counter() - start


def _lora_config(args, targets, dropout=0.0, layouts=None) -> jaxlora.LoraConfig:
    return jaxlora.LoraConfig(
        r=args.r, lora_alpha=args.alpha, target_modules=targets, lora_dropout=dropout,
        layouts=layouts,
    )  # fmt: skip


def _linen_rows(group, model, params, batch, configs) -> list[JaxRunner]:
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
    return _linen_rows("linen", model, params, batch, configs)


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
    return _linen_rows("linen-mha", model, params, batch, configs)


def bf16_group(args, c, batch) -> list[JaxRunner]:
    model, params = models_gpt.init(c, jax.random.key(0))
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    configs = [("jaxlora factored all-linear", _lora_config(args, "all-linear"), "factored")]
    return _linen_rows("bf16", model, params, batch, configs)


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
    if not args.quick:
        rows += qwix_rows(args, c, batch)
    return rows


def qwix_rows(args, c, batch) -> list[JaxRunner]:
    """qwix's LoRA on the same NNX model, same targets and rank (skipped if qwix is missing)."""
    try:
        import qwix
    except ImportError:
        print("qwix is not installed (`pip install qwix`): its rows are skipped")
        return []
    rows = []
    all_linear = r".*(query|key|value|out|fc_in|fc_out)"
    for name, pattern in [("qwix q,v", r".*(query|value)"), ("qwix all-linear", all_linear)]:
        rule = qwix.LoraRule(module_path=pattern, rank=args.r, alpha=args.alpha)
        provider = qwix.LoraProvider([rule])
        model = qwix.apply_lora_to_model(models_gpt.init_nnx(c), provider, batch[:, :-1])
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

        def forward(t, f, inputs, key, graphdef=graphdef):
            return nnx.merge(graphdef, t, f)(inputs)

        rows.append(JaxRunner(name, "nnx", forward, lora, rest, batch))
    return rows


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
    "inference": inference_group,
}


def build(args: Any, c: models_gpt.GPTConfig, batch: jax.Array) -> list[JaxRunner]:
    """Every runner of the groups in ``args.groups``."""
    return [runner for group in args.groups for runner in BUILDERS[group](args, c, batch)]
