"""A tiny run of experiments/benchmarks/bench_generate.py, so the script cannot rot."""

import json

import pytest

from experiments.benchmarks import bench_generate

pytestmark = pytest.mark.slow  # runs experiments/benchmarks/bench_generate.py


def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    """The script's own main, in this process (no second JAX start)."""
    returned = bench_generate.main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench_generate.json").read_text())
    assert result == json.loads(json.dumps(returned))
    rows = result["rows"]
    for way in ("merged", "factored", "per-row"):
        step = rows[f"decode step ({way})"]
        assert 0 < step["min_s"] <= step["median_s"]
        assert rows[f"generate 8 tokens ({way})"]["tokens_per_s"] > 0
        # A difference of two timings: on a tiny model its sign is noise, so only present.
        assert "tokens_per_s" in rows[f"generate per new token ({way})"]
    assert rows["forward 1 token (merged)"]["min_s"] > 0
    assert set(result["goals"]) == {"decode_step_within_1.3x_forward", "per_row_within_1.3x_single"}
    assert "load average" in result["uptime_before"] and "load average" in result["uptime_after"]
    assert isinstance(result["machine_loaded"], bool)
    table = (tmp_path / "bench_generate.md").read_text()
    assert "| decode step (per-row) |" in table and "per_row_vs_single_adapter" in table
