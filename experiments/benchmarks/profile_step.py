"""Where a training step's time goes, op by op: XLA:CPU (JAX) against PyTorch on the same work.

Profiles the benchmark GPT (``models_gpt.py``, batch 8 x seq 128, fp32, AdamW) for full fine-tuning,
LoRA r 8 all-linear (jaxlora factored; PEFT) and the all-linear floor of each framework (only the
linear layers' biases train: see ``bench_baselines.py``), a few steps each, and sums the time of
each operation per step:

* JAX: ``jax.profiler`` traces the compiled step; every XLA:CPU thunk (a GEMM, a fusion, a copy,
  ...) is an event of the trace, read back with ``jax.profiler.ProfileData``;
* PyTorch: ``torch.profiler``'s self CPU time per ``aten::`` op.

Operations are grouped as ``matmul`` (dots, GEMMs, matmul fusions), ``elementwise / fusion``,
``reduce``, ``copy / layout`` and ``other``, so the table shows which part of XLA:CPU is slower
than PyTorch's kernels and by how many milliseconds. XLA:CPU runs independent ops concurrently, so
its sums can exceed the step; the time during which two or more of its ops ran at once is
reported too. The step's GEMM shapes and one layer's causal attention (forward and backward) are
also timed alone in each framework, to tell a slow kernel from a kernel slowed by the step around
it. Run it alone on the machine::

    python -m experiments.benchmarks.profile_step            # ~3 min on 2 cores
    python -m experiments.benchmarks.profile_step --tiny     # seconds (the smoke test)

Writes ``experiments/results/profile_step.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.benchmarks import results_io

RESULTS = Path(__file__).resolve().parents[1] / "results"
STEPS = 3


#: Op names (XLA fusions are named after the ops they fuse, e.g. ``multiply_bitcast_fusion``) that
#: compute: a fusion with one of these is arithmetic even if it also moves data.
_ARITHMETIC = {"add", "mul", "multiply", "subtract", "sub", "div", "divide", "tanh", "gelu", "exp",
               "log", "sqrt", "rsqrt", "where", "select", "norm", "maximum", "minimum", "negate",
               "power", "compare", "convert"}  # fmt: skip
_LAYOUT = ("copy", "transpose", "bitcast", "broadcast", "reshape", "slice", "concat", "view")


def category(name: str) -> str:
    """The group of an XLA thunk or a PyTorch op, by its name (see :data:`_ARITHMETIC`).

    Example:
        >>> [category(n) for n in ("multiply_bitcast_fusion.8", "transpose_copy_fusion.2",
        ...                        "aten::copy_", "aten::addmm", "aten::_fused_adamw_")]
        ['elementwise / fusion', 'copy / layout', 'copy / layout', 'matmul', 'elementwise / fusion']
    """
    n = name.lower()
    if any(k in n for k in ("dot", "gemm", "ynn", "mm", "matmul", "linear", "convolution")):
        return "matmul"
    if any(k in n for k in ("reduce", "sum", "mean", "softmax")):
        return "reduce"
    optimizer = ("adam", "lerp", "foreach", "addcmul", "addcdiv", "exponential")
    if _ARITHMETIC & set(re.split(r"[_.:\-]+", n)) or any(k in n for k in optimizer):
        return "elementwise / fusion"
    if any(k in n for k in _LAYOUT):
        return "copy / layout"
    if any(k in n for k in ("fusion", "wrapped")):
        return "elementwise / fusion"
    return "other"


def profile_jax(tiny: bool) -> dict[str, dict[str, float]]:
    import jax
    from jax.profiler import ProfileData

    import jaxlora
    from experiments.benchmarks import bench_baselines, bench_runners, models_gpt

    c = models_gpt.TINY if tiny else models_gpt.GPTConfig()
    batch = jax.random.randint(jax.random.key(2), (2 if tiny else 8, c.seq + 1), 0, c.vocab)
    # The linen group's rows of bench_train_step.py, only those profiled (each compiles a step).
    model, params = models_gpt.init(c, jax.random.key(0))
    config = jaxlora.LoraConfig(r=8, lora_alpha=16.0, target_modules="all-linear")
    lora = [("jaxlora factored all-linear", config, "factored")]
    runners = bench_runners.linen_rows("linen", model, params, batch, lora)
    floor = [("floor all-linear", bench_runners.ALL_LINEAR)]
    runners += bench_baselines.linen_floors("linen", model, params, batch, floor)
    wanted = {"full FT": "JAX full FT", "jaxlora factored all-linear": "jaxlora all-linear",
              "floor all-linear": "JAX floor all-linear"}  # fmt: skip
    out = {}
    for runner in runners:
        if runner.name not in wanted:
            continue
        folder = tempfile.mkdtemp(prefix="jaxprof_")
        with jax.profiler.trace(folder):
            for _ in range(STEPS):
                runner.run()
        data = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
        ops: dict[str, float] = collections.defaultdict(float)
        threads = []
        for plane in data.planes:
            for line in plane.lines:
                if line.name == "python":
                    continue
                spans = []
                for event in line.events:
                    if event.name.startswith(("ThreadpoolListener", "end: ", "ThunkExecutor")):
                        continue
                    ops[event.name] += event.duration_ns / 1e6 / STEPS
                    if not event.name.startswith("SlinkyThreadPool::Await"):
                        spans.append((event.start_ns, event.start_ns + event.duration_ns))
                threads.append(spans)
        out[wanted[runner.name]] = {"ops": dict(ops), "concurrency": concurrency(threads)}
    return out


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def concurrency(threads: list[list[tuple[float, float]]]) -> dict[str, float]:
    """ms per step during which at least one thread ran an XLA op, and during which two or more
    threads did at once (XLA:CPU runs independent ops concurrently; each then has part of the
    cores it tiled for). Each thread's events are merged first, so nested events count once."""
    spans = [span for thread in threads for span in _union(thread)]
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    busy = overlapped = 0.0
    active, last = 0, None
    for t, step in edges:
        if last is not None:
            busy += (t - last) * (active >= 1)
            overlapped += (t - last) * (active >= 2)
        active, last = active + step, t
    return {"busy_ms": round(busy / 1e6 / STEPS, 1), "two_ops_at_once_ms": round(
        overlapped / 1e6 / STEPS, 1)}  # fmt: skip


