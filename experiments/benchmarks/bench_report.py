"""The tables of ``bench_train_step.py``: ratios within a group, across frameworks, and to floors.

* ``ratio``: a row's step over the full fine-tuning step of its own group (the same model);
* ``same work``: jaxlora's step over PEFT's (or qwix's) on identical work, and the two frameworks'
  full fine-tuning and floors;
* ``over floor``: each adapter's step over the floor of its own framework and targets (the floor
  rows of ``bench_baselines.py``): what the adapter machinery itself costs.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
from dataclasses import asdict
from pathlib import Path

import jax

from experiments.benchmarks import bench_jax_runner, results_io

BUSY_LOAD = 1.5  # load average before the run above which a 2-core machine is not quiet
#: (adapter row, floor row) pairs, by group-free row name.
FLOORS = [
    ("jaxlora factored q,v", "floor q,v"),
    ("jaxlora factored all-linear", "floor all-linear"),
    ("jaxlora factored all-linear, dropout 0.1", "floor all-linear"),
    ("jaxlora factored q,v, dropout 0.1", "floor q,v"),
    ("qwix q,v", "floor q,v"),
    ("qwix all-linear", "floor all-linear"),
    ("PEFT LoRA q,v", "floor q,v"),
    ("PEFT LoRA all-linear", "floor all-linear"),
    ("PEFT LoRA all-linear, dropout 0.1", "floor all-linear"),
]


def _ratio(rows, a: str, b: str) -> dict[str, float]:
    return {
        "median": round(rows[a]["median_ms"] / rows[b]["median_ms"], 3),
        "min": round(rows[a]["min_ms"] / rows[b]["min_ms"], 3),
    }


def _over_floor(rows: dict[str, dict]) -> dict[str, dict[str, float]]:
    out = {}
    for key, row in rows.items():
        for adapter, floor in FLOORS:
            floor_key = f"{row['group']} | {floor}"
            if row["name"] == adapter and floor_key in rows:
                out[f"{key} / {floor}"] = _ratio(rows, key, floor_key)
    return out


def report(args, c, runners, load_before, load_after) -> dict:
    rows: dict[str, dict] = {}
    for r in runners:
        rows[f"{r.group} | {r.name}"] = {
            "group": r.group,
            "name": r.name,
            "kind": r.kind,
            "median_ms": round(1e3 * statistics.median(r.times), 2),
            "min_ms": round(1e3 * min(r.times), 2),
            "trainable": r.trainable,
            **r.memory,
            "times_ms": [round(1e3 * t, 2) for t in r.times],  # in round order: the raw data
        }
    for row in rows.values():
        ref_name = "full FT" if row["kind"] == "train" else "base"
        if row["group"].startswith("torch") and row["kind"] == "infer":
            ref_name = "inference base"
        ref = rows.get(f"{row['group']} | {ref_name}")
        if ref is not None:
            row["ratio"] = round(row["median_ms"] / ref["median_ms"], 3)
            row["ratio_of_min"] = round(row["min_ms"] / ref["min_ms"], 3)
    same_work = {}
    for ours, theirs in [
        ("linen | jaxlora factored q,v", "PEFT LoRA q,v"),
        ("linen | jaxlora factored all-linear", "PEFT LoRA all-linear"),
        ("linen | jaxlora factored all-linear, dropout 0.1", "PEFT LoRA all-linear, dropout 0.1"),
        ("linen | full FT", "full FT"),
        ("linen | floor q,v", "floor q,v"),
        ("linen | floor all-linear", "floor all-linear"),
        ("nnx | jaxlora factored q,v", "nnx | qwix q,v"),
        ("nnx | jaxlora factored all-linear", "nnx | qwix all-linear"),
    ]:
        torch_groups = ("torch", "torch (MKL AMD shim)")
        others = [theirs] if theirs.startswith("nnx") else [f"{g} | {theirs}" for g in torch_groups]
        for other in others:
            if ours in rows and other in rows:
                same_work[f"{ours} / {other}"] = _ratio(rows, ours, other)
    over_floor = _over_floor(rows)
    # The run itself keeps both cores busy, so only the load before it tells of other work.
    busy = load_before["load_1m"] > BUSY_LOAD
    result = {
        "rows": rows,
        "same_work": same_work,
        "over_floor": over_floor,
        "model": asdict(c),
        "load": {"before": load_before, "after": load_after, "busy": busy},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "command": results_io.command("experiments.benchmarks.bench_train_step"),
    }
    write(args, result)
    if busy:
        print(f"WARNING: load average above {BUSY_LOAD} before the run: not a quiet machine")
    return result


def _cell(key: str) -> str:
    """A row key (``group | name / group | name``) as one markdown table cell."""
    return key.replace("|", "\\|")


def table(result) -> str:
    lines = [
        "| group | configuration | trainable | min ms | median ms | ratio (median) | "
        "ratio (min) | XLA temp MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"].values():
        lines.append(
            f"| {row['group']} | {row['name']} | {row['trainable']:,} | {row['min_ms']:.1f} | "
            f"{row['median_ms']:.1f} | {row.get('ratio', '')} | {row.get('ratio_of_min', '')} | "
            f"{row.get('temp_mb', '')} |"
        )
    if result.get("over_floor"):
        lines += ["", "| adapter step / floor step (its own framework) | ratio (median) | "
                  "ratio (min) |", "|---|---:|---:|"]  # fmt: skip
        lines += [f"| {_cell(k)} | {v['median']} | {v['min']} |"
                  for k, v in result["over_floor"].items()]  # fmt: skip
    if result["same_work"]:
        lines += ["", "| same work | ratio (median) | ratio (min) |", "|---|---:|---:|"]
        lines += [f"| {_cell(k)} | {v['median']} | {v['min']} |"
                  for k, v in result["same_work"].items()]  # fmt: skip
    load = result["load"]
    lines += [
        "",
        f"load average (1 min) before {load['before']['load_1m']:.2f}, after "
        f"{load['after']['load_1m']:.2f} (the run's own processes add ~2)"
        + (" — BUSY before the run, do not publish" if load["busy"] else ""),
        f"peak RSS of the JAX process: {result['peak_rss_mb']} MB; "
        f"{result['settings']['rounds']} rounds, random order within each round, frameworks in "
        "alternating turns; PyTorch: fused AdamW, default threads; an inference turn is the "
        f"mean of {bench_jax_runner.INFER_REPEATS} forwards after an untimed one",
    ]
    return "\n".join(lines)


def write(args, result) -> None:
    stem = "bench_train_step" + (f"_{args.tag}" if args.tag else "")
    results_io.write(Path(args.out), stem, result, [f"`{result['command']}`", "", table(result)])
