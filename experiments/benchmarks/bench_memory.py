"""Peak training memory: full fine-tuning vs LoRA on an fp32, bf16, int8 and NF4 frozen base.

One AdamW training step of a parameter-dominated Llama-style decoder (``jaxlora.models.llama``,
~335M parameters at the default size, batch 1 × 128 tokens) for each configuration, each in its
own process (``--per-process N`` runs N in one, as the smoke test does to save JAX starts; their
RSS is then not each its own). Two measures per configuration:

* XLA's view: ``jax.jit(step).lower(...).compile().memory_analysis()``: arguments + outputs −
  donated (aliased) buffers + temporaries: the bytes the step needs at its peak.
* the process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over two training steps.
  The params are built leaf by leaf in their stored form (never a full fp32 copy for the quantised
  bases) and the step is compiled first; after each phase the allocator is trimmed
  (``malloc_trim``) and the peak is reset (``/proc/self/clear_refs``), so ``peak_rss_mb`` is the
  steps' own peak: live params, optimizer state, buffers of the step, plus the JAX runtime. The
  build and compile peaks are recorded separately. The ``idle`` row is a process that imports
  everything and runs a tiny jitted function.

LoRA is r=8 on every linear kernel but the output head (``"all-linear"``, as QLoRA), run through
``jaxlora.apply``. Two forward paths: ``merged`` (``W + s·A·B`` folded inside the loss; a quantised
base is dequantised as a whole tree first) and ``factored`` (each adapted layer adds its low-rank
term; each quantised kernel is dequantised inside its layer call and again in the backward pass).
Quantised bases keep the embedding table, norms and head in bfloat16. The ``_remat`` rows, full
fine-tuning included, recompute every decoder block in the backward pass
(``jaxlora.remat``, ``remat=r"layers_\\d+"``) instead of keeping its activations (QLoRA trains
with gradient checkpointing too); their ratios are to ``full_ft_remat``.

    python experiments/benchmarks/bench_memory.py            # -> results/bench_memory.{json,md}
    python experiments/benchmarks/bench_memory.py --small    # a small model (2 layers, d 64)
    python experiments/benchmarks/bench_memory.py --tiny     # its 1-layer twin, the smoke test
    python experiments/benchmarks/bench_memory.py --quality  # NF4 vs fp32 LoRA accuracy (RT)
    python experiments/benchmarks/bench_memory.py --nnx      # + the NNX rows -> bench_memory_nnx.*

The ``nnx_`` rows run the same decoder written in NNX (``_nnx_llama``: the same kernels, shapes
and maths, ``layers/i`` for ``layers_i``), its params an ``nnx.State`` passed to ``jaxlora.apply``
with the graphdef; full fine-tuning differentiates the state. The goal is linen's numbers: each
``nnx_`` row's ratio to NNX full fine-tuning should equal the linen row's ratio.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
import zlib

#: ``experiments/``: results go to its ``results/``; the repository root above it is put on
#: ``sys.path`` for ``--quality``, which imports ``experiments.examples.sentiment``.
EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    # name: (kind, base storage, forward path, decoder blocks recomputed in the backward pass)
    "idle": ("idle", None, None, False),
    "full_ft": ("full", "float32", None, False),
    "lora_fp32_merged": ("lora", "float32", "merged", False),
    "lora_bf16_merged": ("lora", "bfloat16", "merged", False),
    "lora_int8_merged": ("lora", "int8", "merged", False),
    "lora_nf4_merged": ("lora", "nf4", "merged", False),
    "lora_fp32_factored": ("lora", "float32", "factored", False),
    "lora_bf16_factored": ("lora", "bfloat16", "factored", False),
    "lora_int8_factored": ("lora", "int8", "factored", False),
    "lora_nf4_factored": ("lora", "nf4", "factored", False),
    "full_ft_remat": ("full", "float32", None, True),
    "lora_fp32_factored_remat": ("lora", "float32", "factored", True),
    "lora_bf16_factored_remat": ("lora", "bfloat16", "factored", True),
    "lora_int8_factored_remat": ("lora", "int8", "factored", True),
    "lora_nf4_factored_remat": ("lora", "nf4", "factored", True),
}
# The same rows for the same decoder written in NNX (``NnxLlama``): an ``nnx.State`` base run
# through ``jaxlora.apply`` on its graphdef; full fine-tuning differentiates the state itself.
CONFIGS.update({f"nnx_{name}": spec for name, spec in list(CONFIGS.items()) if name != "idle"})
#: The modules the ``_remat`` rows recompute (``jaxlora.remat``): every decoder block.
REMAT_MODULES = r"layers_\d+"
NNX_REMAT_MODULES = r"layers/\d+"
SIZES = {
    "default": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=21,
                    num_heads=16, num_kv_heads=16, head_dim=64, tie_word_embeddings=False),
    "small": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=4, head_dim=16, tie_word_embeddings=False),
}  # fmt: skip
# The smoke test's size: one block runs every code path (remat included) and compiles faster.
SIZES["tiny"] = {**SIZES["small"], "num_layers": 1}
SEQ_LEN = {"default": 128, "small": 16, "tiny": 16}
RANK = 8


def _nnx_llama(cfg):
    """``jaxlora.models.llama.LlamaForCausalLM`` (no cache, no bias, ``num_kv_heads ==
    num_heads``) in NNX: the same kernels under the same names, ``layers/i`` for ``layers_i``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlora.models.llama import apply_rope

    def linear(d_in, d_out, rngs):
        return nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs)

    class Attention(nnx.Module):
        def __init__(self, rngs):
            width = cfg.num_heads * cfg.head_dim
            self.q_proj, self.k_proj, self.v_proj = (
                linear(cfg.hidden_size, width, rngs) for _ in range(3)
            )
            self.o_proj = linear(width, cfg.hidden_size, rngs)

        def __call__(self, x, positions, mask):
            batch, length, _ = x.shape

            def heads(y):
                return y.reshape(batch, length, cfg.num_heads, cfg.head_dim)

            def rope(y):
                return apply_rope(y, positions, cfg.rope_theta, cfg.rope_interleaved)

            q, k, v = (
                rope(heads(self.q_proj(x))),
                rope(heads(self.k_proj(x))),
                heads(self.v_proj(x)),
            )
            scores = jnp.einsum("bqhd,bshd->bhqs", q, k) / jnp.sqrt(jnp.float32(cfg.head_dim))
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
            out = jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(scores, axis=-1), v)
            return self.o_proj(out.reshape(batch, length, -1))

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, rngs)
            self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, rngs)
            self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, rngs)

        def __call__(self, x):
            return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nnx.Module):
        def __init__(self, rngs):
            norm = {"epsilon": cfg.rms_norm_eps, "rngs": rngs}
            self.input_layernorm = nnx.RMSNorm(cfg.hidden_size, **norm)
            self.self_attn = Attention(rngs)
            self.post_attention_layernorm = nnx.RMSNorm(cfg.hidden_size, **norm)
            self.mlp = Mlp(rngs)

        def __call__(self, x, positions, mask):
            x = x + self.self_attn(self.input_layernorm(x), positions, mask)
            return x + self.mlp(self.post_attention_layernorm(x))

    class NnxLlama(nnx.Module):
        def __init__(self, rngs):
            self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
            self.layers = nnx.List([Block(rngs) for _ in range(cfg.num_layers)])
            self.norm = nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, rngs=rngs)
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, rngs)

        def __call__(self, ids):
            length = ids.shape[1]
            positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
            mask = (jnp.arange(length)[None, :] <= jnp.arange(length)[:, None])[None, None]
            x = self.embed_tokens(ids)
            for layer in self.layers:
                x = layer(x, positions, mask)
            return self.lm_head(self.norm(x))

    return nnx.eval_shape(lambda: NnxLlama(nnx.Rngs(0)))


