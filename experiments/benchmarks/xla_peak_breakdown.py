"""What is live at the peak of a compiled XLA program, grouped by shape: where temporaries go.

Reads the ``*-live-range.txt`` and ``*-buffer-assignment.txt`` files that XLA writes with
``--xla_dump_to`` and lists the buffers live at the peak that are not program arguments (the
parameters are named after their pytree paths, e.g. ``frozen__lm_head____kernel__``), largest
shapes first.

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*step.*" \\
        python experiments/benchmarks/bench_memory.py --worker lora_nf4_factored_remat
    python experiments/benchmarks/xla_peak_breakdown.py /tmp/dump
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys

_LIVE = re.compile(r"\s*(\S+?)(\{[^}]*\})?: (\d+) bytes")
_VALUE = re.compile(r"value: <\d+ (\S+) @\d+> \(size=\d+,offset=\d+\): (\S+)")


def _files(dump: str, module: str) -> tuple[str, str]:
    ranges = sorted(glob.glob(os.path.join(dump, f"*{module}*after_optimizations-live-range.txt")))
    if not ranges:
        raise SystemExit(f"no *{module}*after_optimizations-live-range.txt in {dump}")
    assignment = ranges[-1].replace("-live-range.txt", "-buffer-assignment.txt")
    return ranges[-1], assignment


def breakdown(live_range: str, assignment: str) -> tuple[int, list[tuple[str, int, int]]]:
    """``(peak_time, [(shape, bytes, buffers), ...])`` for the non-argument buffers at the peak."""
    with open(live_range) as f:
        lines = f.read().splitlines()
    start = next(i for i, ln in enumerate(lines) if "Live ranges at" in ln)
    peak_time = int(re.search(r"Live ranges at (\d+)", lines[start]).group(1))
    with open(assignment) as f:
        text = f.read()
    shapes = {m.group(1): m.group(2).split("{")[0] for m in _VALUE.finditer(text)}
    params = set(re.findall(r"parameter \d+, shape .*?\n value: <\d+ (\S+) @", text))
    size = collections.Counter()
    count = collections.Counter()
    for line in lines[start + 1 :]:
        if "Stack trace breakdown" in line:
            break
        m = _LIVE.match(line)
        if not m or m.group(1) in params:
            continue
        shape = shapes.get(m.group(1), "?")
        size[shape] += int(m.group(3))
        count[shape] += 1
    return peak_time, [(s, b, count[s]) for s, b in size.most_common()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dump", help="the --xla_dump_to directory")
    parser.add_argument("--module", default="jit_step", help="HLO module name (default jit_step)")
    parser.add_argument("--top", type=int, default=15, help="shapes to list")
    args = parser.parse_args(argv)
    peak_time, rows = breakdown(*_files(args.dump, args.module))
    total = sum(b for _, b, _ in rows)
    print(f"non-argument buffers live at the peak (step {peak_time}): {total / 2**20:.1f} MiB")
    print("| shape | MiB | buffers |\n|---|---:|---:|")
    for shape, nbytes, n in rows[: args.top]:
        print(f"| {shape} | {nbytes / 2**20:.1f} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
