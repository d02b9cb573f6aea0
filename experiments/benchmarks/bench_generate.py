"""Benchmark of KV-cache generation (jaxlora/models/decoding/) on CPU: cost of one decode step.

Times, as min and median over rounds, of jitted calls on SmolLM2-135M (or a same-shape random
model with ``--random``), a batch of prompts and a LoRA r=8 adapter on q,v:

* ``forward 1 token (merged)``: the merged model's plain forward of one token per row, no cache:
  the floor a decode step is held to (goal: decode step within 1.3x);
* ``decode step (merged | factored | per-row)``: one cached step as the generation loop runs it
  (model call on one new token with the cache, greedy pick), the cache half full;
* ``generate (...)``: the whole jitted generation of ``--new-tokens`` tokens, and per new token
  ``(t(N) - t(1)) / (N - 1)`` (the prefill taken out); tokens/s for the batch.

Per-row adapters (a different adapter in each row, ``adapter_index``) are held to 1.3x a single
factored adapter. ``uptime`` is recorded before and after: other processes on the machine slow
every number alike. Writes experiments/results/bench_generate.{json,md}.

    python experiments/benchmarks/bench_generate.py          # SmolLM2-135M, minutes on 2 cores
    python experiments/benchmarks/bench_generate.py --quick  # a tiny random model, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jaxlora  # noqa: E402
from jaxlora.models import llama  # noqa: E402
from jaxlora.models.decoding import generate, sample_logits, step_function  # noqa: E402
from jaxlora.models.llama import weights as llama_weights  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
QUICK = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1,
                          num_heads=4, num_kv_heads=2, head_dim=16)  # fmt: skip
GOAL = 1.3


def _uptime() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _timed(fn, rounds: int) -> dict[str, float]:
    """Seconds per call of ``fn`` (already compiled by one warm-up call): min and median."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {"min_s": min(times), "median_s": statistics.median(times)}


def _model(args):
    if args.quick:
        config = QUICK
    elif args.random:
        config = llama.LlamaConfig()
    else:
        return llama_weights.load_smollm2()
    model = llama.LlamaForCausalLM(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype)
        if len(s.shape) > 1 else jnp.ones(s.shape, s.dtype), shapes
    )  # fmt: skip
    return config, params


def _adapters(params, lora_config, count: int):
    """``count`` adapters with random A and B (a trained adapter's B is not zero)."""
    _, shapes = jax.eval_shape(lambda: jaxlora.split(params, lora_config, jax.random.key(0)))
    rng = np.random.default_rng(1)
    return [
        jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)
        for _ in range(count)
    ]


