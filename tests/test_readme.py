"""The README's quickstart runs as written and does what it says."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def block(marker):
    text = README.read_text()
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"README has no {marker} block"
    return match.group(1)


@pytest.mark.slow  # executes the README quickstart
@pytest.mark.standard_dtypes
def test_quickstart_runs_and_trains(capsys):
    code = block("quickstart")
    assert len(code.splitlines()) <= 40
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "trainable params: 548 || all params: 1,189" in out
    first, final = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+) after", out).groups())
    assert final < 0.5 * first
    assert namespace["deployed"]["up"]["kernel"].shape == (8, 64)


@pytest.mark.slow  # transformers writes a tiny checkpoint; jaxlora loads, adapts, exports it
def test_hf_models_block_runs(tmp_path):
    code = block("hf-models").replace("/tmp/", f"{tmp_path}/")
    exec(compile(code, str(README), "exec"), {})
    assert (tmp_path / "tiny-qwen2-merged" / "config.json").exists()
    assert (tmp_path / "tiny-qwen2-adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow  # compiles an Equinox training step
@pytest.mark.standard_dtypes  # optax's Adam
def test_equinox_blocks_run_and_train():
    pytest.importorskip("equinox")
    namespace = {}
    exec(compile(block("equinox"), str(README), "exec"), namespace)
    fresh = namespace["lora"]
    exec(compile(block("equinox-loop"), str(README), "exec"), namespace)
    first = namespace["forward"](namespace["frozen"], fresh, namespace["x"])
    first_loss = float(((first - namespace["y"]) ** 2).mean())
    assert float(namespace["loss"]) < 0.5 * first_loss
    assert type(namespace["tuned"]) is type(namespace["model"])


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "test-command" in ci
    assert "python -m pytest" in block("test-command")


def _resolve(dotted):
    """The object a dotted ``jaxlora.…`` name stands for, importing submodules on the way."""
    import importlib

    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(obj, part):
            importlib.import_module(".".join(parts[: i + 1]))
        obj = getattr(obj, part)
    return obj


def test_every_jaxlora_name_in_the_readme_exists():
    names = sorted(set(re.findall(r"\bjaxlora(?:\.[A-Za-z]\w*)+", README.read_text())))
    assert len(names) > 20
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"README names that do not exist: {missing}"
