"""Files that cannot silently go wrong: every bad input is a clear error, every writer is atomic.

Checkpoints (``jaxlora.checkpoint``) and PEFT exports (``save_peft`` / ``load_peft``): refused
overwrites, retention that keeps the best, sha256 of every array and of the config verified on
restore, readable errors for damaged files, and writers killed with SIGKILL mid-write that leave
the last good copy loadable.
"""

import gc
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import jaxlora
from jaxlora import checkpoint
from jaxlora import peft as jpeft
from jaxlora._src.files import atomic
from tests.treeutil import assert_trees_bitwise_equal

# The full suite only (writes and corrupts many checkpoints).
pytestmark = pytest.mark.slow

CONFIG = jaxlora.LoraConfig(r=2, target_modules=["l1", "l2"], init_lora_weights=False)
BASE = {"l1": {"kernel": jnp.ones((16, 32))}, "l2": {"kernel": jnp.ones((32, 4))}}


def _adapter(seed):
    return jaxlora.split(BASE, CONFIG, jax.random.key(seed))[1]


def _child_env():
    """A subprocess's environment: CPU, and this jaxlora (a worktree's, not an installed one)."""
    root = str(pathlib.Path(jaxlora.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)


def _listing(directory):
    return sorted(str(p.relative_to(directory)) for p in pathlib.Path(directory).rglob("*"))


@pytest.fixture(scope="module")
def saved_step():
    """One checkpoint step (with Adam state) written once; tests work on copies of it."""
    directory = tempfile.mkdtemp()
    lora = _adapter(0)
    with checkpoint.checkpoint_manager(directory) as manager:
        checkpoint.save(manager, 1, lora, CONFIG, opt_state=optax.adam(1e-3).init(lora))
    yield directory, lora
    shutil.rmtree(directory, ignore_errors=True)


def _copy(saved_step, target):
    shutil.copytree(saved_step[0], target)
    return target


def _restore(directory, **kwargs):
    with checkpoint.checkpoint_manager(directory) as manager:
        return checkpoint.restore(manager, BASE, **kwargs)


# --- checkpoints: saving --------------------------------------------------------------------


def test_save_of_an_existing_or_older_step_is_an_error_and_writes_nothing(tmp_path):
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        assert checkpoint.save(manager, 5, _adapter(0), CONFIG)
        before = _listing(tmp_path)
        with pytest.raises(ValueError, match=r"step 5 already exists in .*`manager.delete\(5\)`"):
            checkpoint.save(manager, 5, _adapter(1), CONFIG)
        with pytest.raises(ValueError, match="`step`=3 is older than the latest step 5"):
            checkpoint.save(manager, 3, _adapter(1), CONFIG)
        with pytest.raises(TypeError, match="`step` must be an int >= 0"):
            checkpoint.save(manager, -1, _adapter(1), CONFIG)
    assert _listing(tmp_path) == before
    assert_trees_bitwise_equal(_restore(tmp_path).lora, _adapter(0))


@pytest.mark.parametrize("max_to_keep", [0, -1, 1.5, True])
def test_max_to_keep_below_one_is_rejected(tmp_path, max_to_keep):
    with pytest.raises(ValueError, match=r"`max_to_keep` must be an int >= 1"):
        checkpoint.checkpoint_manager(tmp_path, max_to_keep=max_to_keep)


def test_best_metric_needs_the_metric_in_every_save(tmp_path):
    with checkpoint.checkpoint_manager(tmp_path, max_to_keep=1, best_metric="loss") as manager:
        with pytest.raises(ValueError, match=r"`best_metric`='loss', but `save` got no `metrics`"):
            checkpoint.save(manager, 1, _adapter(0), CONFIG)
        with pytest.raises(ValueError, match=r"got `metrics` keys \['acc', 'lr'\]"):
            checkpoint.save(manager, 1, _adapter(0), CONFIG, metrics={"lr": 1.0, "acc": 0.5})
    assert not tmp_path.exists() or _listing(tmp_path) == []


@pytest.mark.parametrize(
    ("mode", "metrics", "kept", "best"),
    [
        ("min", [0.5, math.nan, 0.9, 0.3], [1, 4], 4),
        ("max", [0.5, math.nan, 0.9, 0.3], [1, 3], 3),
        ("min", [math.nan, 0.7], [2], 2),  # a NaN first step never outlives a real one
    ],
)
def test_nan_metric_ranks_worst_and_the_best_step_is_kept(tmp_path, mode, metrics, kept, best):
    with checkpoint.checkpoint_manager(
        tmp_path, max_to_keep=len(kept), best_metric="loss", best_mode=mode
    ) as manager:
        for step, value in enumerate(metrics, start=1):
            checkpoint.save(manager, step, _adapter(0), CONFIG, metrics={"loss": value})
        assert sorted(manager.all_steps()) == kept
        assert manager.best_step() == best


def test_relative_directory_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with checkpoint.checkpoint_manager("ckpt", max_to_keep=3) as manager:
        checkpoint.save(manager, 0, _adapter(0), CONFIG)
        assert checkpoint.restore(manager, BASE).step == 0
    assert (tmp_path / "ckpt" / "0").is_dir()


# --- checkpoints: one writer per directory, closed managers ---------------------------------


def test_a_second_manager_on_one_directory_never_replaces_a_step(tmp_path):
    """Each save reads the steps on disk: a manager opened before another wrote cannot overwrite
    that step or go back before it (its own list of steps is stale)."""
    first = checkpoint.checkpoint_manager(tmp_path)
    stale = checkpoint.checkpoint_manager(tmp_path)
    try:
        checkpoint.save(first, 5, _adapter(0), CONFIG)
        with pytest.raises(ValueError, match=r"step 5 already exists in .*never overwritten"):
            checkpoint.save(stale, 5, _adapter(1), CONFIG)
        with pytest.raises(ValueError, match="`step`=3 is older than the latest step 5"):
            checkpoint.save(stale, 3, _adapter(1), CONFIG)
        assert checkpoint.save(stale, 7, _adapter(1), CONFIG)
        assert checkpoint.restore(first, BASE).step == 7  # restore reads the disk too
    finally:
        first.close()
        stale.close()
    assert_trees_bitwise_equal(_restore(tmp_path, step=5).lora, _adapter(0))
    assert_trees_bitwise_equal(_restore(tmp_path, step=7).lora, _adapter(1))


def test_a_save_while_another_manager_is_saving_is_refused(tmp_path):
    """An async save holds the directory's lock until it is waited for; another manager's save
    meanwhile is a ValueError, and succeeds once the first is finished."""
    busy = checkpoint.checkpoint_manager(tmp_path, async_save=True)
    other = checkpoint.checkpoint_manager(tmp_path)
    try:
        checkpoint.save(busy, 1, _adapter(0), CONFIG)
        with pytest.raises(ValueError, match=r"`save` of step 2 refused: another checkpoint man"):
            checkpoint.save(other, 2, _adapter(1), CONFIG)
        busy.wait_until_finished()
        assert checkpoint.save(other, 2, _adapter(1), CONFIG)  # a sync save releases at once
        assert checkpoint.save(busy, 3, _adapter(0), CONFIG)
    finally:
        busy.close()
        other.close()
    assert sorted(os.listdir(tmp_path)) == [".jaxlora-lock", "1", "2", "3"]


def test_a_closed_manager_is_an_error_to_use_and_writes_nothing(tmp_path):
    manager = checkpoint.checkpoint_manager(tmp_path)
    checkpoint.save(manager, 1, _adapter(0), CONFIG)
    manager.close()
    manager.close()  # twice is harmless
    before = _listing(tmp_path)
    closed = r"the checkpoint manager of `.*` is closed; open a new one"
    with pytest.raises(ValueError, match=f"`save`: {closed}"):
        checkpoint.save(manager, 2, _adapter(1), CONFIG)
    with pytest.raises(ValueError, match=f"`restore`: {closed}"):
        checkpoint.restore(manager, BASE)
    with pytest.raises(ValueError, match=f"`save` of step 2: {closed}"):
        manager.save(2, args=None)
    with pytest.raises(ValueError, match=f"`delete` of step 1: {closed}"):
        manager.delete(1)
    assert _listing(tmp_path) == before
    assert _restore(tmp_path).step == 1


# --- checkpoints: restoring -----------------------------------------------------------------


def test_restore_from_a_missing_directory_names_it_and_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"no checkpoint directory `{missing}`"):
        _restore(missing)
    assert not missing.exists()


