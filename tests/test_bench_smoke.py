"""A tiny run of the training-step benchmark, so the script cannot rot."""

import importlib.util
import json

import pytest

from experiments.benchmarks import bench_train_step

pytestmark = pytest.mark.slow  # runs experiments/benchmarks/bench_train_step.py (and PyTorch)


@pytest.mark.standard_dtypes  # optax's AdamW
def test_tiny_benchmark_writes_results(tmp_path):
    argv = ["--tiny", "--rounds", "1", "--tag", "smoke", "--out", str(tmp_path)]
    if _has("torch") and _has("peft"):
        argv.append("--peft")
    result = bench_train_step.main(argv)
    saved = json.loads((tmp_path / "bench_train_step_smoke.json").read_text())
    assert saved["rows"].keys() == result["rows"].keys()
    rows = saved["rows"]
    # Equinox is an optional extra: its group has no rows without it.
    functional = ("plain", "equinox") if _has("equinox") else ("plain",)
    for group in ("linen", "linen-mha", "nnx", "bf16", *functional):
        assert rows[f"{group} | full FT"]["ratio"] == 1.0
    assert rows["inference | base"]["ratio"] == 1.0
    qv = rows["linen | jaxlora factored q,v"]["trainable"]
    assert qv < rows["linen | jaxlora factored all-linear"]["trainable"]
    # The same work in every framework: the same trainable count.
    assert rows["linen | jaxlora merged q,v"]["trainable"] == qv
    assert rows["linen-mha | jaxlora factored q,v"]["trainable"] == qv
    assert rows["nnx | jaxlora factored q,v"]["trainable"] == qv
    assert rows["plain | jaxlora factored q,v"]["trainable"] == qv
    all_linear = rows["linen | jaxlora factored all-linear"]["trainable"]
    for group in ("nnx", *functional):
        assert rows[f"{group} | jaxlora factored all-linear"]["trainable"] == all_linear
    for group in functional:  # the linen GPT's params in other forms: the same full FT and floor
        assert rows[f"{group} | full FT"]["trainable"] == rows["linen | full FT"]["trainable"]
        floor = rows[f"{group} | floor all-linear"]["trainable"]
        assert floor == rows["linen | floor all-linear"]["trainable"]
        assert f"{group} | jaxlora factored all-linear, dropout 0.1 / floor all-linear" in saved[
            "over_floor"]  # fmt: skip
    assert "temp_mb" in rows["linen | jaxlora factored q,v"]
    # The floors train only the target layers' biases: the least work of any adapter there.
    # (The Equinox group skips its q,v rows in --tiny: the all-linear rows run the same code.)
    for group in ("linen", "linen-mha", "nnx", "plain"):
        assert rows[f"{group} | floor q,v"]["trainable"] < rows[f"{group} | floor all-linear"][
            "trainable"] < qv  # fmt: skip
        assert f"{group} | jaxlora factored q,v / floor q,v" in saved["over_floor"]
    assert "bf16 | jaxlora factored all-linear / floor all-linear" in saved["over_floor"]
    # The raw data: one time per round, in round order.
    assert len(rows["linen | full FT"]["times_ms"]) == 1
    assert saved["load"]["before"]["load_1m"] >= 0
    text = (tmp_path / "bench_train_step_smoke.md").read_text()
    assert "| linen | jaxlora factored all-linear, dropout 0.1 |" in text
    if _has("qwix"):
        assert rows["nnx | qwix q,v"]["trainable"] == qv
        assert rows["nnx | qwix all-linear"]["trainable"] == all_linear
    if "--peft" in argv:
        assert rows["torch | PEFT LoRA q,v"]["trainable"] == qv
        assert rows["torch | PEFT LoRA all-linear"]["trainable"] == all_linear
        assert "linen | jaxlora factored q,v / torch | PEFT LoRA q,v" in saved["same_work"]
        assert rows["torch | floor q,v"]["trainable"] == rows["linen | floor q,v"]["trainable"]
        assert "linen | floor all-linear / torch | floor all-linear" in saved["same_work"]
        assert "torch | PEFT LoRA q,v / floor q,v" in saved["over_floor"]


def _has(module: str) -> bool:
    """Whether ``module`` is installed, without importing it here (torch and PEFT take seconds to
    import, and only the benchmark's PyTorch worker process needs them)."""
    return importlib.util.find_spec(module) is not None