def profile_torch(tiny: bool) -> dict[str, dict[str, float]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from experiments.benchmarks import bench_peft, gpt_config

    c = gpt_config.TINY if tiny else gpt_config.GPTConfig()
    wanted = {"torch full FT": "PyTorch full FT", "PEFT LoRA all-linear": "PEFT all-linear",
              "torch floor all-linear": "PyTorch floor all-linear"}  # fmt: skip
    runners = bench_peft.runners(c, 8, 16.0, 2 if tiny else 8, names=set(wanted))
    out = {}
    for name, label in wanted.items():
        runner = runners[name]
        for _ in range(3):
            runner.step()  # allocator and lazy AdamW state
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(STEPS):
                runner.step()
        ops = {e.key: e.self_cpu_time_total / 1e3 / STEPS for e in prof.key_averages()}
        out[label] = {"ops": {k: v for k, v in ops.items() if v > 0}}
    del torch
    return out


def summarise(ops: dict[str, float], top: int = 8) -> dict:
    groups: dict[str, float] = collections.defaultdict(float)
    for name, ms in ops.items():
        groups[category(name)] += ms
    largest = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
    return {
        "total_ms": round(sum(ops.values()), 1),
        "groups_ms": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops_ms": [[k, round(v, 2)] for k, v in largest],
    }


def gemms(framework: str, tiny: bool, repeats: int = 15) -> dict[str, list[float]]:
    """The step's GEMM shapes timed alone (min and median ms of ``repeats``), to tell a slow kernel
    from a kernel slowed by the step around it."""
    import numpy as np

    from experiments.benchmarks import gpt_config

    c = gpt_config.TINY if tiny else gpt_config.GPTConfig()
    rows = (2 if tiny else 8) * c.seq
    shapes = [(rows, c.d_model, c.d_model), (rows, c.d_model, c.mlp), (rows, c.mlp, c.d_model),
              (rows, c.d_model, c.vocab)]  # fmt: skip
    out = {}
    for m, k, n in shapes:
        x, w = np.ones((m, k), np.float32), np.ones((k, n), np.float32)
        if framework == "jax":
            import jax

            fn, args = jax.jit(lambda a, b: a @ b), (jax.device_put(x), jax.device_put(w))
            run = lambda fn=fn, args=args: fn(*args).block_until_ready()  # noqa: E731
        else:
            import torch

            args = (torch.from_numpy(x), torch.from_numpy(w))
            run = lambda args=args: torch.matmul(*args)  # noqa: E731
        out[f"{m}x{k} @ {k}x{n}"] = _min_median_ms(run, repeats)
    return out


def _min_median_ms(run, repeats: int) -> list[float]:
    """``run()`` once untimed, then ``repeats`` times: the min and median ms."""
    import time

    import numpy as np

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1e3 * (time.perf_counter() - start))
    return [round(min(times), 2), round(float(np.median(times)), 2)]


def einsum_attention(q, k, v):
    """Causal softmax attention on ``(batch, seq, heads, head_dim)`` as two einsums: the maths of
    ``jax.nn.dot_product_attention(q, k, v, is_causal=True)``, in another layout."""
    import jax
    import jax.numpy as jnp

    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    causal = jnp.tril(jnp.ones(scores.shape[-2:], bool))
    scores = jnp.where(causal[None, None], scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)


