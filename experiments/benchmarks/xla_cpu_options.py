"""Does an XLA:CPU option make the benchmark's steps faster? Each option against the default, in one
process, interleaved.

The steps are the ``linen`` group's floor (the frozen GPT trained on only the biases of all its
linear layers: see ``bench_baselines.py``) and jaxlora's factored all-linear LoRA, both on the
benchmark GPT of ``models_gpt.py``. Each option compiles both steps (traced once) a second time
with that ``DebugOptions`` field set (``Lowered.compile(compiler_options=...)``, the per-compile
form of ``XLA_FLAGS``), so every variant is timed in the same process, in a fresh random order each
round, and the ratios to the default compile are measured side by side. Run it alone::

    python -m experiments.benchmarks.xla_cpu_options              # ~5 min on 2 cores
    python -m experiments.benchmarks.xla_cpu_options --tiny       # seconds (the smoke test)

Writes ``experiments/results/xla_cpu_options.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import jax

import jaxlora
from experiments.benchmarks import (
    bench_baselines,
    bench_jax_runner,
    bench_runners,
    models_gpt,
    results_io,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"
OPTIONS = {
    "memory-optimized scheduler": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
    "concurrency-optimized scheduler": {
        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"
    },
    "oneDNN": {"xla_cpu_use_onednn": True},
    "XNNPACK greedy graph fusion": {
        "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"
    },
}


def _runners(c, batch, label: str) -> list[bench_jax_runner.JaxRunner]:
    model, params = models_gpt.init(c, jax.random.key(0))
    floor = [("floor all-linear", bench_runners.ALL_LINEAR)]
    rows = bench_baselines.linen_floors("linen", model, params, batch, floor)
    config = jaxlora.LoraConfig(r=8, lora_alpha=16.0, target_modules="all-linear")
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))

    def lora_forward(t, f, inputs, key):
        return jaxlora.apply(model, f, t, config, inputs)

    rows.append(bench_jax_runner.JaxRunner("jaxlora factored all-linear", "linen", lora_forward,
                                           lora, frozen, batch))  # fmt: skip
    for row in rows:
        row.group = label
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.tiny else 6)
    c = models_gpt.TINY if args.tiny else models_gpt.GPTConfig()
    batch = jax.random.randint(jax.random.key(2), (2 if args.tiny else 8, c.seq + 1), 0, c.vocab)
    load_before = results_io.load_1m()
    defaults = _runners(c, batch, "default")
    runners = list(defaults)
    for label, options in OPTIONS.items():
        with bench_jax_runner.compiler_options(options):
            runners += [runner.recompiled(label) for runner in defaults]
    order = random.Random(0)
    for _ in range(rounds):
        for runner in order.sample(runners, len(runners)):
            time.sleep(0.0 if args.tiny else 0.3)  # threads go idle; the smoke run is not timed
            runner.times.append(runner.run())
    rows = {}
    for r in runners:
        base = next(d for d in runners if d.group == "default" and d.name == r.name)
        rows[f"{r.group} | {r.name}"] = {
            "option": r.group, "step": r.name, "options": OPTIONS.get(r.group, {}),
            "median_ms": round(1e3 * statistics.median(r.times), 1),
            "min_ms": round(1e3 * min(r.times), 1),
            "ratio": round(statistics.median(r.times) / statistics.median(base.times), 3),
            "ratio_of_min": round(min(r.times) / min(base.times), 3),
            "program_differs": r.program() != base.program(),
        }  # fmt: skip
    result = {
        "rows": rows,
        "rounds": rounds,
        "load_1m": {"before": load_before, "after": results_io.load_1m()},
        "command": results_io.command("experiments.benchmarks.xla_cpu_options"),
    }
    write(Path(args.out), "xla_cpu_options_tiny" if args.tiny else "xla_cpu_options", result)
    return result


def write(out: Path, stem: str, result: dict) -> None:
    lines = [f"`{result['command']}` ({result['rounds']} rounds; load {result['load_1m']})", "",
             "| XLA option | step | min ms | median ms | / default (median) | / default (min) | "
             "program differs |", "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in result["rows"].values():
        cells = [row["option"], row["step"], row["min_ms"], row["median_ms"], row["ratio"],
                 row["ratio_of_min"], row["program_differs"]]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    results_io.write(out, stem, result, lines)


if __name__ == "__main__":
    main()