def _decode_step(model, params, lora, lora_config, index, mode):
    """A jitted decode step as the loop runs it: model call with the cache, greedy pick."""

    @jax.jit
    def step(params, lora, index, token, position, cache):
        forward = step_function(model, params, lora, lora_config, index, mode)
        ones = jnp.ones(token.shape, jnp.int32)
        logits, cache = forward(token, ones, position, cache)
        return sample_logits(logits[:, -1], jax.random.key(0)), cache

    return lambda *inputs: step(params, lora, index, *inputs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, few rounds")
    parser.add_argument("--random", action="store_true", help="SmolLM2's shapes, random weights")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.prompt_len, args.new_tokens, args.rounds = 2, 8, 8, 3
    uptime_before = _uptime()
    start = time.perf_counter()
    config, params = _model(args)
    model = llama.LlamaForCausalLM(config)
    lora_config = jaxlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    members = _adapters(params, lora_config, args.batch)
    stacked = jaxlora.adapters.stack(members)
    index = jnp.arange(args.batch, dtype=jnp.int32)
    merged = jax.jit(jaxlora.merge, static_argnums=2)(params, members[0], lora_config)
    rng = np.random.default_rng(2)
    prompts = rng.integers(3, config.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    batch, length = args.batch, args.prompt_len + args.new_tokens
    rows: dict[str, dict[str, float]] = {}

    # The floor: one token per row through the merged model, no cache.
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    one_token = jnp.asarray(prompts[:, :1])
    rows["forward 1 token (merged)"] = _timed(lambda: forward(merged, one_token), args.rounds)

    # One decode step with the cache half full, as the loop body runs it.
    cache = llama.init_cache(config, batch, length)
    prefill = jax.jit(lambda p, ids, c: model.apply({"params": p}, ids, cache=c))
    _, cache = prefill(merged, jnp.asarray(prompts), cache)
    position = jnp.full((batch, 1), args.prompt_len, jnp.int32)
    ways = {
        "merged": (merged, None, None, "factored"),
        "factored": (params, members[0], None, "factored"),
        "per-row": (params, stacked, index, "factored"),
    }
    for name, (p, lora, idx, mode) in ways.items():
        step = _decode_step(model, p, lora, lora_config, idx, mode)
        rows[f"decode step ({name})"] = _timed(lambda s=step: s(one_token, position, cache),
                                               args.rounds)  # fmt: skip

    # Whole generations: N new tokens and 1 (the prefill alone); per token = the difference.
    # "merged" here is generate(mode="merged"): the merge happens inside the jitted generation.
    generations = {**ways, "merged": (params, members[0], None, "merged")}
    for name, (p, lora, idx, mode) in generations.items():

        def run(n, p=p, lora=lora, idx=idx, mode=mode):
            return generate(model, p, prompts, max_new_tokens=n, lora=lora,
                            lora_config=None if lora is None else lora_config,
                            adapter_index=idx, mode=mode).tokens  # fmt: skip

        full = _timed(lambda run=run: run(args.new_tokens), max(1, args.rounds // 2))
        prefill_only = _timed(lambda run=run: run(1), max(1, args.rounds // 2))
        per_token = {k: (full[k] - prefill_only[k]) / (args.new_tokens - 1) for k in full}
        rows[f"generate {args.new_tokens} tokens ({name})"] = {
            **full, "tokens_per_s": batch * args.new_tokens / full["median_s"]
        }  # fmt: skip
        rows[f"generate per new token ({name})"] = {
            **per_token, "tokens_per_s": batch / per_token["median_s"]
        }  # fmt: skip

    floor = rows["forward 1 token (merged)"]
    ratios = {
        "decode_step_merged_vs_forward": rows["decode step (merged)"]["min_s"] / floor["min_s"],
        "per_row_vs_single_adapter": rows["decode step (per-row)"]["min_s"]
        / rows["decode step (factored)"]["min_s"],
        "loop_token_merged_vs_forward": rows["generate per new token (merged)"]["min_s"]
        / floor["min_s"],
        "loop_token_per_row_vs_single": rows["generate per new token (per-row)"]["min_s"]
        / rows["generate per new token (factored)"]["min_s"],
    }
    uptime_after = _uptime()
    load = os.getloadavg()[0]
    command = "python experiments/benchmarks/bench_generate.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    result = {
        "command": command.strip(),
        "model": "tiny random Llama" if args.quick else
        "SmolLM2-135M " + ("(random weights)" if args.random else "(Instruct, GGUF Q4_1 -> f32)"),
        "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "adapter": "LoRA r=8 on q_proj,v_proj; per-row: a stack of "
        f"{batch} adapters, one per row", "devices": str(jax.devices()),
        "cpu_count": os.cpu_count(), "uptime_before": uptime_before, "uptime_after": uptime_after,
        "machine_loaded": load > (os.cpu_count() or 1),
        "rows": rows, "ratios_by_min": ratios,
        "goals": {
            "decode_step_within_1.3x_forward": ratios["decode_step_merged_vs_forward"] <= GOAL,
            "per_row_within_1.3x_single": ratios["per_row_vs_single_adapter"] <= GOAL,
        },
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    _print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_generate.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench_generate.md").write_text(_markdown(result))
    return result


def _print_table(result: dict) -> None:
    print(f"{result['model']}, batch {result['batch']}, prompt {result['prompt_len']}, "
          f"{result['new_tokens']} new tokens")  # fmt: skip
    print(f"uptime before: {result['uptime_before']}")
    print(f"{'what':<42} {'min ms':>9} {'median ms':>10} {'tokens/s':>9}")
    for name, row in result["rows"].items():
        rate = f"{row['tokens_per_s']:9.1f}" if "tokens_per_s" in row else " " * 9
        print(f"{name:<42} {1e3 * row['min_s']:9.2f} {1e3 * row['median_s']:10.2f} {rate}")
    for name, value in result["ratios_by_min"].items():
        print(f"{name}: {value:.2f}x")
    print(f"uptime after: {result['uptime_after']}")


def _markdown(result: dict) -> str:
    lines = [
        f"Made by `{result['command']}` ({result['model']}, batch {result['batch']}, prompt "
        f"{result['prompt_len']} tokens, {result['new_tokens']} new tokens, {result['rounds']} "
        f"rounds, {result['devices']}).",
        "",
        f"uptime before: `{result['uptime_before']}`; after: `{result['uptime_after']}`"
        + (
            " (the machine was loaded: absolute times are inflated)"
            if result["machine_loaded"]
            else ""
        ),  # fmt: skip
        "",
        "| what | min ms | median ms | tokens/s |",
        "|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        rate = f"{row['tokens_per_s']:.1f}" if "tokens_per_s" in row else ""
        lines.append(f"| {name} | {1e3 * row['min_s']:.2f} | {1e3 * row['median_s']:.2f} | "
                     f"{rate} |")  # fmt: skip
    lines += ["", "| ratio (by min) | value | goal |", "|---|---|---|"]
    goals = {"decode_step_merged_vs_forward": "<= 1.3", "per_row_vs_single_adapter": "<= 1.3"}
    for name, value in result["ratios_by_min"].items():
        lines.append(f"| {name} | {value:.2f}x | {goals.get(name, '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
