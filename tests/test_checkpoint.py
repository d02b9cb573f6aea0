"""Adapter checkpoints: resume bit for bit, retention, crash safety, clear errors, file size."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxlora
from jaxlora import checkpoint
from jaxlora._src.tree import fit
from tests.treeutil import assert_trees_bitwise_equal

CONFIG = jaxlora.LoraConfig(r=4, lora_alpha=8, target_modules=["l1", "l2"], bias="lora_only")


def _base(hidden=32):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "l1": {"kernel": jax.random.normal(k1, (16, hidden)), "bias": jnp.zeros(hidden)},
        "l2": {"kernel": jax.random.normal(k2, (hidden, 4)), "bias": jnp.zeros(4)},
        "norm": {"scale": jnp.ones(hidden)},
    }


def _forward(params, x):
    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None])
    return (h * params["norm"]["scale"][None]) @ params["l2"]["kernel"] + params["l2"]["bias"][None]


def _loss(lora, frozen, x, y):
    return jnp.mean((_forward(jaxlora.merge(frozen, lora, CONFIG), x) - y) ** 2)


def _batch(step):
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(1), step))
    return jax.random.normal(kx, (8, 16)), jax.random.normal(ky, (8, 4))


def _train(lora, opt_state, frozen, optimizer, steps):
    @jax.jit
    def step_fn(lora, opt_state, x, y):
        grads = jax.grad(_loss)(lora, frozen, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    for step in steps:
        lora, opt_state = step_fn(lora, opt_state, *_batch(step))
    return lora, opt_state


@pytest.mark.standard_dtypes
@pytest.mark.slow
def test_ten_steps_save_restore_ten_steps_equals_twenty_steps_bitwise(tmp_path):
    frozen = _base()
    _, lora0 = jaxlora.split(frozen, CONFIG, jax.random.key(2))
    optimizer = optax.adamw(1e-2)
    straight = _train(lora0, optimizer.init(lora0), frozen, optimizer, range(20))

    lora, opt_state = _train(lora0, optimizer.init(lora0), frozen, optimizer, range(10))
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        assert checkpoint.save(manager, 10, lora, CONFIG, opt_state=opt_state)
    del lora, opt_state
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        restored = checkpoint.restore(manager, frozen, optimizer=optimizer)
    assert restored.step == 10 and restored.config == CONFIG
    resumed = _train(restored.lora, restored.opt_state, frozen, optimizer, range(10, 20))
    assert_trees_bitwise_equal(resumed, straight)


@pytest.mark.slow
def test_restore_from_abstract_base_equals_concrete(tmp_path):
    frozen = _base()
    _, lora = jaxlora.split(frozen, CONFIG, jax.random.key(3))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        checkpoint.save(manager, 0, lora, CONFIG)
        from_abstract = checkpoint.restore(manager, abstract)
        from_concrete = checkpoint.restore(manager, frozen, step=0)
    assert_trees_bitwise_equal(from_abstract.lora, lora)
    assert_trees_bitwise_equal(from_concrete.lora, lora)
    assert from_abstract.opt_state is None


@pytest.mark.slow
def test_keep_last_n_and_best_by_metric(tmp_path):
    frozen = _base()
    _, lora = jaxlora.split(frozen, CONFIG, jax.random.key(0))
    losses = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.3, 5: 0.7}
    with checkpoint.checkpoint_manager(tmp_path / "last", max_to_keep=2) as manager:
        for step in losses:
            checkpoint.save(manager, step, lora, CONFIG)
        assert list(manager.all_steps()) == [4, 5]
    with checkpoint.checkpoint_manager(
        tmp_path / "best", max_to_keep=2, best_metric="loss", best_mode="min"
    ) as manager:
        for step, loss in losses.items():
            checkpoint.save(manager, step, lora, CONFIG, metrics={"loss": loss})
        assert sorted(manager.all_steps()) == [2, 4]
        assert manager.best_step() == 2
        assert checkpoint.restore(manager, frozen, step=manager.best_step()).step == 2


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import jax, jaxlora
    import orbax.checkpoint as ocp

    from jaxlora import checkpoint

    class HangBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):
        async def finalize(self):
            print("writing", flush=True)
            time.sleep(600)

    directory, config = sys.argv[1], jaxlora.LoraConfig.from_json(sys.argv[2])
    base = {"l1": {"kernel": jax.numpy.ones((16, 32))}, "l2": {"kernel": jax.numpy.ones((32, 4))}}
    _, first = jaxlora.split(base, config, jax.random.key(0))
    with checkpoint.checkpoint_manager(directory) as manager:
        checkpoint.save(manager, 1, first, config)
    _, second = jaxlora.split(base, config, jax.random.key(1))
    manager = checkpoint.checkpoint_manager(directory, temporary_path_class=HangBeforeCommit)
    checkpoint.save(manager, 2, second, config)
    """
)


