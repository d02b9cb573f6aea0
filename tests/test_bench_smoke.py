"""A tiny run of the training-step benchmark, so the script cannot rot."""

import json

import pytest

from experiments import bench_train_step

pytestmark = pytest.mark.slow  # runs experiments/bench_train_step.py (and PyTorch if installed)


@pytest.mark.standard_dtypes  # optax's AdamW
def test_tiny_benchmark_writes_results(tmp_path):
    argv = ["--tiny", "--rounds", "1", "--tag", "smoke", "--out", str(tmp_path)]
    if _has_peft():
        argv.append("--peft")
    result = bench_train_step.main(argv)
    saved = json.loads((tmp_path / "bench_train_step_smoke.json").read_text())
    assert saved["rows"].keys() == result["rows"].keys()
    rows = saved["rows"]
    assert rows["jax full FT"]["ratio"] == 1.0
    assert (
        rows["jaxlora factored q,v"]["trainable"] < rows["jaxlora factored all-linear"]["trainable"]
    )
    assert rows["jaxlora merged q,v"]["trainable"] == rows["jaxlora factored q,v"]["trainable"]
    assert "temp_mb" in rows["jaxlora factored q,v"]
    assert "| jaxlora factored all-linear |" in (tmp_path / "bench_train_step_smoke.md").read_text()
    if _has_peft():
        assert rows["PEFT LoRA q,v"]["trainable"] == rows["jaxlora factored q,v"]["trainable"]
        assert "jaxlora factored q,v" in saved["jax_over_torch"]


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
