"""The package keeps the promise of its ``py.typed``: pyright finds no error in ``jaxlora/``
(settings in pyproject.toml's ``[tool.pyright]``; pyright comes with the ``dev`` extra)."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pyright_is_clean():
    if importlib.util.find_spec("pyright") is None:
        pytest.fail("pyright is not installed: `pip install -e '.[dev]'` brings it")
    # This interpreter's environment resolves the imports (jax, flax, ...), whatever is on PATH.
    result = subprocess.run(
        [sys.executable, "-m", "pyright", "--pythonpath", sys.executable],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