@pytest.mark.slow  # kills a checkpoint-writing subprocess
def test_sigkill_mid_write_leaves_previous_checkpoint_loadable(tmp_path):
    config = jaxlora.LoraConfig(r=4, target_modules=["l1", "l2"], init_lora_weights=False)
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    directory = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    log = tmp_path / "writer.log"
    with open(log, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(script), str(directory), config.to_json()],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            text=True,
        )
        try:
            line = child.stdout.readline().strip()
            assert line == "writing", log.read_text()[-2000:]
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=60)
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    # The writers' lock file stays (see checkpoint_manager); only the killed step's tmp is new.
    leftovers = [name for name in os.listdir(directory) if name not in ("1", ".jaxlora-lock")]
    assert leftovers and all("tmp" in name for name in leftovers), leftovers

    base = {"l1": {"kernel": jnp.ones((16, 32))}, "l2": {"kernel": jnp.ones((32, 4))}}
    _, expected = jaxlora.split(base, config, jax.random.key(0))
    with checkpoint.checkpoint_manager(directory) as manager:
        assert list(manager.all_steps()) == [1]
        restored = checkpoint.restore(manager, base)
    assert restored.step == 1
    assert_trees_bitwise_equal(restored.lora, expected)


@pytest.mark.slow
def test_restore_onto_base_of_other_shapes_names_paths_and_shapes(tmp_path):
    _, lora = jaxlora.split(_base(), CONFIG, jax.random.key(0))
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        checkpoint.save(manager, 7, lora, CONFIG)
        with pytest.raises(ValueError, match="step 7") as err:
            checkpoint.restore(manager, _base(hidden=48))
    message = str(err.value)
    assert "`l1/lora_b` stored (4, 32) float32, expected (4, 48) float32" in message
    assert "`l1/bias` stored (32,) float32, expected (48,) float32" in message
    assert "`l2/lora_a` stored (32, 4) float32, expected (48, 4) float32" in message
    assert "l1/lora_a" not in message and "l2/lora_b" not in message


def test_restore_onto_base_without_the_target_modules_is_an_error(tmp_path):
    _, lora = jaxlora.split(_base(), CONFIG, jax.random.key(0))
    other = {"other": {"kernel": jnp.ones((4, 4))}}
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        checkpoint.save(manager, 0, lora, CONFIG)
        with pytest.raises(ValueError, match="stored config of .* does not fit `frozen`.*l1"):
            checkpoint.restore(manager, other)


def test_check_fits_reports_missing_and_unexpected_leaves():
    leaf = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"`a` missing \(expected \(2, 3\) float32\)"):
        fit.check_fits({}, {"a": leaf}, "x")
    with pytest.raises(ValueError, match=r"`b` unexpected \(stored \(2, 3\) float32\)"):
        fit.check_fits({"b": leaf}, {}, "x")
    many = {f"p{i}": leaf for i in range(25)}
    with pytest.raises(ValueError, match=r"… \(5 more\)"):
        fit.check_fits(many, {}, "x")


def test_restore_errors(tmp_path):
    frozen = _base()
    _, lora = jaxlora.split(frozen, CONFIG, jax.random.key(0))
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        with pytest.raises(ValueError, match="no adapter checkpoint in"):
            checkpoint.restore(manager, frozen)
        checkpoint.save(manager, 3, lora, CONFIG)
        with pytest.raises(ValueError, match=r"`step`=4 is not in .*steps there: \[3\]"):
            checkpoint.restore(manager, frozen, step=4)
        with pytest.raises(ValueError, match="`optimizer` was given but .* no optimizer state"):
            checkpoint.restore(manager, frozen, optimizer=optax.sgd(0.1))
        with pytest.raises(TypeError, match="`config` must be a jaxlora.LoraConfig"):
            checkpoint.save(manager, 4, lora, CONFIG.to_dict())
        with pytest.raises(TypeError, match="`lora` must be the adapter dict"):
            checkpoint.save(manager, 4, [lora], CONFIG)
    with pytest.raises(ValueError, match="`best_mode` must be 'min' or 'max'"):
        checkpoint.checkpoint_manager(tmp_path, best_mode="lowest")


def _dir_bytes(directory):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory)
        for name in names
    )


@pytest.mark.slow  # seconds of compiling: full suite only
def test_adapter_file_is_theta_bytes_plus_small_overhead(tmp_path):
    # Random A and B (init_lora_weights=False), so compression cannot hide overhead.
    base = {
        f"layer_{i}": {name: {"kernel": jnp.zeros((256, 256))} for name in ("q", "v")}
        for i in range(4)
    }
    config = jaxlora.LoraConfig(r=16, target_modules=["q", "v"], init_lora_weights=False)
    _, lora = jaxlora.split(base, config, jax.random.key(0))
    raw = sum(leaf.nbytes for leaf in jax.tree.leaves(lora))
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        checkpoint.save(manager, 0, lora, config)
    written = _dir_bytes(tmp_path)
    print(f"adapter checkpoint: {written} bytes on disk for {raw} raw bytes of Θ")
    assert written <= 1.05 * raw + 64 * 1024
    assert np.isfinite(written / raw)


def test_restore_through_a_manager_without_item_handlers_is_an_error(tmp_path):

    frozen = _base()
    _, lora = jaxlora.split(frozen, CONFIG, jax.random.key(0))
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        checkpoint.save(manager, 0, lora, CONFIG)
    with ocp.CheckpointManager(tmp_path) as plain:
        with pytest.raises(ValueError, match="`manager` cannot read the `lora` item"):
            checkpoint.restore(plain, frozen)
