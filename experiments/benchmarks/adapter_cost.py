"""What an adapter adds to one dense layer's training step, and ways of computing it that lose.

``bench_train_step.py`` shows jaxlora's all-linear step at a few per cent over its *floor* (the
frozen model trained on only the target layers' biases). This script takes that gap apart on the
benchmark GPT's own layer shapes (``models_gpt.py``: q/k/v/o 768→768, fc_in 768→3072, fc_out
3072→768, batch x seq 1024 rows), timing each way of computing one layer's contribution to a step:
the output, the input gradient, and the gradients of what trains.

* ``floor``: ``x·W + bias``, gradients of ``x`` and ``bias`` (what every adapter needs anyway);
* ``jaxlora fast path``: ``jaxlora``'s ``custom_vjp`` dense layer (``fused.dense``), r 8;
* ``jaxlora fast path, dropout 0.1``: the same with a fresh keep-mask drawn inside the step;
* ``autodiff``: ``x·W + s·(x·A)·B`` differentiated by JAX (the general factored path);
* ``one GEMM x·[W, A]``: the forward's two products over ``x`` as one wider GEMM, and the
  backward's two products into ``dx`` as one (``[dy, dh]·[W, A]ᵀ``), at the price of
  concatenating the frozen kernel with ``A`` in every step.

The extra work of an adapter is six rank-r products per layer; three of them (``x·A``, ``xᵀ·dh``
and ``dh·Aᵀ``, then added into ``dx``) read or write a whole ``rows x d_in`` activation while doing
only ``2·r`` flops per element: memory-bound on a CPU.
Everything is timed in one process, each variant once per round in a fresh random order (so it
starts, as inside a real step, with another computation's data in the caches). Run alone::

    python -m experiments.benchmarks.adapter_cost             # ~2 min on 2 cores
    python -m experiments.benchmarks.adapter_cost --tiny      # seconds (the smoke test)

Writes ``experiments/results/adapter_cost.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from experiments.benchmarks import models_gpt, results_io
from jaxlora._src.forward import fused

RESULTS = Path(__file__).resolve().parents[1] / "results"
RANK, SCALE, RATE = 8, 2.0, 0.1
_LAST_FIRST = (((1,), (0,)), ((), ()))
_LAST_LAST = (((1,), (1,)), ((), ()))
_ROWS = (((0,), (0,)), ((), ()))


@jax.custom_vjp
def one_gemm(x, kernel, a, b):
    """``x·W + s·(x·A)·B`` with the products that share an operand computed as one GEMM."""
    return _one_gemm_fwd(x, kernel, a, b)[0]


def _one_gemm_fwd(x, kernel, a, b):
    n = kernel.shape[1]
    yh = lax.dot_general(x, jnp.concatenate([kernel, a], axis=1), _LAST_FIRST)
    h = yh[:, n:] * SCALE
    return yh[:, :n] + lax.dot_general(h, b, _LAST_FIRST), (x, kernel, a, h, b)


def _one_gemm_bwd(residuals, dy):
    x, kernel, a, h, b = residuals
    dh = lax.dot_general(dy, b, _LAST_LAST) * SCALE
    wide = jnp.concatenate([kernel, a], axis=1)
    dx = lax.dot_general(jnp.concatenate([dy, dh], axis=1), wide, _LAST_LAST)
    d_a = lax.dot_general(x, dh, _ROWS)
    return dx, jnp.zeros_like(kernel), d_a, lax.dot_general(h, dy, _ROWS)


one_gemm.defvjp(_one_gemm_fwd, _one_gemm_bwd)


def _losses() -> dict[str, Callable]:
    """``loss(trained, x, kernel, bias, cotangent, key)`` for each variant: ``vdot(layer(x),
    cotangent)``, so that the gradient's backward pass starts from a given output cotangent. Every
    variant adds the layer's bias; only the floor trains it."""

    def floor(trained_bias, x, w, bias, g, key):
        return jnp.vdot(x @ w + trained_bias[None, :], g)

    def fast(ab, x, w, bias, g, key):
        return jnp.vdot(fused.dense(x, w, bias, *ab, None, SCALE, 0.0, None), g)

    def fast_dropout(ab, x, w, bias, g, key):
        keep = fused.keep_mask(key, RATE, x.shape)
        return jnp.vdot(fused.dense(x, w, bias, *ab, keep, SCALE, RATE, None), g)

    def autodiff(ab, x, w, bias, g, key):
        a, b = ab
        return jnp.vdot(x @ w + bias[None, :] + SCALE * ((x @ a) @ b), g)

    def wide(ab, x, w, bias, g, key):
        return jnp.vdot(one_gemm(x, w, *ab) + bias[None, :], g)

    return {
        "floor": floor,
        "jaxlora fast path": fast,
        "jaxlora fast path, dropout 0.1": fast_dropout,
        "autodiff": autodiff,
        "one GEMM x·[W, A]": wide,
    }