def test_restore_with_another_optimizer_names_the_mismatch(saved_step):
    with pytest.raises(
        ValueError,
        match=r"does not match `optimizer`: stored but not in `optimizer.init\(lora\)`: 0/count,"
        r".*but not stored: 0/trace/l1/lora_a.*another optimizer",
    ):
        _restore(saved_step[0], optimizer=optax.sgd(0.1, momentum=0.9))


def test_tampered_config_is_an_error_naming_the_file(saved_step, tmp_path):
    directory = _copy(saved_step, tmp_path / "c")
    path = directory / "1" / "config" / "metadata"
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "lora_alpha": 64}))
    with pytest.raises(ValueError, match=f"the config `{path.parent}` at step 1 is corrupt"):
        _restore(directory)


def test_invalid_config_json_is_an_error_naming_the_file(saved_step, tmp_path):
    directory = _copy(saved_step, tmp_path / "c")
    (directory / "1" / "config" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match=f"`{directory}/1/config`.*JSONDecodeError"):
        _restore(directory)


def test_truncated_array_files_are_an_error_naming_the_path(saved_step, tmp_path):
    directory = _copy(saved_step, tmp_path / "c")
    for path in (directory / "1" / "lora" / "d").iterdir():
        path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(ValueError, match=f"cannot read .* `{directory}/1/lora`.*damaged or trunc"):
        _restore(directory)


