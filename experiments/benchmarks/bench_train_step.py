"""Train-step benchmark: LoRA against full fine-tuning of the same model, and against PyTorch/PEFT.

The model is the GPT-2-style decoder of ``models_gpt.py`` (d_model 768, 12 heads, 4 layers, MLP
3072, vocab 8192, 34.7M parameters), batch 8 x seq 128, AdamW, LoRA r 8 alpha 16 on q,v and on all
linear layers, in several groups (``bench_runners.py``): the linen GPT with ``nn.Dense`` layers, the
same with Flax's ``nn.MultiHeadDotProductAttention``, the NNX GPT (with qwix's LoRA when installed),
a bfloat16 group, the same GPT as a plain JAX function adapted by ``jaxlora.factored``
(``plain``) and as an Equinox model holding the same params (``equinox``, ``models_gpt_eqx.py``;
with ``--tiny`` its all-linear rows only), and inference forwards. Each row is a ratio to the full
fine-tuning of its own group, measured in the same run; the *floor* rows of ``bench_baselines.py``
(only the target layers' biases train: the least work of any adapter there) give each adapter's
own cost as ``adapter / floor``, in JAX and in PyTorch (``bench_report.py`` makes the tables).

How it measures (so that the numbers can be defended):

* every configuration is compiled first, then they are stepped in rounds; each round runs every
  JAX configuration once, in a fresh random order (so no row always follows the same neighbour),
  with a short pause before each step so that no thread pool is still spinning from the last;
* with ``--peft`` the PyTorch side (full fine-tuning and PEFT, fused AdamW, PyTorch's default
  threads, no shim) runs in its own worker process; the frameworks alternate turns (all JAX rows,
  then all PyTorch rows, then JAX again ...), so each has the machine to itself while it steps;
* ``--mkl-shim`` adds a second PyTorch worker whose MKL is made to take its AVX2 kernels on AMD
  CPUs (see :func:`_mkl_amd_shim`), reported as separate labelled rows;
* min and median of each row are reported; the load average is recorded before and after, and a
  warning is printed when the machine was busy (then the run is not worth publishing).

Run (from the repository root)::

    python -m experiments.benchmarks.bench_train_step --peft    # everything, ~15 min on 2 cores
    python -m experiments.benchmarks.bench_train_step --quick   # a smaller model, key rows, < 3 min
    python -m experiments.benchmarks.bench_train_step --tiny --rounds 2  # seconds: the smoke test

Writes ``experiments/results/bench_train_step[_TAG].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import jax

from experiments.benchmarks import bench_jax_runner, bench_report, bench_runners, models_gpt

RESULTS = Path(__file__).resolve().parents[1] / "results"
QUICK = models_gpt.GPTConfig(vocab=4096, d_model=384, heads=6, layers=2, mlp=1536, seq=128)
#: Pause before each timed step: OpenMP (PyTorch) and Eigen (XLA) threads spin-wait for a while
#: after their work ends (e.g. KMP_BLOCKTIME, 200 ms by default), which would slow whichever
#: process steps next; the pause lets them go idle, so every step starts on a quiet machine.
SETTLE_S = 0.3


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
    """The PyTorch side in its own process (``bench_peft.serve``)."""

    def __init__(self, args, c: models_gpt.GPTConfig, batch_size: int, shim: str | None = None):
        cmd = [sys.executable, "-m", "experiments.benchmarks.bench_peft"]
        cmd += ["--batch", str(batch_size), "--r", str(args.r), "--alpha", str(args.alpha)]
        cmd += ["--model", json.dumps(asdict(c))]
        env = dict(os.environ)
        if shim:
            env["LD_PRELOAD"] = " ".join(filter(None, [shim, env.get("LD_PRELOAD")]))
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=root, env=env)  # fmt: skip
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(
                "the PyTorch worker (experiments/benchmarks/bench_peft.py) did not start"
            )

    def close(self) -> None:
        """Ends the worker process (closing its stdin ends its serve loop)."""
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def ask(self, name: str, what: str) -> float:
        self.proc.stdin.write(f"{name}\t{what}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())


class TorchRunner:
    def __init__(self, name, group, worker, runner_name, kind):
        self.name, self.group, self.kind = name, group, kind
        self.worker, self.runner_name = worker, runner_name
        self.trainable = int(worker.ask(runner_name, "trainable")) if kind == "train" else 0
        self.memory: dict[str, float] = {}
        for _ in range(3):  # PyTorch's first steps are ~1 s slower (allocator, lazy AdamW state)
            self.run()
        self.times: list[float] = []

    def run(self) -> float:
        if self.kind == "train":
            return self.worker.ask(self.runner_name, "step")
        self.worker.ask(self.runner_name, "forward")  # untimed, as JaxRunner does
        repeats = bench_jax_runner.INFER_REPEATS
        return sum(self.worker.ask(self.runner_name, "forward") for _ in range(repeats)) / repeats


def torch_runners(args, c, batch_size, shim=None) -> list[TorchRunner]:
    label = " (MKL AMD shim)" if shim else ""
    group = "torch" + label
    worker = TorchWorker(args, c, batch_size, shim)
    names = ["PEFT LoRA q,v", "PEFT LoRA all-linear", "PEFT LoRA all-linear, dropout 0.1"]
    rows = [TorchRunner("full FT", group, worker, "torch full FT", "train")]
    rows += [TorchRunner(n, group, worker, n, "train") for n in names]
    rows += [TorchRunner(f"floor {t}", group, worker, f"torch floor {t}", "train")
             for t in ("q,v", "all-linear")]  # fmt: skip
    rows.append(TorchRunner("inference base", group, worker, "torch full FT", "infer"))
    rows.append(TorchRunner("PEFT q,v inference (unmerged)", group, worker, names[0], "infer"))
    return rows


def _load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_1m": one,
            "load_5m": five, "load_15m": fifteen}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--quick", action="store_true", help="smaller model, key rows, < 3 min")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    groups = ",".join(bench_runners.GROUPS)
    parser.add_argument("--groups", default=None, help=f"comma-separated subset of {groups}")
    parser.add_argument("--peft", action="store_true", help="also run PyTorch / PEFT (torch extra)")
    shim_help = "also PyTorch with MKL's AVX2 kernels forced on AMD (labelled rows)"
    parser.add_argument("--mkl-shim", action="store_true", help=shim_help)
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round orders")
    args = parser.parse_args(argv)
    if args.quick:
        args.groups = args.groups or "linen,nnx"
        args.rounds = args.rounds or 4
        args.batch = 4
    args.rounds = args.rounds or 8
    args.groups = (args.groups or ",".join(bench_runners.GROUPS)).split(",")
    unknown = sorted(set(args.groups) - set(bench_runners.GROUPS))
    if unknown:
        parser.error(f"unknown --groups {unknown}; choose from {bench_runners.GROUPS}")
    c = models_gpt.TINY if args.tiny else QUICK if args.quick else models_gpt.GPTConfig()
    batch_size = 2 if args.tiny else args.batch
    batch = jax.random.randint(jax.random.key(2), (batch_size, c.seq + 1), 0, c.vocab)
    load_before = _load()
    teams = [bench_runners.build(args, c, batch)]
    if args.peft:
        teams.append(torch_runners(args, c, batch_size))
        if args.mkl_shim:
            shim = _mkl_amd_shim()
            if shim is None:
                print("no MKL shim on this machine (not AMD, or no C compiler): rows skipped")
            else:
                teams.append(torch_runners(args, c, batch_size, shim))
    order = random.Random(args.seed)
    settle_s = 0.0 if args.tiny else SETTLE_S  # the smoke run's times are not read
    try:
        for _ in range(args.rounds):
            for team in teams:  # the frameworks take turns: A B A B ...
                for runner in order.sample(team, len(team)):
                    time.sleep(settle_s)
                    runner.times.append(runner.run())
    finally:
        for team in teams[1:]:
            team[0].worker.close()
    runners = [r for team in teams for r in team]
    return bench_report.report(args, c, runners, load_before, _load())


if __name__ == "__main__":
    main()
