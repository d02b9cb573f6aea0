"""The main job runs end to end on tiny settings (the real run is README command 1)."""

import json

import pytest

from experiments.examples import finetune

pytestmark = pytest.mark.slow  # a smoke run of experiments/examples/finetune.py on MiniLM's weights


@pytest.mark.standard_dtypes
def test_finetune_smoke(tmp_path):
    out = tmp_path / "finetune.json"
    result = finetune.main(
        ["--steps", "4", "--n-test", "16", "--max-length", "16", "--batch-size", "8",
         "--adapter-dir", str(tmp_path / "adapter"), "--results", str(out)]
    )  # fmt: skip
    assert result["trainable"] == 2 * 6 * 8 * (384 + 384) + 384 * 2 + 2
    assert 0.0 <= result["accuracy_after"] <= 1.0
    assert result["merged_agreement"] == 1.0
    assert result["merged_max_logit_diff"] < 1e-4
    assert json.loads(out.read_text()) == result
