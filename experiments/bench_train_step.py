"""Train-step and inference benchmark: full fine-tuning vs LoRA merged vs factored (vs PEFT).

GPT-2-style decoder (``models_gpt.py``: d_model 768, 12 heads, 4 layers, MLP 3072, vocab 8192),
batch 8 x seq 128, float32, AdamW, LoRA r=8 alpha=16 on q,v and on all linear layers. Every
configuration is compiled first, then all are stepped round-robin (interleaved), so machine noise
hits them alike; the table reports median milliseconds and ratios to full fine-tuning of the same
framework in the same run. With ``--peft`` the PyTorch twin (full FT and PEFT LoRA) runs in a worker
process (so XLA's and PyTorch's thread pools never share a process), stepped in the same rounds,
and jaxlora/PEFT ratios are printed.

Run (from the repository root)::

    python -m experiments.bench_train_step --peft            # full size, ~10 min on 2 cores
    python -m experiments.bench_train_step --tiny --rounds 2 # seconds; what the smoke test runs

Writes ``experiments/results/bench_train_step[_TAG].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import optax

import jaxlora
from experiments import models_gpt
from jaxlora import apply

QV = ["q_proj", "v_proj"]
RESULTS = Path(__file__).parent / "results"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _xla_memory(compiled) -> dict[str, float]:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    mb = lambda n: round(n / 2**20, 1)  # noqa: E731
    return {
        "argument_mb": mb(stats.argument_size_in_bytes),
        "output_mb": mb(stats.output_size_in_bytes),
        "temp_mb": mb(stats.temp_size_in_bytes),
        "alias_mb": mb(stats.alias_size_in_bytes),
    }


class JaxRunner:
    """One JAX configuration, compiled ahead of time; ``step`` / ``forward`` return seconds."""

    def __init__(self, name, model, params, batch, config=None, mode=None, kind="train"):
        rss_before = _rss_mb()
        self.name, self.kind = name, kind
        inputs, targets = batch[:, :-1], batch[:, 1:]
        opt = optax.adamw(1e-4)
        if config is None:
            # A copy: the step donates its trainable tree, and the other runners share `params`.
            trainable = jax.tree.map(lambda x: x.copy(), params)
            frozen, self.trainable = None, jaxlora.count(params).total

            def forward(trainable, frozen):
                return model.apply({"params": trainable}, inputs)
        else:
            frozen, trainable = jaxlora.split(params, config, jax.random.key(1))
            self.trainable = jaxlora.count(frozen, trainable).trainable

            def forward(trainable, frozen):
                return apply(model, frozen, trainable, config, inputs, mode=mode)

        if kind == "train":

            def step(trainable, opt_state, frozen):
                loss_fn = lambda t: models_gpt.next_token_loss(forward(t, frozen), targets)  # noqa: E731
                loss, grads = jax.value_and_grad(loss_fn)(trainable)
                updates, opt_state = opt.update(grads, opt_state, trainable)
                return optax.apply_updates(trainable, updates), opt_state, loss

            self.args = [trainable, opt.init(trainable), frozen]
            self.fn = jax.jit(step, donate_argnums=(0, 1)).lower(*self.args).compile()
        else:
            if mode == "merged-weights":  # deployment: merge once, then the plain model
                trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # a non-trivial adapter
                trainable = jaxlora.merge(frozen, trainable, config)
                frozen, config = None, None
                forward = lambda t, f: model.apply({"params": t}, inputs)  # noqa: E731
            self.args = [trainable, frozen]
            self.fn = jax.jit(forward).lower(*self.args).compile()
        self.memory = _xla_memory(self.fn)
        self.run()  # first run outside the timings
        self.memory["rss_delta_mb"] = round(_rss_mb() - rss_before, 1)
        self.times: list[float] = []

    def run(self) -> float:
        start = time.perf_counter()
        if self.kind == "train":
            out = self.fn(*self.args)
            self.args[:2] = out[:2]
        else:
            out = self.fn(*self.args)
        jax.block_until_ready(out)
        return time.perf_counter() - start


def _mkl_amd_shim() -> str | None:
    """A preloadable library that makes MKL take its AVX2/AVX-512 kernels on an AMD CPU, or None.

    PyTorch's CPU wheels link MKL, which checks ``mkl_serv_intel_cpu_true()`` and runs a generic
    kernel on other vendors' CPUs: on the 2-core AMD EPYC here a 1024x768x3072 float32 matmul takes
    56 ms in PyTorch vs 20 ms in XLA, and 28-32 ms with this shim. Built with the system C compiler
    into a temporary folder; None (no shim) on Intel CPUs or without a compiler.
    """
    try:
        if "AuthenticAMD" not in Path("/proc/cpuinfo").read_text():
            return None
    except OSError:
        return None
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    folder = Path(tempfile.mkdtemp(prefix="mkl_amd_shim_"))
    atexit.register(shutil.rmtree, folder, True)  # the worker has loaded it by then
    (folder / "shim.c").write_text("int mkl_serv_intel_cpu_true(void) { return 1; }\n")
    built = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(folder / "shim.so"),
                            str(folder / "shim.c")], capture_output=True)  # fmt: skip
    return str(folder / "shim.so") if built.returncode == 0 else None


class TorchWorker:
    """The PyTorch side in its own process (``bench_peft.serve``), stepped in the same rounds."""

    def __init__(self, args, batch_size: int):
        cmd = [sys.executable, "-m", "experiments.bench_peft", "--batch", str(batch_size)]
        cmd += ["--r", str(args.r), "--alpha", str(args.alpha)] + ["--tiny"] * args.tiny
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ)
        self.mkl_shim = None if args.no_mkl_shim else _mkl_amd_shim()
        if self.mkl_shim:
            env["LD_PRELOAD"] = " ".join(filter(None, [self.mkl_shim, env.get("LD_PRELOAD")]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=root, env=env)  # fmt: skip
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the PyTorch worker (experiments/bench_peft.py) did not start")

    def ask(self, name: str, what: str) -> float:
        self.proc.stdin.write(f"{name}\t{what}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())


class TorchRunner:
    def __init__(self, name, worker, runner_name, kind):
        self.name, self.kind, self.worker, self.runner_name = name, kind, worker, runner_name
        self.trainable = int(worker.ask(runner_name, "trainable"))
        self.memory: dict[str, float] = {}
        for _ in range(3):  # PyTorch's first steps are ~1 s slower (allocator, lazy AdamW state)
            self.run()
        self.times: list[float] = []

    def run(self) -> float:
        return self.worker.ask(self.runner_name, "step" if self.kind == "train" else "forward")


def build(args) -> list:
    c = models_gpt.TINY if args.tiny else models_gpt.GPTConfig()
    batch_size = 2 if args.tiny else args.batch
    model, params = models_gpt.init(c, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(2), (batch_size, c.seq + 1), 0, c.vocab)
    qv = jaxlora.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=QV)
    all_linear = jaxlora.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear")
    runners = [
        JaxRunner("jax full FT", model, params, batch),
        JaxRunner("jaxlora merged q,v", model, params, batch, qv, "merged"),
        JaxRunner("jaxlora factored q,v", model, params, batch, qv, "factored"),
        JaxRunner("jaxlora merged all-linear", model, params, batch, all_linear, "merged"),
        JaxRunner("jaxlora factored all-linear", model, params, batch, all_linear, "factored"),
        JaxRunner("jax inference base", model, params, batch, kind="infer"),
        JaxRunner(
            "jaxlora inference merged q,v", model, params, batch, qv, "merged-weights", "infer"
        ),
        JaxRunner("jaxlora inference factored q,v", model, params, batch, qv, "factored", "infer"),
        JaxRunner(
            "jaxlora inference factored all-linear",
            model,
            params,
            batch,
            all_linear,
            "factored",
            "infer",
        ),  # fmt: skip
    ]
    if args.peft:
        worker = TorchWorker(args, batch_size)  # torch and peft: the `bench` extra
        args.torch_mkl_amd_shim = worker.mkl_shim is not None
        for name in ("torch full FT", "PEFT LoRA q,v", "PEFT LoRA all-linear"):
            runners.append(TorchRunner(name, worker, name, "train"))
        runners.append(TorchRunner("torch inference base", worker, "torch full FT", "infer"))
        for name in ("PEFT LoRA q,v", "PEFT LoRA all-linear"):
            runners.append(TorchRunner(f"{name} inference (unmerged)", worker, name, "infer"))
    return runners


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--peft", action="store_true", help="also run PyTorch / PEFT (bench extra)")
    parser.add_argument(
        "--no-mkl-shim",
        action="store_true",
        help="run PyTorch's MKL on its generic kernels on AMD CPUs (see `_mkl_amd_shim`)",
    )
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    runners = build(args)
    for _ in range(args.rounds):
        for runner in runners:
            runner.times.append(runner.run())
    return report(args, runners)


def report(args, runners) -> dict:
    rows = {}
    for r in runners:
        rows[r.name] = {
            "kind": r.kind,
            "median_ms": round(1e3 * statistics.median(r.times), 2),
            "min_ms": round(1e3 * min(r.times), 2),
            "trainable": r.trainable,
            **r.memory,
        }

    def ratio(name, ref):
        if name in rows and ref in rows:
            rows[name]["ratio"] = round(rows[name]["median_ms"] / rows[ref]["median_ms"], 3)

    for name, row in rows.items():
        ref = {
            ("train", True): "jax full FT",
            ("infer", True): "jax inference base",
            ("train", False): "torch full FT",
            ("infer", False): "torch inference base",
        }[(row["kind"], name.startswith("jax"))]
        ratio(name, ref)
    vs_peft = {}
    for ours, theirs in [
        ("jaxlora factored q,v", "PEFT LoRA q,v"),
        ("jaxlora factored all-linear", "PEFT LoRA all-linear"),
        ("jax full FT", "torch full FT"),
    ]:
        if ours in rows and theirs in rows:
            vs_peft[ours] = round(rows[ours]["median_ms"] / rows[theirs]["median_ms"], 3)
    result = {
        "rows": rows,
        "jax_over_torch": vs_peft,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "command": " ".join(["python -m experiments.bench_train_step"] + sys.argv[1:]),
    }
    write(args, result)
    return result


def table(result) -> str:
    lines = [
        "| configuration | trainable | median ms | ratio | XLA temp MB | RSS delta MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        lines.append(
            f"| {name} | {row['trainable']:,} | {row['median_ms']:.1f} | {row.get('ratio', '')} "
            f"| {row.get('temp_mb', '')} | {row.get('rss_delta_mb', '')} |"
        )
    if result["jax_over_torch"]:
        lines += ["", "| jax / torch (same work) | ratio |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in result["jax_over_torch"].items()]
    lines += ["", f"peak RSS of the process: {result['peak_rss_mb']} MB"]
    if "torch_mkl_amd_shim" in result["settings"]:
        shim = "on" if result["settings"]["torch_mkl_amd_shim"] else "off"
        lines += [f"PyTorch: fused AdamW; MKL AMD shim (`_mkl_amd_shim`) {shim}"]
    return "\n".join(lines)


def write(args, result) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_train_step" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(f"`{result['command']}`\n\n{table(result)}\n")
    print(table(result))


if __name__ == "__main__":
    main()