def _rss_mb() -> float:
    """Peak RSS of this process since start (or since the last :func:`_reset_peak`), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> bool:
    """Frees what the allocator holds and resets the peak RSS to the current RSS (Linux >= 4.0)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _build_params(shapes, storage: str, lora_config):
    """Random params (0.02·N(0, 1)) created leaf by leaf directly in their stored form, in the
    structure of ``shapes`` (a linen params dict, or an ``nnx.State`` with its ``Variable`` s)."""
    import jax
    import jax.numpy as jnp

    from jaxlora import find_targets, quant
    from jaxlora._src import paths

    targets = {t.keys + (t.leaf,): t for t in find_targets(shapes, lora_config)}
    float_dtype = jnp.float32 if storage == "float32" else jnp.bfloat16
    key = jax.random.key(0)

    def make(keys, names, leaf):
        # NNX's layers/i is linen's layers_i: both frameworks draw the same weights.
        name = re.sub(r"(^|/)layers/(\d+)", r"\1layers_\2", paths.join(names))
        leaf_key = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        if names[-1] == "scale":
            return jnp.ones(leaf.shape, float_dtype)
        if storage in ("int8", "nf4") and keys in targets:
            w = 0.02 * jax.random.normal(leaf_key, leaf.shape, jnp.bfloat16)
            double = storage == "nf4"
            return quant.quantize_kernel(w, storage, targets[keys].layout, 64, double)
        return 0.02 * jax.random.normal(leaf_key, leaf.shape, float_dtype)

    def built(keys, names, leaf):
        value = make(keys, names, leaf)
        jax.block_until_ready(value)  # one leaf at a time: never a full float copy in flight
        return value

    return paths.map_with_keys(built, shapes)