def attention(framework: str, tiny: bool, repeats: int = 15) -> dict[str, list[float]]:
    """One layer's causal self-attention, forward and backward (the gradients of q, k and v), timed
    alone at the step's shapes (min and median ms of ``repeats``): the model's own formulation in
    each framework (``jax.nn.dot_product_attention`` on ``(batch, seq, heads, head_dim)``; PyTorch's
    ``scaled_dot_product_attention`` on the transposed view), and in JAX the same maths written as
    two einsums, to see whether another layout of the attention would pay."""
    import numpy as np

    from experiments.benchmarks import gpt_config

    c = gpt_config.TINY if tiny else gpt_config.GPTConfig()
    shape = (2 if tiny else 8, c.seq, c.heads, c.d_model // c.heads)
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    if framework == "torch":
        import torch
        import torch.nn.functional as F

        qkv = [torch.from_numpy(t).requires_grad_() for t in (q, k, v)]
        cotangent = torch.from_numpy(g).transpose(1, 2)

        def run():
            heads_first = [t.transpose(1, 2) for t in qkv]
            out = F.scaled_dot_product_attention(*heads_first, is_causal=True)
            torch.autograd.grad(out, qkv, cotangent)

        return {"scaled_dot_product_attention": _min_median_ms(run, repeats)}
    import jax
    import jax.numpy as jnp

    def model_attention(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    out = {}
    args = [jax.device_put(t) for t in (q, k, v, g)]
    variants = {"jax.nn.dot_product_attention": model_attention, "two einsums": einsum_attention}
    for name, fn in variants.items():
        loss = lambda q, k, v, g, fn=fn: jnp.vdot(fn(q, k, v), g)  # noqa: E731
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        out[name] = _min_median_ms(lambda step=step: jax.block_until_ready(step(*args)), repeats)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one framework per process, so neither's threads disturb the other
        fn = profile_jax if args.worker == "jax" else profile_torch
        print(json.dumps({"steps": fn(args.tiny), "gemm_ms": gemms(args.worker, args.tiny),
                          "attention_ms": attention(args.worker, args.tiny)}))  # fmt: skip
        return {}
    load_before = results_io.load_1m()
    profiles, gemm_ms, attention_ms = {}, {}, {}
    for worker in ("jax", "torch"):
        cmd = [sys.executable, "-m", "experiments.benchmarks.profile_step", "--worker", worker]
        done = subprocess.run(cmd + ["--tiny"] * args.tiny, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[2])  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"the {worker} profile worker failed:\n{done.stderr[-3000:]}")
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        profiles.update(answer["steps"])
        label = "JAX (XLA:CPU)" if worker == "jax" else "PyTorch"
        gemm_ms[label] = answer["gemm_ms"]
        attention_ms.update({f"{label}: {k}": v for k, v in answer["attention_ms"].items()})
    result = {
        "steps": {
            name: {**summarise(p["ops"]), **{k: v for k, v in p.items() if k == "concurrency"}}
            for name, p in profiles.items()
        },
        "gemm_ms": gemm_ms,
        "attention_ms": attention_ms,
        "load_1m": {"before": load_before, "after": results_io.load_1m()},
        "command": results_io.command("experiments.benchmarks.profile_step"),
    }
    write(Path(args.out), "profile_step_tiny" if args.tiny else "profile_step", result)
    return result


def write(out: Path, stem: str, result: dict) -> None:
    names = list(result["steps"])
    groups = sorted({g for s in result["steps"].values() for g in s["groups_ms"]})
    lines = [f"`{result['command']}` (ms per step, summed over ops; load {result['load_1m']})", ""]
    lines += ["| ms per step | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for g in groups:
        cells = [str(result["steps"][n]["groups_ms"].get(g, 0.0)) for n in names]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(str(result["steps"][n]["total_ms"]) for n in names)
                 + " |")  # fmt: skip
    if result.get("gemm_ms"):
        frameworks = list(result["gemm_ms"])
        lines += [
            "",
            "The step's GEMMs alone, min / median ms of 15:",
            "",
            "| GEMM | " + " | ".join(frameworks) + " |",
            "|---|" + "---:|" * len(frameworks),
        ]
        for shape in result["gemm_ms"][frameworks[0]]:
            cells = [" / ".join(map(str, result["gemm_ms"][f][shape])) for f in frameworks]
            lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    if result.get("attention_ms"):
        lines += ["", "One layer's causal attention, forward + backward, alone (min / median ms "
                  "of 15):", "", "| attention | ms |", "|---|---:|"]  # fmt: skip
        lines += [f"| {name} | {' / '.join(map(str, ms))} |"
                  for name, ms in result["attention_ms"].items()]  # fmt: skip
    for n in names:
        if "concurrency" in result["steps"][n]:
            c = result["steps"][n]["concurrency"]
            lines += [
                "",
                f"{n}: XLA ops ran {c['busy_ms']} ms per step, two or more at once for "
                f"{c['two_ops_at_once_ms']} ms of it (each then had part of the cores)",
            ]
    for n in names:
        top = ", ".join(f"`{k}` {v}" for k, v in result["steps"][n]["top_ops_ms"])
        lines += ["", f"Largest ops, {n}: {top}"]
    results_io.write(out, stem, result, lines)


if __name__ == "__main__":
    main()