# orbax leaves the failed read's coroutines to the garbage collector, which reports them
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_array_data_read_by_tensorstore_is_a_value_error_naming_the_step(tmp_path):
    """Arrays large enough to be read from their data files: tensorstore's failure there is a bare
    ``Exception``, which restore turns into a ValueError naming the files and the step."""
    config = jaxlora.LoraConfig(r=2, target_modules=["big"], init_lora_weights=False)
    base = {"big": {"kernel": jnp.ones((256, 256))}}
    lora = jaxlora.split(base, config, jax.random.key(0))[1]
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        checkpoint.save(manager, 3, lora, config)
    for path in (tmp_path / "3" / "lora" / "ocdbt.process_0" / "d").iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with (
        checkpoint.checkpoint_manager(tmp_path) as manager,
        pytest.raises(ValueError, match=f"cannot read .* at step 3 in `{tmp_path}/3/lora`"),
    ):
        checkpoint.restore(manager, base)
    gc.collect()  # here, not in the next test


def test_array_not_matching_its_stored_sha256_is_an_error_naming_the_leaf(saved_step, tmp_path):
    directory = _copy(saved_step, tmp_path / "c")
    path = directory / "1" / "checksums" / "metadata"
    digests = json.loads(path.read_text())
    digests["lora"]["l2/lora_b"] = "0" * 64
    path.write_text(json.dumps(digests))
    with pytest.raises(ValueError, match=r"the `lora` item .* is corrupt: the sha256 of l2/lora_b"):
        _restore(directory)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(data=st.data())
