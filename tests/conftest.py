"""Strict numerics for every test, one compilation cache per run, and a fast core.

optax's Adam mixes Python floats with int32 step counts, which strict dtype promotion rejects; a
test that steps such an optimizer says so with ``@pytest.mark.standard_dtypes``.

Tests marked ``slow`` (registered in pyproject.toml) need notebooks, PyTorch, subprocesses,
pretrained weights or many compiled models; ``python -m pytest -m "not slow"`` runs the fast core.
Under exactly that selection a module marked slow as a whole (``pytestmark = pytest.mark.slow``) is
not even imported, nor is a module searched only for doctests (they are all slow, see
:func:`pytest_collection_modifyitems`), so the core does not pay for importing torch or the weight
readers.

Compiled programs are shared across the run: every process of it (the pytest-xdist workers and
the subprocesses that tests start) uses one JAX persistent compilation cache, so a program that
several tests, workers or scripts compile is compiled once. The cache lives in a temporary folder
made for the run and removed after it, so every run starts cold, as CI does; set
``JAXLORA_TEST_COMPILATION_CACHE`` to a folder of your own to keep it between runs.

Programs are compiled for tests, not for speed: ``jax_disable_most_optimizations`` (LLVM at -O0;
XLA's HLO passes, so fusion and buffer assignment, are unchanged) compiles about three times
faster on the tiny shapes tests use, and :data:`TEST_XLA_FLAGS` (XLA:CPU's older, simpler code
emitters for fused loops, and one LLVM module per program instead of many) cuts the CPU time of
a compile by as much again; the flags are used only if this jaxlib knows them. Set
``JAXLORA_TEST_OPTIMIZE=1`` to compile as users do.

Property tests whose every example compiles new programs take their example count from the
hypothesis profile: ``suite`` (the default, :data:`SUITE_EXAMPLES` each) or ``thorough``
(:data:`THOROUGH_EXAMPLES`), chosen with ``HYPOTHESIS_PROFILE=thorough``. Cheap property tests set
their own, larger counts.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import hypothesis
import jax
import pytest

SUITE_EXAMPLES = 8
THOROUGH_EXAMPLES = 60
hypothesis.settings.register_profile("suite", max_examples=SUITE_EXAMPLES, deadline=None)
hypothesis.settings.register_profile("thorough", max_examples=THOROUGH_EXAMPLES, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

FAST_CORE = "not slow"
#: The longest test modules, longest first (their seconds in a full run on the 2-core machine, from
#: ``--durations``/junit: 125-40 s each). pytest-xdist (``--dist loadscope
#: --no-loadscope-reorder``) hands whole modules to the workers in collection order, which puts
#: these first, so that no long module starts last while the other worker has nothing left to do.
SCHEDULE_FIRST = (
    "tests/test_remat.py", "tests/test_bench_smoke.py", "tests/test_notebooks.py",
    "tests/test_parallel.py", "tests/test_dora.py", "tests/test_forward_linen.py",
    "tests/test_unseen_models.py", "tests/test_multihost.py", "tests/test_quant.py",
    "tests/test_models_llama.py", "tests/test_file_safety.py", "tests/test_factored.py",
    "tests/test_layouts_any_order.py", "tests/test_fused.py", "tests/test_kv_cache.py",
)  # fmt: skip
SLOW_MODULE = re.compile(r"^pytestmark = pytest\.mark\.slow\b", re.MULTILINE)
CACHE_VARIABLE = "JAXLORA_TEST_COMPILATION_CACHE"
#: XLA:CPU options for test-sized compiles. Measured on a two-block GPT LoRA training step
#: (process CPU seconds of ``compile()``): 1.7-1.9 with -O0 alone, 0.5 with these as well.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
#: Programs that start XLA's CPU client, which reads ``XLA_FLAGS``: jaxlib's own (0.3 s, no JAX
#: import), then, should that internal name ever change, JAX's (2-3 s).
PROBES = (
    "from jaxlib import _jax; _jax.get_tfrt_cpu_client()",
    "import jax; jax.numpy.zeros(1).block_until_ready()",
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "standard_dtypes: run with standard (not strict) jax dtype promotion"
    )
    _share_compilation_cache(config)
    _compile_for_tests()


def _compile_for_tests():
    """Compiles with little optimisation in this process and every process it starts."""
    if os.environ.get("JAXLORA_TEST_OPTIMIZE") == "1":
        return
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)
    flags = os.environ.get("XLA_FLAGS", "")
    if TEST_XLA_FLAGS not in flags and _xla_knows(f"{flags} {TEST_XLA_FLAGS}"):
        os.environ["XLA_FLAGS"] = f"{flags} {TEST_XLA_FLAGS}".strip()


def _xla_knows(flags: str) -> bool:
    """Whether this jaxlib starts with ``flags`` (XLA aborts on a flag it does not know, and
    option names change between releases). Asked once, by the controller: workers and the
    processes tests start inherit the answer through ``XLA_FLAGS``."""
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    for probe in PROBES:
        started = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)
        if started.returncode == 0:
            return True
    return False


def _share_compilation_cache(config):
    """Points this process, and every process it starts, at the run's compilation cache.

    The controller (or a run without workers) makes the folder; xdist workers inherit it through
    the environment, as do subprocesses.
    """
    folder = os.environ.get(CACHE_VARIABLE)
    if folder is None:
        folder = tempfile.mkdtemp(prefix="jaxlora-test-jit-cache-")
        os.environ[CACHE_VARIABLE] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    # What JAX reads at import, so that the processes tests start use the cache too.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """An xdist worker that has sent its results ends without the interpreter's teardown.

    A worker holds thousands of compiled programs by the end of a run, and JAX's exit handler
    destroys them one by one (about 4 s per 1500); the run waits for that. By the last
    ``pytest_unconfigure`` the worker has reported every result (and pytest-cov has saved its
    data), so nothing is lost. The controller, and runs without workers, exit normally.
    """
    if hasattr(config, "workerinput"):  # set by xdist in its workers only (not inherited)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def pytest_collection_modifyitems(config, items):
    # The docstrings' examples compile as a user's first call does (the reference models' build
    # whole models): full suite only; the fast core checks the same behaviour in tests/.
    for item in items:
        if isinstance(item, pytest.DoctestItem):
            item.add_marker(pytest.mark.slow)
    # Longest modules first (a stable sort keeps each module's own order).
    rank = {name: k for k, name in enumerate(SCHEDULE_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_ignore_collect(collection_path, config):
    if config.getoption("markexpr", "").strip() != FAST_CORE or collection_path.suffix != ".py":
        return None
    if not collection_path.name.startswith("test_"):
        return True  # a module searched only for its doctests, which are all slow
    return True if SLOW_MODULE.search(collection_path.read_text()) else None


@pytest.fixture(autouse=True)
def _strict_numerics(request):
    mode = "standard" if request.node.get_closest_marker("standard_dtypes") else "strict"
    with jax.numpy_dtype_promotion(mode), jax.numpy_rank_promotion("raise"):
        yield
