"""Model-FLOP utilisation of a LoRA step on an accelerator: a ~1B Llama-style model in bfloat16.

One prepared run for a GPU (or TPU) machine: it measures the chip's bfloat16 matmul peak itself
(the best of a few large square matmuls), then times a training step of
:class:`jaxlora.models.llama.LlamaForCausalLM` (hidden 2048, 16 layers, 32 heads, 8 KV heads,
MLP 8192, vocab 32000: 1.1B parameters) on batch 8 x seq 1024:

* full fine-tuning (AdamW on every weight) and
* jaxlora factored LoRA, all-linear, r 16 (AdamW on Θ only),

and reports each step's time and model-FLOP utilisation (MFU) against the measured peak. Model
FLOPs per token are the usual count: ``6·N`` for full fine-tuning (forward, input gradient and
weight gradient of every matmul weight), ``4·N`` for LoRA (no weight gradient of the frozen
weights), plus ``12·L·d·T`` for attention (forward and backward) in both; N counts the matmul
weights (embedding lookups excluded, the tied output head included). XLA's own FLOP count of each
compiled step is reported beside it. Goal: LoRA MFU >= 50%.

Run::

    python -m experiments.benchmarks.gpu_mfu         # on the accelerator machine, a few minutes
    python -m experiments.benchmarks.gpu_mfu --tiny  # a tiny model on CPU: checks the script runs

Writes ``experiments/results/gpu_mfu.json`` and ``.md`` (``--tiny``: ``gpu_mfu_tiny``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import jaxlora
from experiments.benchmarks import results_io
from jaxlora.models.llama import LlamaConfig, LlamaForCausalLM

RESULTS = Path(__file__).resolve().parents[1] / "results"
BILLION = LlamaConfig(
    vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64, rope_interleaved=False, tie_word_embeddings=True,
    max_position_embeddings=4096,
)  # fmt: skip
#: ``--tiny``: one layer runs every code path of the step (compiled on CPU, for the smoke test).
TINY = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
    num_kv_heads=2, head_dim=16, rope_interleaved=False, max_position_embeddings=128,
)  # fmt: skip


def _time(fn, *args, steps: int) -> list[float]:
    jax.block_until_ready(fn(*args))  # warm
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(sizes: list[int], steps: int) -> dict:
    """The best bfloat16 FLOP/s over square matmuls of the given sizes (each timed ``steps``x)."""
    best = {}
    for n in sizes:
        a = jnp.ones((n, n), jnp.bfloat16)
        mm = jax.jit(lambda x, y: x @ y)
        seconds = min(_time(mm, a, a, steps=steps))
        best[n] = 2 * n**3 / seconds
    return {"flops_per_s": max(best.values()), "by_size": {str(k): v for k, v in best.items()}}


def matmul_params(config: LlamaConfig) -> int:
    """N: the parameters that take part in a matmul per token (the tied head, not the lookup)."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    attention = d * h * (2 * config.num_heads + 2 * config.num_kv_heads)
    return config.num_layers * (attention + 3 * d * f) + d * config.vocab_size


def model_flops(config: LlamaConfig, tokens: int, seq: int, lora: bool) -> float:
    attention = 12 * config.num_layers * config.hidden_size * seq
    return tokens * ((4 if lora else 6) * matmul_params(config) + attention)


def step_fn(model, frozen, config, targets_only: bool):
    opt = optax.adamw(1e-5)

    def loss(trainable, frozen, ids):
        if targets_only:
            logits = jaxlora.apply(model, frozen, trainable, config, ids[:, :-1])
        else:
            logits = model.apply({"params": trainable}, ids[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    def step(trainable, opt_state, frozen, ids):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, ids)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return opt, step


def run_step(name, model, trainable, frozen, lora_config, ids, steps) -> dict:
    opt, step = step_fn(model, frozen, lora_config, lora_config is not None)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; the caller keeps its own
    opt_state = opt.init(trainable)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, ids)
    compiled = compiled.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    state = [trainable, opt_state]
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        state[0], state[1], loss = compiled(state[0], state[1], frozen, ids)
        jax.block_until_ready(loss)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    return {
        "name": name,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "xla_flops": float(cost.get("flops", 0.0)) if cost else None,
        "trainable": sum(x.size for x in jax.tree.leaves(trainable)),
        "loss": float(loss),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (runs on CPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    config = TINY if args.tiny else BILLION
    batch, seq = args.batch or (2 if args.tiny else 8), args.seq or (16 if args.tiny else 1024)
    steps = args.steps or (2 if args.tiny else 10)
    peak = matmul_peak(
        [64, 128] if args.tiny else [4096, 8192, 16384], steps=3 if args.tiny else 10
    )
    model = LlamaForCausalLM(config)
    ids = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, config.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), ids[:, :-1])["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    lora_config = jaxlora.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear")
    frozen, lora = jaxlora.split(params, lora_config, jax.random.key(2))
    rows = [
        run_step("full fine-tuning", model, params, None, None, ids, steps),
        run_step(f"jaxlora factored all-linear r{args.r}", model, lora, frozen, lora_config, ids,
                 steps),
    ]  # fmt: skip
    tokens = batch * seq
    for row, is_lora in zip(rows, (False, True), strict=True):
        flops = model_flops(config, tokens, seq, is_lora)
        row["model_flops"] = flops
        row["mfu"] = flops / row["median_s"] / peak["flops_per_s"]
        row["tokens_per_s"] = tokens / row["median_s"]
    rows[1]["step_over_full"] = rows[1]["median_s"] / rows[0]["median_s"]
    device = jax.devices()[0]
    result = {
        "device": f"{device.platform}: {device.device_kind}",
        "model": {
            "config": repr(config),
            "parameters": sum(x.size for x in jax.tree.leaves(params)),
            "matmul_parameters": matmul_params(config),
        },  # fmt: skip
        "batch": batch,
        "seq": seq,
        "matmul_peak_flops_per_s": peak,
        "rows": rows,
        "goal_lora_mfu_at_least_0.5": rows[1]["mfu"] >= 0.5,
        "versions": {"jax": jax.__version__},
        "command": results_io.command("experiments.benchmarks.gpu_mfu"),
    }
    write(Path(args.out), "gpu_mfu_tiny" if args.tiny else "gpu_mfu", result)
    return result


def write(out: Path, stem: str, result: dict) -> None:
    peak = result["matmul_peak_flops_per_s"]["flops_per_s"]
    lines = [
        f"`{result['command']}` on {result['device']}; batch {result['batch']} x seq "
        f"{result['seq']}, {result['model']['parameters']:,} parameters; measured bf16 matmul "
        f"peak {peak / 1e12:.1f} TFLOP/s",
        "",
        "| step | trainable | median ms | min ms | tokens/s | MFU | XLA FLOPs / model FLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        xla = row["xla_flops"] / row["model_flops"] if row["xla_flops"] else float("nan")
        lines.append(
            f"| {row['name']} | {row['trainable']:,} | {1e3 * row['median_s']:.1f} | "
            f"{1e3 * row['min_s']:.1f} | {row['tokens_per_s']:,.0f} | {row['mfu']:.1%} | "
            f"{xla:.2f} |"
        )
    results_io.write(out, stem, result, lines)


if __name__ == "__main__":
    main()
