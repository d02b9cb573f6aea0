"""Smoke test of experiments/benchmarks/bench_memory.py on a tiny model (``--tiny``: one layer;
five configurations), and of xla_peak_breakdown.py on the XLA dump of its run."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs experiments/benchmarks/bench_memory.py in subprocesses

SCRIPT = os.path.join(
    os.path.dirname(__file__), os.pardir, "experiments", "benchmarks", "bench_memory.py"
)


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
    """One run of the script, its five configurations in one worker process (``--per-process``:
    one JAX start instead of five), with XLA dumping each compiled step: the linen rows the first
    test reads, the NNX rows and twins the last one reads, and the dump the breakdown test reads.
    ``lora_nf4_factored_remat`` runs last, so its step is the dump's last ``jit_step``."""
    out = tmp_path_factory.mktemp("bench_memory")
    configs = "full_ft,lora_nf4_factored,nnx_full_ft,nnx_lora_nf4_factored,lora_nf4_factored_remat"
    cmd = [sys.executable, SCRIPT, "--tiny", "--nnx", "--configs", configs, "--per-process", "5"]
    dump = out / "dump"
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
        + f" --xla_dump_to={dump} --xla_dump_hlo_module_re=.*step.*",
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cached program is not compiled, so not dumped
    proc = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "bench_memory_nnx_tiny.json").read_text())
    rows = {row["config"]: row for row in data["rows"]}
    return rows, (out / "bench_memory_nnx_tiny.md").read_text(), dump


def test_bench_memory_small_writes_json_and_markdown(nnx_run):
    rows, table, _ = nnx_run
    full, nf4 = rows["full_ft"], rows["lora_nf4_factored"]
    assert nf4["base_bytes"] < full["base_bytes"] / 3  # 4-bit codes + scales vs float32
    assert 0 < nf4["trainable"] < full["params"]
    for row in rows.values():
        assert row["xla_peak_bytes"] > 0 and row["peak_rss_mb"] > 0
        assert row["loss"] == row["loss"]  # not NaN
    assert "| lora_nf4_factored | nf4 | factored | no |" in table
    assert "| lora_nf4_factored_remat | nf4 | factored | yes |" in table
    remat = rows["lora_nf4_factored_remat"]
    assert remat["remat"] and abs(remat["loss"] - nf4["loss"]) < 1e-5  # the same step


def test_xla_peak_breakdown_reads_a_dump(nnx_run):
    *_, dump = nnx_run
    breakdown = os.path.join(os.path.dirname(SCRIPT), "xla_peak_breakdown.py")
    proc = subprocess.run([sys.executable, breakdown, str(dump)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total = float(proc.stdout.split("MiB")[0].rsplit(":", 1)[1])
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| f32[")]
    assert total > 0 and rows  # float32 activations are live at the peak


def test_bench_memory_nnx_rows_match_their_linen_twins(nnx_run):
    """The NNX decoder draws linen's weights and computes linen's step: the same full fine-tuning
    loss; its quantised LoRA row runs and the parity table pairs the twins."""
    rows, table, _ = nnx_run
    linen, nnx = rows["full_ft"], rows["nnx_full_ft"]
    assert (linen["framework"], nnx["framework"]) == ("linen", "nnx")
    assert nnx["params"] == linen["params"] and nnx["base_bytes"] == linen["base_bytes"]
    assert abs(nnx["loss"] - linen["loss"]) < 1e-5  # same weights, same maths
    nf4 = rows["nnx_lora_nf4_factored"]
    assert nf4["base_bytes"] < nnx["base_bytes"] / 3 and 0 < nf4["trainable"] < nnx["params"]
    assert nf4["xla_peak_bytes"] < nnx["xla_peak_bytes"] and nf4["loss"] == nf4["loss"]
    assert "| nnx_lora_nf4_factored | nf4 | factored | no |" in table
    assert "| full_ft | " in table.split("linen and NNX")[1]  # the side-by-side table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--configs", "nope"], "unknown configuration 'nope'"),
        (["--per-process", "0"], "--per-process must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_errors_before_any_run(argv, message, capsys):
    from experiments.benchmarks import bench_memory

    with pytest.raises(SystemExit):
        bench_memory.main(["--tiny", *argv])
    assert message in capsys.readouterr().err