def _nbytes(tree) -> int:
    import jax

    from jaxlora import quant

    leaves = jax.tree.leaves(tree, is_leaf=quant.is_quantized)
    return sum(x.nbytes for x in leaves)


def run_config(name: str, size: str = "default", steps: int = 2) -> dict:
    """Runs one configuration in this process and returns its measurements."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jaxlora
    from jaxlora import quant
    from jaxlora.models.llama import LlamaConfig, LlamaForCausalLM

    kind, storage, path, remat = CONFIGS[name]
    out = {"config": name, "kind": kind, "base": storage, "path": path, "remat": remat,
           "size": size}  # fmt: skip
    if kind == "idle":
        jax.block_until_ready(jax.jit(lambda x: x * 2)(jnp.ones(4)))
        _reset_peak()
        return {**out, "peak_rss_mb": _rss_mb()}
    cfg = LlamaConfig(**SIZES[size])
    ids = jax.random.randint(jax.random.key(1), (1, SEQ_LEN[size] + 1), 0, cfg.vocab_size)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    lora_config = jaxlora.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    t0 = time.perf_counter()
    is_nnx = name.startswith("nnx_")
    out["framework"] = "nnx" if is_nnx else "linen"
    if is_nnx:
        model, shapes = nnx.split(_nnx_llama(cfg))  # jaxlora.apply takes the graphdef
    else:
        model = LlamaForCausalLM(cfg)
        shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
    params = _build_params(shapes, storage, lora_config)
    leaves = jax.tree.leaves(params, is_leaf=quant.is_quantized)
    out["params"] = sum(math.prod(x.shape) for x in leaves)
    out["base_bytes"] = _nbytes(params)
    out["peak_rss_build_mb"] = _rss_mb()

    def xent(logits):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))

    opt = optax.adamw(1e-4)
    checkpointing = (NNX_REMAT_MODULES if is_nnx else REMAT_MODULES) if remat else None
    if kind == "full":

        def forward(params):
            if is_nnx:
                module = nnx.merge(model, params)
                if checkpointing is None:
                    return module(inputs)
                with jaxlora.remat.checkpointed_nnx(module, checkpointing):
                    return module(inputs)
            if checkpointing is None:
                return model.apply({"params": params}, inputs)
            with jaxlora.remat.checkpointed(checkpointing):
                return model.apply({"params": params}, inputs)

        def step(params, opt_state):
            loss, grads = jax.value_and_grad(lambda p: xent(forward(p)))(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        state = (params, opt.init(params))
        extra = ()
    else:
        _, lora = quant.split_quantized(params, lora_config, jax.random.key(2))
        out["trainable"] = sum(int(x.size) for x in jax.tree.leaves(lora))

        def step(lora, opt_state, frozen):
            def loss_fn(lora):
                logits = jaxlora.apply(
                    model, frozen, lora, lora_config, inputs, mode=path, remat=checkpointing
                )
                return xent(logits)

            loss, grads = jax.value_and_grad(loss_fn)(lora)
            updates, opt_state = opt.update(grads, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state, loss

        state = (lora, opt.init(lora))
        extra = (params,)
    out["peak_reset"] = _reset_peak()
    out["rss_before_compile_mb"] = _current_rss_mb()
    jitted = jax.jit(step, donate_argnums=(0, 1))
    compiled = jitted.lower(*state, *extra).compile()
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    mem = compiled.memory_analysis()
    for field in ("argument", "output", "alias", "temp"):
        out[f"xla_{field}_bytes"] = int(getattr(mem, f"{field}_size_in_bytes"))
    out["xla_peak_bytes"] = (
        out["xla_argument_bytes"] + out["xla_output_bytes"] - out["xla_alias_bytes"]
        + out["xla_temp_bytes"]
    )  # fmt: skip
    out["peak_rss_compile_mb"] = _rss_mb()
    _reset_peak()
    out["rss_before_step_mb"] = _current_rss_mb()
    t1 = time.perf_counter()
    for _ in range(steps):
        *new_state, loss = compiled(*state, *extra)
        state = tuple(new_state)
    out["loss"] = float(loss)
    out["step_s"] = round((time.perf_counter() - t1) / steps, 2)
    out["peak_rss_mb"] = _rss_mb()  # the training steps' own peak
    return out


def _group(row: dict) -> tuple[str, bool]:
    """Rows compare to the full fine-tuning row of their framework and checkpointing."""
    return row.get("framework", "linen"), row.get("remat", False)


def _xla_ratio(row: dict, rows: list[dict]) -> float:
    full = next(r for r in rows if r["kind"] == "full" and _group(r) == _group(row))
    return row["xla_peak_bytes"] / full["xla_peak_bytes"]


def _parity_table(rows: list[dict]) -> str:
    """linen and NNX side by side: XLA peak and its ratio to full fine-tuning, per configuration."""
    by_name = {r["config"]: r for r in rows}
    lines = [
        "| configuration | linen XLA peak (MiB) | NNX XLA peak (MiB) | linen / full FT "
        "| NNX / full FT | NNX − linen ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, linen in by_name.items():
        nnx_row = by_name.get(f"nnx_{name}")
        if nnx_row is None or linen["kind"] == "idle":
            continue
        a, b = _xla_ratio(linen, rows), _xla_ratio(nnx_row, rows)
        lines.append(
            f"| {name} | {linen['xla_peak_bytes'] / 2**20:.1f} "
            f"| {nnx_row['xla_peak_bytes'] / 2**20:.1f} | {a:.3f} | {b:.3f} | {b - a:+.3f} |"
        )
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    """One line per configuration; each ratio is to the full fine-tuning row with the same
    checkpointing (blocks recomputed or not)."""
    fulls = {_group(r): r for r in rows if r["kind"] == "full"}
    idle = next((r for r in rows if r["config"] == "idle"), None)
    lines = [
        "| configuration | base | path | blocks recomputed | base bytes (MiB) | XLA peak (MiB) "
        "| XLA / full FT | step peak RSS (MiB) | RSS / full FT | (RSS − idle) / (full FT − idle) "
        "| lifetime peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "idle":
            lines.append(f"| idle process | | | | | | | {r['peak_rss_mb']:.0f} | | | |")
            continue
        full = fulls.get(_group(r))
        xla = r["xla_peak_bytes"] / 2**20
        ratio = r["xla_peak_bytes"] / full["xla_peak_bytes"] if full else float("nan")
        rss = r["peak_rss_mb"] / full["peak_rss_mb"] if full else float("nan")
        lifetime = max(r["peak_rss_build_mb"], r["peak_rss_compile_mb"], r["peak_rss_mb"])
        net = float("nan")
        if full and idle:
            net = (r["peak_rss_mb"] - idle["peak_rss_mb"]) / (
                full["peak_rss_mb"] - idle["peak_rss_mb"]
            )
        lines.append(
            f"| {r['config']} | {r['base']} | {r['path'] or 'full'} "
            f"| {'yes' if r.get('remat') else 'no'} "
            f"| {r['base_bytes'] / 2**20:.0f} | {xla:.0f} | {ratio:.3f} "
            f"| {r['peak_rss_mb']:.0f} | {rss:.3f} | {net:.3f} | {lifetime:.0f} |"
        )
    return "\n".join(lines)


def run_quality(steps: int, n_test: int | None, seed: int = 0) -> list[dict]:
    """Rotten Tomatoes accuracy of LoRA r=8 (q,v) + head on all-MiniLM-L6-v2, with the encoder's
    linear kernels in float32 vs in NF4 (double-quantised): the QLoRA quality check.

    Same data, steps, batch, learning rate and seed as ``experiments/examples/quality.py``; both
    variants run the factored path (the NF4 one with
    :func:`jaxlora.quant.dequantizing_interceptor`)."""
    import flax.linen as nn
    import jax

    import jaxlora
    from experiments.examples import sentiment
    from jaxlora import lora_interceptor, quant

    task = sentiment.load_task(48, n_test=n_test, seed=seed)
    model, params = sentiment.load_model(seed)
    config = sentiment.lora_config(8, 16)
    rows = []
    for base in ("float32", "nf4"):
        frozen = params
        if base == "nf4":
            frozen = quant.quantize(params, "all-linear", "nf4", 64, double_quant=True)

        def forward(weights, ids, mask):
            lora, frozen = weights
            with nn.intercept_methods(lora_interceptor(config)):
                with nn.intercept_methods(quant.dequantizing_interceptor()):
                    tree = {"params": jaxlora.adapted_params(frozen, lora, config)}
                    return model.apply(tree, ids, mask)

        def loss(lora, frozen, ids, mask, labels):
            return sentiment.cross_entropy(forward((lora, frozen), ids, mask), labels)

        _, lora = quant.split_quantized(frozen, config, jax.random.key(seed))
        start = time.perf_counter()
        lora, losses, _ = sentiment.train(
            loss, lora, frozen, task, steps=steps, batch_size=32, learning_rate=2e-3, seed=seed
        )
        logits = sentiment.predict(forward, (lora, frozen), task)
        rows.append({
            "base": base, "base_bytes": _nbytes(frozen), "n_test": len(task.test_labels),
            "accuracy": sentiment.accuracy(logits, task.test_labels),
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": round(time.perf_counter() - start, 1),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _write_quality(rows: list[dict], out: str, command: str, steps: int, n_test: int) -> None:
    lines = [
        f"# QLoRA quality\n\n`{command}`: all-MiniLM-L6-v2 + head on Rotten Tomatoes, LoRA r=8 "
        f"(q,v), {steps} steps of batch 32, {n_test:,} test snippets; NF4 = every encoder linear "
        "kernel in NF4 with double quantisation, factored forward.\n",
        "| frozen base | base bytes (MiB) | test accuracy | train loss (last 20) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['base']} | {r['base_bytes'] / 2**20:.1f} | {r['accuracy']:.4f} "
            f"| {r['final_train_loss']:.4f} |"
        )
    gap = 100 * (rows[0]["accuracy"] - rows[1]["accuracy"])
    lines.append(f"\nfp32 − NF4 accuracy: {gap:+.2f} points.")
    stem = os.path.join(out, "bench_memory_quality")
    with open(stem + ".json", "w") as f:
        json.dump({"command": command, "steps": steps, "rows": rows}, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _run_workers(names: list[str], size: str) -> list[dict]:
    """The rows of ``names``, run one after another in one worker process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(names)]
    cmd += [] if size == "default" else [f"--{size}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or len(found) != len(names):
        failed = names[min(len(found), len(names) - 1)]
        raise SystemExit(f"configuration {failed} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line[len("RESULT ") :]) for line in found]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="small model (2 layers, d 64)")
    parser.add_argument(
        "--tiny", action="store_true", help="the small model's 1-layer twin (smoke)"
    )
    parser.add_argument("--configs", default=None, help="comma-separated names")
    parser.add_argument(
        "--nnx",
        action="store_true",
        help="the NNX rows and their linen twins, run together -> bench_memory_nnx.{json,md}",
    )
    parser.add_argument("--out", default=os.path.join(EXPERIMENTS, "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # comma-separated configurations
    parser.add_argument(
        "--per-process",
        type=int,
        default=1,
        help="configurations per worker process (default 1: each has its own, so its peak RSS "
        "is its own; the smoke test runs several in one, paying for one JAX start)",
    )
    parser.add_argument("--quality", action="store_true", help="the Rotten Tomatoes QLoRA check")
    parser.add_argument("--steps", type=int, default=300, help="--quality: training steps")
    parser.add_argument("--n-test", type=int, default=None, help="--quality: test snippets")
    args = parser.parse_args(argv)
    if args.quality:
        sys.path.insert(0, os.path.dirname(EXPERIMENTS))
        rows = run_quality(args.steps, args.n_test)
        command = "python experiments/benchmarks/bench_memory.py " + " ".join(argv or sys.argv[1:])
        os.makedirs(args.out, exist_ok=True)
        _write_quality(rows, args.out, command.strip(), args.steps, rows[0]["n_test"])
        return 0
    size = "tiny" if args.tiny else "small" if args.small else "default"
    if args.worker:
        for name in args.worker.split(","):
            print("RESULT " + json.dumps(run_config(name, size)), flush=True)
        return 0
    linen_names = [n for n in CONFIGS if not n.startswith("nnx_")]
    default = [n for n in CONFIGS if n != "idle"] if args.nnx else linen_names
    names = args.configs.split(",") if args.configs else default
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    if args.per_process < 1:
        parser.error(f"--per-process must be at least 1, got {args.per_process}")
    rows = []
    for first in range(0, len(names), args.per_process):
        rows += _run_workers(names[first : first + args.per_process], size)
    import jax

    command = "python experiments/benchmarks/bench_memory.py " + " ".join(argv or sys.argv[1:])
    meta = {
        "command": command.strip(),
        "model": SIZES[size],
        "seq_len": SEQ_LEN[size],
        "batch": 1,
        "lora": {"r": RANK, "lora_alpha": 2 * RANK, "target_modules": "all-linear"},
        "optimizer": "optax.adamw(1e-4)",
        "jax": jax.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
    }
    os.makedirs(args.out, exist_ok=True)
    stem = "bench_memory" + ("_nnx" if args.nnx else "") + ("" if size == "default" else f"_{size}")
    stem = os.path.join(args.out, stem)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(
            f"# Peak training memory\n\n`{meta['command']}` ({meta['date']}, jax {meta['jax']}, "
        )
        f.write(f"{meta['machine']}); model {meta['model']}, batch 1 × {meta['seq_len']}.\n\n")
        f.write(_table(rows) + "\n")
        if args.nnx:
            f.write("\nlinen and NNX, the same decoder and step:\n\n" + _parity_table(rows) + "\n")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