@pytest.mark.standard_dtypes
def test_tiny_profile_writes_results(tmp_path):
    """Needs PyTorch and PEFT (the bench extra, part of dev): the profile compares against them."""
    from experiments.benchmarks import profile_step

    result = profile_step.main(["--tiny", "--out", str(tmp_path)])
    steps = json.loads((tmp_path / "profile_step_tiny.json").read_text())["steps"]
    assert steps.keys() == result["steps"].keys() == {
        "JAX full FT", "jaxlora all-linear", "JAX floor all-linear",
        "PyTorch full FT", "PEFT all-linear", "PyTorch floor all-linear",
    }  # fmt: skip
    for summary in steps.values():
        assert summary["total_ms"] > 0 and summary["groups_ms"]["matmul"] > 0
    attention = json.loads((tmp_path / "profile_step_tiny.json").read_text())["attention_ms"]
    assert "PyTorch: scaled_dot_product_attention" in attention
    assert "JAX (XLA:CPU): two einsums" in attention
    assert all(min_ms <= median_ms for min_ms, median_ms in attention.values())
    gemm = json.loads((tmp_path / "profile_step_tiny.json").read_text())["gemm_ms"]
    assert gemm.keys() == {"JAX (XLA:CPU)", "PyTorch"}
    assert gemm["JAX (XLA:CPU)"].keys() == gemm["PyTorch"].keys() and gemm["PyTorch"]
    overlap = steps["JAX floor all-linear"]["concurrency"]
    assert 0 <= overlap["two_ops_at_once_ms"] <= overlap["busy_ms"] and overlap["busy_ms"] > 0


@pytest.mark.standard_dtypes
def test_tiny_xla_options_writes_results(tmp_path):
    from experiments.benchmarks import xla_cpu_options

    result = xla_cpu_options.main(["--tiny", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "xla_cpu_options_tiny.json").read_text())["rows"]
    assert rows.keys() == result["rows"].keys()
    assert rows["default | floor all-linear"]["ratio"] == 1.0
    for option in xla_cpu_options.OPTIONS:
        row = rows[f"{option} | jaxlora factored all-linear"]
        assert row["options"] == xla_cpu_options.OPTIONS[option] and row["median_ms"] > 0
        assert isinstance(row["program_differs"], bool)
    # The memory-optimised scheduler reorders the program (the others compile to the default's).
    assert rows["memory-optimized scheduler | floor all-linear"]["program_differs"]


@pytest.mark.standard_dtypes
def test_tiny_adapter_cost_writes_results(tmp_path):
    from experiments.benchmarks import adapter_cost

    result = adapter_cost.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "adapter_cost_tiny.json").read_text())
    assert saved["rows"].keys() == result["rows"].keys()
    variants = {row["variant"] for row in saved["rows"].values()}
    assert variants == set(saved["block_ms"]) and "jaxlora fast path" in variants
    assert saved["block_over_floor"]["floor"] == 1.0
    assert all(row["median_ms"] > 0 for row in saved["rows"].values())


def test_einsum_attention_is_the_models_attention():
    """profile_step times the attention in another layout only because it is the same maths."""
    import jax
    import jax.numpy as jnp

    from experiments.benchmarks import profile_step

    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 3, 4))
    want = jax.jit(jax.nn.dot_product_attention, static_argnames="is_causal")(
        q, k, v, is_causal=True
    )
    got = jax.jit(profile_step.einsum_attention)(q, k, v)
    assert jnp.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_one_gemm_variant_computes_the_adapted_layer():
    """The rejected one-GEMM variant of ``adapter_cost.py`` is timed only because it is a correct
    alternative: its output and gradients are the fast path's."""
    import jax
    import jax.numpy as jnp

    from experiments.benchmarks import adapter_cost
    from jaxlora._src.forward import fused

    k = jax.random.split(jax.random.key(0), 4)
    x, w = jax.random.normal(k[0], (6, 5)), jax.random.normal(k[1], (5, 3))
    a, b = jax.random.normal(k[2], (5, 2)), jax.random.normal(k[3], (2, 3))
    s = adapter_cost.SCALE

    def wide(x, a, b):
        return jnp.sum(jnp.sin(adapter_cost.one_gemm(x, w, a, b)))

    def fast(x, a, b):
        return jnp.sum(jnp.sin(fused.dense(x, w, None, a, b, None, s, 0.0, None)))

    grads = [jax.jit(jax.grad(loss, (0, 1, 2)))(x, a, b) for loss in (wide, fast)]
    for got, want in zip(*grads, strict=True):
        assert jnp.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merged_inference_row_runs_the_base_program():
    """The inference group's merged row times the base model's compiled program itself (with the
    merged weights as its arguments), so any gap between the two rows is measurement noise."""
    import argparse

    import jax

    from experiments.benchmarks import bench_runners, models_gpt

    c = models_gpt.TINY
    batch = jax.random.randint(jax.random.key(2), (2, c.seq + 1), 0, c.vocab)
    # The tiny benchmark's settings: the programs it compiled come from the run's compile cache.
    args = argparse.Namespace(r=8, alpha=16.0, quick=True)
    base, merged, *_ = bench_runners.inference_group(args, c, batch)
    assert (base.name, merged.name) == ("base", "jaxlora merged q,v")

    assert base.program() == merged.program()
