"""Two processes x 4 CPU devices with jax.distributed (gloo), via experiments/examples/multihost.py.

The workers are spawned on a free 127.0.0.1 port with a bounded wait and killed on any failure
(``multihost.launch``). Both must end with identical adapters equal to a single-device run, and the
checkpoint they wrote together must restore, here in a single process on one device. The linen and
the NNX LM train one after the other in the same two workers (one interpreter start, jax import and
``jax.distributed`` handshake per worker instead of two).
"""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxlora
from jaxlora._src import paths

pytestmark = pytest.mark.slow  # two jax.distributed worker processes

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


def _load(name):
    path = ROOT / "experiments" / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both models' runs: the linen LM, then the NNX one, in the same two workers."""
    out = tmp_path_factory.mktemp("multihost")
    fast_compile = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    launch = _load("multihost").launch
    codes = launch(
        str(out), num_processes=2, steps=3, timeout=600, xla_flags=fast_compile, model="linen,nnx"
    )
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(out.glob("worker_*.log")))
    assert codes == [0, 0], f"worker return codes {codes}:\n{logs}"
    return out


def _read(out):
    results = [json.loads((out / f"result_{i}.json").read_text()) for i in range(2)]
    adapters = [dict(np.load(out / f"adapter_{i}.npz")) for i in range(2)]
    return results, adapters


@pytest.fixture(scope="module")
def run(runs):
    return runs / "linen", *_read(runs / "linen")


def test_two_processes_of_four_devices(run):
    _, results, _ = run
    for i, result in enumerate(results):
        assert result["process_index"] == i
        assert (result["process_count"], result["devices"], result["local_devices"]) == (2, 8, 4)
    # Per-process data loading: each process fed only its half of the global batch.
    assert [r["rows"] for r in results] == [[0, 8], [8, 16]]


def test_adapters_identical_across_processes_and_equal_single_device(run):
    _, results, adapters = run
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 20
    for name in adapters[0]:
        np.testing.assert_array_equal(adapters[0][name], adapters[1][name], err_msg=name)
    assert results[0]["losses"] == results[1]["losses"]
    assert results[0]["max_loss_diff"] <= TOLERANCE
    assert results[0]["max_adapter_diff"] <= TOLERANCE


def test_adapter_shardings_follow_the_base(run):
    _, results, _ = run
    assert all(r["specs_ok"] and r["base_unchanged"] for r in results)
    specs = results[0]["specs"]
    assert specs["layers/query/lora_a"] == "P(None, 'fsdp', None)"
    assert specs["layers/out/lora_b"] == "P(None, None, 'fsdp')"


def test_collective_checkpoint_restores(run):
    out, results, adapters = run
    assert all(r["restore_ok"] for r in results)  # restored in place, sharded, by both processes
    shards = sorted(p.name for p in (out / "checkpoint" / "lora").glob("ocdbt.process_*"))
    assert shards == ["ocdbt.process_0", "ocdbt.process_1"]  # both processes wrote their part
    # The same checkpoint read back by one process on one device.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for name, value in adapters[0].items():
        paths.set_in(
            target,
            tuple(name.split("/")),
            jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=device),
        )
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
        out / "checkpoint",
        args=ocp.args.Composite(
            lora=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()
        ),
    )
    config = jaxlora.LoraConfig.from_dict(restored["config"])
    assert (config.r, config.lora_alpha, config.bias) == (4, 8, "lora_only")
    for _, names, leaf in paths.flatten(restored["lora"]):
        np.testing.assert_array_equal(np.asarray(leaf), adapters[0]["/".join(names)])


# ---- the same LM in NNX ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_nnx(runs):
    return _read(runs / "nnx")


def test_nnx_two_processes_train_the_single_device_adapter(run_nnx):
    """An nnx.State base with partitioning metadata, FSDP over both processes' devices."""
    results, adapters = run_nnx
    assert [r["model"] for r in results] == ["nnx", "nnx"]
    assert [r["rows"] for r in results] == [[0, 8], [8, 16]]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 38
    for name in adapters[0]:
        np.testing.assert_array_equal(adapters[0][name], adapters[1][name], err_msg=name)
    assert results[0]["max_loss_diff"] <= TOLERANCE
    assert results[0]["max_adapter_diff"] <= TOLERANCE
    losses = results[0]["losses"]
    assert losses[-1] < losses[0]  # it trains
    assert all(r["specs_ok"] and r["restore_ok"] and r["base_unchanged"] for r in results)
    specs = results[0]["specs"]
    assert specs["layers/0/query/lora_a"] == "P('fsdp', None)"
    assert specs["layers/1/out/lora_b"] == "P(None, 'fsdp')"