def test_any_flipped_byte_in_an_array_file_is_caught_or_harmless(saved_step, data):
    with tempfile.TemporaryDirectory() as scratch:
        directory = _copy(saved_step, pathlib.Path(scratch) / "c")
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d")
        path = data.draw(st.sampled_from(files))
        content = bytearray(path.read_bytes())
        content[data.draw(st.integers(0, len(content) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        path.write_bytes(bytes(content))
        try:
            restored = _restore(directory, optimizer=optax.adam(1e-3))
        except ValueError as err:
            assert "corrupt" in str(err) or "cannot read" in str(err)
        else:  # orbax keeps per-process copies it does not read; never a wrong value
            assert_trees_bitwise_equal(restored.lora, saved_step[1])


# --- PEFT files -----------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path):
    directory = tmp_path / "adapter"
    jpeft.save_peft(directory, _adapter(0), CONFIG, BASE)
    return directory


def test_integer_tensor_is_a_type_error_naming_its_key(exported):
    weights = exported / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.l1.lora_A.weight"
    tensors[key] = tensors[key].astype(np.int32)
    save_file(tensors, weights)
    with pytest.raises(TypeError, match=f"the tensor `{key}` in .* is int32"):
        jpeft.load_peft(exported, BASE)


def test_invalid_adapter_config_json_names_the_file(exported):
    (exported / "adapter_config.json").write_text('{"r": 2,')
    with pytest.raises(ValueError, match=f"`{exported}/adapter_config.json` is not valid JSON"):
        jpeft.load_peft(exported, BASE)


def test_truncated_safetensors_names_the_path(exported):
    weights = exported / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(ValueError, match=f"cannot read `{weights}` \\(truncated"):
        jpeft.load_peft(exported, BASE)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(data=st.data())
def test_any_flipped_byte_in_an_exported_adapter_is_caught_or_harmless(data):
    with tempfile.TemporaryDirectory() as scratch:
        directory = pathlib.Path(scratch) / "adapter"
        jpeft.save_peft(directory, _adapter(0), CONFIG, BASE)
        weights = directory / "adapter_model.safetensors"
        content = bytearray(weights.read_bytes())
        content[data.draw(st.integers(0, len(content) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        weights.write_bytes(bytes(content))
        try:
            lora, _ = jpeft.load_peft(directory, BASE)
        except (ValueError, TypeError):
            return
        assert_trees_bitwise_equal(lora, _adapter(0))  # e.g. a flip in JSON whitespace


def test_failed_reexport_leaves_the_old_adapter_and_keeps_other_files(exported, monkeypatch):
    (exported / "README.md").write_text("notes")

    def crash(first, second):
        raise OSError("killed here")

    monkeypatch.setattr(atomic, "exchange", crash)
    with pytest.raises(OSError, match="killed here"):
        jpeft.save_peft(exported, _adapter(1), CONFIG, BASE)
    assert_trees_bitwise_equal(jpeft.load_peft(exported, BASE)[0], _adapter(0))
    monkeypatch.undo()
    jpeft.save_peft(exported, _adapter(1), CONFIG, BASE)
    assert_trees_bitwise_equal(jpeft.load_peft(exported, BASE)[0], _adapter(1))
    assert (exported / "README.md").read_text() == "notes"
    assert sorted(os.listdir(exported.parent)) == ["adapter"]  # no temporary sibling left


# --- Hugging Face checkpoints (save_hf / save_hf_merged / load_hf) ----------------------------


@pytest.fixture
def hf_export(tmp_path):
    from jaxlora.models.hf.export import save_hf

    hf_config, hf_params = _hf_model()
    directory = tmp_path / "model"
    save_hf(directory, hf_config, hf_params(0), max_shard_size="64KB")
    return directory


def test_hf_reexport_replaces_the_old_layout_whole_and_keeps_other_files(hf_export):
    from jaxlora.models import load_hf_llama
    from jaxlora.models.hf.export import save_hf

    hf_config, hf_params = _hf_model()
    (hf_export / "tokenizer.json").write_text("{}")
    save_hf(hf_export, hf_config, hf_params(1))  # one file now: the old shards and index go
    assert sorted(os.listdir(hf_export)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert _bitwise_equal(load_hf_llama(hf_export)[1], hf_params(1))
    save_hf(hf_export, hf_config, hf_params(0), max_shard_size="64KB")
    names = set(os.listdir(hf_export))
    assert "model.safetensors" not in names and "tokenizer.json" in names
    assert _bitwise_equal(load_hf_llama(hf_export)[1], hf_params(0))
    assert sorted(os.listdir(hf_export.parent)) == ["model"]  # no temporary sibling left


def test_failed_hf_reexport_leaves_the_old_checkpoint(hf_export, monkeypatch):
    from jaxlora.models import load_hf_llama
    from jaxlora.models.hf.export import save_hf

    hf_config, hf_params = _hf_model()

    def crash(first, second):
        raise OSError("killed here")

    monkeypatch.setattr(atomic, "exchange", crash)
    with pytest.raises(OSError, match="killed here"):
        save_hf(hf_export, hf_config, hf_params(1), max_shard_size="64KB")
    assert _bitwise_equal(load_hf_llama(hf_export)[1], hf_params(0))
    assert sorted(os.listdir(hf_export.parent)) == ["model"]


def test_save_hf_into_a_file_is_an_error_naming_it(tmp_path):
    from jaxlora.models.hf.export import save_hf

    hf_config, hf_params = _hf_model()
    path = tmp_path / "model"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match=f"`directory` `{path}` is a file, not a directory"):
        save_hf(path, hf_config, hf_params(0))


@pytest.mark.parametrize(
    ("layout", "damage"),
    [
        ("single", "truncated"),
        ("single", "not safetensors"),
        ("sharded", "truncated"),
        ("sharded", "not safetensors"),
    ],
)
def test_load_hf_names_a_truncated_or_foreign_file(tmp_path, layout, damage):
    from jaxlora.models import load_hf
    from jaxlora.models.hf.export import save_hf

    hf_config, hf_params = _hf_model()
    shard = "64KB" if layout == "sharded" else "5GB"
    save_hf(tmp_path, hf_config, hf_params(0), max_shard_size=shard)
    path = sorted(tmp_path.glob("model*.safetensors"))[-1]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"PK\x03\x04 a zip archive, say")
    with pytest.raises(ValueError, match=rf"cannot read `{path}` \(truncated or not a safetens"):
        load_hf(tmp_path)


# --- writers killed with SIGKILL ------------------------------------------------------------

# A small Llama-family model for the Hugging Face writer: both the writer subprocess and the test
# build it from this source, so both sides agree on the two models the writer alternates between.
_HF_MODEL = textwrap.dedent(
    """
    import numpy as np
    from flax import traverse_util
    from jaxlora.models.hf.llama import expected_tensors
    from jaxlora.models.llama import LlamaConfig

    HF_CONFIG = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=32, rope_interleaved=False)

    def hf_params(seed):
        rng = np.random.default_rng(seed)
        specs = expected_tensors(HF_CONFIG).values()
        flat = {s.path: rng.standard_normal(s.target_shape, dtype=np.float32) for s in specs}
        return traverse_util.unflatten_dict(flat)
    """
)

# A fork server for the writers: it imports jax, jaxlora, orbax and the HF writer once (no JAX
# backend, no thread yet, so forking is safe), then forks one writer per line "WRITER DIRECTORY" on
# its stdin. The writer prints its pid, then each step it completes, until it is killed; the server
# then prints "exit" and the writer's return code. Each kill still ends a whole writer process
# mid-write; only the interpreter start and imports (seconds per writer) are shared.
_FORKING_WRITER = textwrap.dedent(
    """
    import os
    import sys
    import traceback

    import jax, jaxlora
    from jaxlora import checkpoint, peft
    from jaxlora.models import save_hf_merged

    def write_forever(writer, directory, hf_model):
        config = jaxlora.LoraConfig(r=2, target_modules=["l1", "l2"], init_lora_weights=False)
        base = {"l1": {"kernel": jax.numpy.ones((16, 32))},
                "l2": {"kernel": jax.numpy.ones((32, 4))}}
        if writer == "hf":
            # save_hf_merged over an earlier export of another model in the same shard files
            # (where a kill mixed the two before); the adapter is fresh (B = 0): the merged model
            # is the base.
            namespace = {}
            exec(hf_model, namespace)
            hf_lora = jaxlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
            models = [jaxlora.split(namespace["hf_params"](seed), hf_lora, jax.random.key(0))
                      for seed in (0, 1)]
        else:
            adapters = [jaxlora.split(base, config, jax.random.key(seed))[1] for seed in range(2)]
            manager = checkpoint.checkpoint_manager(
                directory, max_to_keep=2, async_save=writer == "checkpoint-async"
            )
        for step in range(100000):
            if writer == "peft":
                peft.save_peft(directory, adapters[step % 2], config, base)
            elif writer == "hf":
                frozen, lora = models[step % 2]
                save_hf_merged(directory, namespace["HF_CONFIG"], frozen, lora, hf_lora,
                               max_shard_size="64KB")
            else:
                checkpoint.save(manager, step, adapters[step % 2], config)
            print(step, flush=True)

    for line in sys.stdin:
        writer, directory = line.rstrip("\\n").split(" ", 1)
        pid = os.fork()
        if pid == 0:
            try:
                print(os.getpid(), flush=True)
                write_forever(writer, directory, sys.argv[1])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        print("exit", os.waitstatus_to_exitcode(status), flush=True)
    """
)


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    script = tmp_path_factory.mktemp("writer") / "writer.py"
    script.write_text(_FORKING_WRITER)
    server = subprocess.Popen(
        [sys.executable, str(script), _HF_MODEL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_child_env(),
        text=True,
    )
    yield server
    server.stdin.close()
    server.wait(timeout=60)
    server.stdout.close()


@pytest.mark.slow  # forks and kills writer processes
@pytest.mark.parametrize(
    ("writer", "delays"),
    [
        pytest.param("checkpoint", (0.05, 0.37), id="checkpoint"),
        pytest.param("peft", (0.05, 0.37), id="peft"),
        pytest.param("hf", (0.2,), id="hf"),  # one kill each: a writer is seconds
        pytest.param("checkpoint-async", (0.2,), id="checkpoint-async"),
    ],
)
def test_writer_killed_mid_write_leaves_the_last_good_copy(tmp_path, fork_server, writer, delays):
    directory = tmp_path / "out"
    # an async save is committed once the next one has started
    complete = 2 if writer == "checkpoint-async" else 1
    for delay in delays:  # the kill lands at a different point of a write each time
        assert _kill_a_writer(fork_server, writer, directory, complete, delay) == -signal.SIGKILL
        if writer == "peft":
            lora, _ = jpeft.load_peft(directory, BASE)
            assert any(_bitwise_equal(lora, _adapter(seed)) for seed in (0, 1))
        elif writer == "hf":
            _assert_one_whole_hf_model(directory)
        else:
            restored = _restore(directory)
            assert _bitwise_equal(restored.lora, _adapter(restored.step % 2))
            shutil.rmtree(directory)  # the next round starts again at step 0


def _kill_a_writer(server, writer, directory, complete, delay):
    """Forks a writer, kills it with SIGKILL ``delay`` s after ``complete`` whole writes, and
    returns its return code."""
    server.stdin.write(f"{writer} {directory}\n")
    server.stdin.flush()
    pid = int(server.stdout.readline())
    try:
        for _ in range(complete):  # one complete write exists
            assert server.stdout.readline().strip().isdigit()
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    line = server.stdout.readline()
    while line.strip().isdigit():  # the writes it completed before the kill landed
        line = server.stdout.readline()
    assert line.startswith("exit "), f"the fork server said {line!r}"
    return int(line.split()[1])


def _hf_model():
    namespace = {}
    exec(_HF_MODEL, namespace)  # the same source the writer process runs
    return namespace["HF_CONFIG"], namespace["hf_params"]


def _assert_one_whole_hf_model(directory):
    """The directory loads as one of the two models the writer alternates between, all of it."""
    from jaxlora.models import load_hf_llama

    hf_config, hf_params = _hf_model()
    config, params = load_hf_llama(directory)
    assert config == hf_config
    assert any(_bitwise_equal(params, hf_params(seed)) for seed in (0, 1))


def _bitwise_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


_EXITING_ASYNC_WRITER = textwrap.dedent(
    """
    import sys
    import jax, jaxlora
    from jaxlora import checkpoint

    config = jaxlora.LoraConfig(r=2, target_modules=["l1", "l2"], init_lora_weights=False)
    base = {"l1": {"kernel": jax.numpy.ones((16, 32))}, "l2": {"kernel": jax.numpy.ones((32, 4))}}
    lora = jaxlora.split(base, config, jax.random.key(0))[1]
    closed = checkpoint.checkpoint_manager(sys.argv[2], async_save=True)
    checkpoint.save(closed, 1, lora, config)
    closed.close()
    try:
        checkpoint.save(closed, 2, lora, config)  # after close: an error, nothing started
    except ValueError as err:
        print(err, flush=True)
    manager = checkpoint.checkpoint_manager(sys.argv[1], async_save=True)
    checkpoint.save(manager, 1, lora, config)
    # exits without manager.close() or wait_until_finished()
    """
)


@pytest.fixture(scope="module")
def exited_writer(tmp_path_factory):
    """One subprocess for both exit checks: an async save after ``close()``, then an async save
    still in flight when the interpreter exits. A hang at exit fails the timeout."""
    tmp = tmp_path_factory.mktemp("exiting")
    script = tmp / "writer.py"
    script.write_text(_EXITING_ASYNC_WRITER)
    unclosed, closed = tmp / "ckpt", tmp / "closed"
    done = subprocess.run(
        [sys.executable, str(script), str(unclosed), str(closed)],
        capture_output=True,
        env=_child_env(),
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, unclosed, closed


@pytest.mark.slow  # a subprocess
def test_async_save_never_closed_is_finished_before_exit(exited_writer):
    """The writer exits with a save in flight: the save is finished, not lost, the exit does not
    hang (orbax's own threads would wait forever), and stderr says to close the manager."""
    done, directory, _ = exited_writer
    assert (directory / "1").is_dir(), done.stderr[-3000:]
    assert_trees_bitwise_equal(_restore(directory).lora, _adapter(0))
    assert f"waited for the asynchronous save of step 1 in `{directory}`" in done.stderr
    assert "is LOST" not in done.stderr


@pytest.mark.slow  # a subprocess
def test_save_after_close_on_an_async_manager_is_an_error_and_leaves_nothing(exited_writer):
    """The closed manager's save is a ValueError saying so; no temporary directory is left and
    the interpreter still exits (before, orbax's executor raised and the exit hung)."""
    done, _, directory = exited_writer
    assert f"`save`: the checkpoint manager of `{directory}` is closed" in done.stdout
    assert sorted(os.listdir(directory)) == [".jaxlora-lock", "1"]
    assert "step 2" not in done.stderr


def test_async_save_that_fails_at_exit_is_reported(tmp_path, capsys):
    """If the save in flight at exit cannot finish, the exit hook says so instead of raising."""
    import weakref

    from jaxlora._src.files import orbax_manager

    class BrokenManager:
        pending_step, directory = 3, tmp_path

        def wait_until_finished(self):
            raise OSError("No space left on device")

    manager = BrokenManager()
    orbax_manager.finish_pending_save(weakref.ref(manager))()
    err = capsys.readouterr().err
    assert "the asynchronous save of step 3 failed while the interpreter was exiting" in err
    assert "No space left on device" in err
