"""Quick interleaved check of the all-linear factored step against full fine-tuning.

Compiles only ``jax full FT``, ``jaxlora factored q,v`` and ``jaxlora factored all-linear`` (see
``bench_train_step.py``), steps them round-robin and prints median ratios: the loop used to try one
optimisation idea at a time (``XLA_FLAGS=... python -m experiments.bench_allinear_quick``).
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax

import jaxlora
from experiments import models_gpt
from experiments.bench_train_step import QV, JaxRunner


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    c = models_gpt.GPTConfig()
    model, params = models_gpt.init(c, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(2), (8, c.seq + 1), 0, c.vocab)
    qv = jaxlora.LoraConfig(r=8, lora_alpha=16, target_modules=QV)
    all_linear = jaxlora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    runners = [
        JaxRunner("full FT", model, params, batch),
        JaxRunner("factored q,v", model, params, batch, qv, "factored"),
        JaxRunner("factored all-linear", model, params, batch, all_linear, "factored"),
    ]
    for _ in range(args.rounds):
        for runner in runners:
            runner.times.append(runner.run())
    full = statistics.median(runners[0].times)
    print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""))
    for runner in runners:
        median = statistics.median(runner.times)
        print(f"  {runner.name:22s} {1e3 * median:8.1f} ms  ratio {median / full:.3f}")


if __name__ == "__main__":
    main()
