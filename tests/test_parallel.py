"""Every parallelism mode of experiments/examples/train_parallel.py on 8 simulated CPU devices.

The script runs in one subprocess (jax fixes its device count at first use, and this pytest
process must keep its own), its ``main`` called there twice, for the linen and for the NNX LM (one
interpreter and jax import instead of two); each run trains a single-device reference plus each
mode on the same batches.
It asserts inside that the adapter's ``.sharding.spec`` equals ``jaxlora.lora_shardings`` before and
after training; here we check its report against the single-device run and the rule by hand.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # experiments/examples/train_parallel.py in a subprocess

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "examples" / "train_parallel.py"
TOLERANCE = 1e-5
# Compiling dominates these runs; XLA's cheaper CPU pipeline halves it and keeps float32 numerics.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# After the run's own XLA options (conftest's test-compile flags), which the subprocess keeps.
EIGHT_DEVICES = f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"


NNX_MODES = ("dp", "fsdp", "tp")
# Both CLI runs in one interpreter; each writes its report whatever the other's outcome.
DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
import train_parallel
sys.exit(max([train_parallel.main(argv.split()) for argv in sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {EIGHT_DEVICES}"}
    env.pop("JAX_PLATFORMS", None)
    runs = [
        f"--mode all --steps 4 --out {out}",
        f"--model nnx --mode {','.join(NNX_MODES)} --steps 3 --out {out}",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(SCRIPT.parent), *runs],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return out, proc


def _report(reports, name):
    out, proc = reports
    path = out / name
    if not path.exists():
        pytest.fail(f"train_parallel.py wrote no {name} (rc {proc.returncode}):\n{proc.stderr}")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def report(reports):
    return _report(reports, "parallel.json")


@pytest.mark.parametrize("mode", ["dp", "fsdp", "tp", "pmap", "shard_map"])
def test_matches_single_device(report, mode):
    row = report[mode]
    assert "error" not in row, row.get("error")
    assert len(row["losses"]) == len(report["single"]["losses"]) == 4
    assert row["max_loss_diff"] <= TOLERANCE
    assert row["max_adapter_diff"] <= TOLERANCE
    assert report["single"]["losses"][-1] < report["single"]["losses"][0]  # it does train


# Axes: layers (stacked) first; q/k/v kernels (layers, embed, heads, kv), out (layers, heads, kv,
# embed), up (layers, embed, mlp), down (layers, mlp, embed), embedding table (vocab, embed).
FSDP = {
    "layers/query/lora_a": "P(None, 'fsdp', None)",
    "layers/query/lora_b": "P(None, None, None, None)",
    "layers/out/lora_a": "P(None, None, None, None)",
    "layers/out/lora_b": "P(None, None, 'fsdp')",
    "layers/out/bias": "P(None, 'fsdp')",
    "layers/down/lora_b": "P(None, None, 'fsdp')",
    "embed/lora_a": "P(None, None)",
    "embed/lora_b": "P(None, 'fsdp')",
}
TP = {
    # Column parallel: the output (heads / mlp) axes are sharded, so b and the bias are.
    "layers/query/lora_a": "P(None, None, None)",
    "layers/query/lora_b": "P(None, None, 'model', None)",
    "layers/query/bias": "P(None, 'model', None)",
    "layers/up/lora_b": "P(None, None, 'model')",
    # Row parallel: the input axes are sharded, so a is.
    "layers/out/lora_a": "P(None, 'model', None, None)",
    "layers/out/lora_b": "P(None, None, None)",
    "layers/down/lora_a": "P(None, 'model', None)",
    "embed/lora_a": "P('model', None)",
}


@pytest.mark.parametrize(
    "mode, expected", [("fsdp", FSDP), ("shard_map", FSDP), ("tp", TP)], ids=["fsdp", "sm", "tp"]
)
def test_adapter_specs_follow_the_base(report, mode, expected):
    specs = report[mode]["specs"]
    assert {k: specs[k] for k in expected} == expected


def test_data_parallel_adapter_is_replicated(report):
    specs = report["dp"]["specs"]
    assert len(specs) == 20
    assert all(set(s[2:-1].split(", ")) == {"None"} for s in specs.values())


# ---- the same LM in NNX: shardings from nnx.Param partitioning metadata ----------------------


@pytest.fixture(scope="module")
def report_nnx(reports):
    return _report(reports, "parallel_nnx.json")


@pytest.mark.parametrize("mode", NNX_MODES)
def test_nnx_matches_single_device_and_trains(report_nnx, mode):
    """Inside, the script checks the adapter's specs against lora_shardings and the base bitwise."""
    row = report_nnx[mode]
    assert report_nnx["model"] == "nnx"
    assert "error" not in row, row.get("error")
    assert len(row["losses"]) == 3
    assert row["max_loss_diff"] <= TOLERANCE and row["max_adapter_diff"] <= TOLERANCE
    losses = report_nnx["single"]["losses"]
    assert losses[-1] < losses[0] - 0.1  # it does train


# No stacked axis: NNX's layers are a list (layers/0/..., layers/1/...), the rule is the same.
NNX_FSDP = {
    "layers/0/query/lora_a": "P('fsdp', None)",
    "layers/0/query/lora_b": "P(None, None, None)",
    "layers/1/out/lora_b": "P(None, 'fsdp')",
    "layers/1/out/bias": "P('fsdp',)",
    "layers/0/down/lora_b": "P(None, 'fsdp')",
    "embed/lora_b": "P(None, 'fsdp')",
}
NNX_TP = {
    "layers/0/query/lora_b": "P(None, 'model', None)",
    "layers/0/query/bias": "P('model', None)",
    "layers/1/up/lora_b": "P(None, 'model')",
    "layers/1/out/lora_a": "P('model', None, None)",
    "layers/0/down/lora_a": "P('model', None)",
    "embed/lora_a": "P('model', None)",
}


@pytest.mark.parametrize("mode, expected", [("fsdp", NNX_FSDP), ("tp", NNX_TP)])
def test_nnx_adapter_specs_follow_the_partitioning_metadata(report_nnx, mode, expected):
    specs = report_nnx[mode]["specs"]
    assert {k: specs[k] for k in expected} == expected
    dp = report_nnx["dp"]["specs"]
    assert len(dp) == 38 and all(
        set(s[2:-1].replace(",", " ").split()) == {"None"} for s in dp.values()
    )