def _shapes(c: models_gpt.GPTConfig) -> dict[str, tuple[int, int, int]]:
    """Each adapted layer of one GPT block: ``(in, out, how many such layers)``."""
    return {
        "q/k/v/o": (c.d_model, c.d_model, 4),
        "fc_in": (c.d_model, c.mlp, 1),
        "fc_out": (c.mlp, c.d_model, 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None, help="batch x seq (default 8 x 128)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    c = models_gpt.TINY if args.tiny else models_gpt.GPTConfig()
    rounds = args.rounds or (2 if args.tiny else 30)
    n_rows = args.rows or (16 if args.tiny else 8 * c.seq)
    load_before = results_io.load_1m()
    steps, times = {}, {}
    for layer, (d_in, d_out, _) in _shapes(c).items():
        k = jax.random.split(jax.random.key(0), 6)
        x = jax.random.normal(k[0], (n_rows, d_in))
        w = jax.random.normal(k[1], (d_in, d_out)) / d_in**0.5
        g = jax.random.normal(k[2], (n_rows, d_out))
        bias = jnp.zeros(d_out)
        ab = (jax.random.normal(k[3], (d_in, RANK)) / d_in**0.5, 0.01 * jnp.ones((RANK, d_out)))
        for name, loss in _losses().items():
            trained = bias if name == "floor" else ab
            grad = jax.jit(jax.grad(loss, argnums=(0, 1)))  # what trains, and dx
            compiled = grad.lower(trained, x, w, bias, g, k[4]).compile()
            steps[layer, name] = (compiled, (trained, x, w, bias, g, k[4]))
            times[layer, name] = []
    order = random.Random(0)
    keys = list(steps)
    for _ in range(rounds):
        for key in order.sample(keys, len(keys)):
            compiled, inputs = steps[key]
            start = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times[key].append(1e3 * (time.perf_counter() - start))
    rows = {}
    for (layer, name), ts in times.items():
        floor = statistics.median(times[layer, "floor"])
        rows[f"{layer} | {name}"] = {
            "layer": layer, "variant": name, "median_ms": round(statistics.median(ts), 3),
            "min_ms": round(min(ts), 3), "over_floor": round(statistics.median(ts) / floor, 3),
        }  # fmt: skip
    block = {}
    for name in _losses():
        ms = sum(n * rows[f"{layer} | {name}"]["median_ms"]
                 for layer, (_, _, n) in _shapes(c).items())  # fmt: skip
        block[name] = round(ms, 2)
    result = {
        "rows": rows,
        "block_ms": block,
        "block_over_floor": {name: round(ms / block["floor"], 3) for name, ms in block.items()},
        "rows_per_step": n_rows,
        "rank": RANK,
        "rounds": rounds,
        "load_1m": {"before": load_before, "after": results_io.load_1m()},
        "command": results_io.command("experiments.benchmarks.adapter_cost"),
    }
    results_io.write(Path(args.out), "adapter_cost_tiny" if args.tiny else "adapter_cost", result,
                     _markdown(result))  # fmt: skip
    return result


def _markdown(result: dict) -> list[str]:
    lines = [f"`{result['command']}` ({result['rows_per_step']} rows, r {result['rank']}, "
             f"{result['rounds']} rounds; load {result['load_1m']})", "",
             "| layer | variant | min ms | median ms | / floor (median) |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    for row in result["rows"].values():
        lines.append(f"| {row['layer']} | {row['variant']} | {row['min_ms']} | "
                     f"{row['median_ms']} | {row['over_floor']} |")  # fmt: skip
    lines += ["", "One GPT block's adapted layers (4 x q/k/v/o + fc_in + fc_out), sum of medians:",
              "", "| variant | ms | / floor |", "|---|---:|---:|"]  # fmt: skip
    for name, ms in result["block_ms"].items():
        lines.append(f"| {name} | {ms} | {result['block_over_floor'][name]} |")
    return lines


if __name__ == "__main__":
    main()
