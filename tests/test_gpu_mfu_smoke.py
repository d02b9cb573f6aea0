"""experiments/benchmarks/gpu_mfu.py (GPU MFU) on a tiny model on CPU, so the script cannot rot."""

import json

import pytest

from experiments.benchmarks import gpu_mfu

pytestmark = pytest.mark.slow  # compiles two training steps


@pytest.mark.standard_dtypes  # optax's AdamW on bfloat16 weights
def test_tiny_run_writes_results(tmp_path):
    result = gpu_mfu.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_mfu_tiny.json").read_text())
    full, lora = saved["rows"]
    assert lora["trainable"] < full["trainable"]
    assert 0 < lora["mfu"] and 0 < full["mfu"]
    assert lora["model_flops"] < full["model_flops"]  # 4N against 6N per token
    assert result["matmul_peak_flops_per_s"]["flops_per_s"] > 0
    assert "| jaxlora factored all-linear r16 |" in (tmp_path / "gpu_mfu_tiny.md").read_text()
