"""What every benchmark script of ``experiments/`` records alongside its numbers, and how it writes
them: a JSON file for machines and a markdown table for people, side by side in
``experiments/results/``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def command(module: str) -> str:
    """The command line that produced this run, as a reader would type it again."""
    return " ".join([f"python -m {module}"] + sys.argv[1:])


def load_1m() -> float:
    """The 1-minute load average: recorded before and after every timed run, because numbers from
    a machine that was busy with something else are not worth publishing."""
    return os.getloadavg()[0]


def write(out: Path, stem: str, result: dict, lines: list[str]) -> None:
    """Writes ``result`` as ``out/stem.json`` and ``lines`` as ``out/stem.md``, and prints them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
