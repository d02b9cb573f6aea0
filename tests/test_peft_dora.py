"""DoRA in PEFT's adapter format: jaxlora DoRA exports load in real PEFT (``use_dora=True``) with
PEFT's logits, PEFT-made DoRA adapters load here with PEFT's logits, bad files are errors.

The tiny model's stacked Dense (``sio``), N-D DenseGeneral (``ioo``) and conv (``wwio``) cover
every magnitude layout PEFT has; its embedding is left out, as jaxlora's DoRA does not adapt one.
"""

import copy
import json

import jax
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file

import jaxlora
from jaxlora import peft as jpeft
from jaxlora import variants
from jaxlora._src import paths
from tests import peft_models as pm
from tests.treeutil import assert_trees_bitwise_equal, perturbed

pytestmark = pytest.mark.slow  # PyTorch and PEFT

MAGNITUDE = "base_model.model.proj.lora_magnitude_vector"
DORA_TARGETS = ["blocks/fc", "proj", "conv"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = pm.TorchNet().eval()
    return model, pm.flax_params(model), pm.inputs()


def _without_magnitudes(lora):
    """Θ with the same factors and copies but no DoRA magnitudes: a plain LoRA adapter."""
    return {
        key: _without_magnitudes(value) if isinstance(value, dict) else value
        for key, value in lora.items()
        if key != variants.LORA_MAGNITUDE
    }


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dora_export_loads_in_peft_with_equal_logits(tmp_path, tiny, use_rslora):
    model, params, (ids, image) = tiny
    config = pm.lora_config(DORA_TARGETS, use_rslora=use_rslora)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    lora = perturbed(lora, 2)  # factors, magnitudes, biases and the saved norm all move
    jpeft.save_peft(tmp_path, lora, config, params, module_name=pm.module_name)
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["use_dora"] is True
    ours = pm.flax_logits(jaxlora.merge(frozen, lora, config), ids, image)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert peft_model.peft_config["default"].use_dora
    theirs = pm.torch_logits(peft_model, ids, image)
    plain = pm.flax_logits(jaxlora.merge(frozen, _without_magnitudes(lora), config), ids, image)
    diff = np.abs(ours - theirs).max()
    print(f"DoRA export, rslora={use_rslora}: max |logit diff| {diff:.3g}")
    assert np.abs(ours - pm.torch_logits(model, ids, image)).max() > 1e-2  # the adapter matters
    assert np.abs(ours - plain).max() > 1e-2  # and so do its magnitudes
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_dora_file_layout(tmp_path, tiny):
    _, params, _ = tiny
    config = pm.lora_config(DORA_TARGETS)
    _, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    jpeft.save_peft(tmp_path, lora, config, params, module_name=pm.module_name)
    shapes = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    p = "base_model.model."
    assert shapes[p + "blocks.1.fc.lora_magnitude_vector"] == (pm.DIM,)
    assert shapes[MAGNITUDE] == (6,)
    assert shapes[p + "conv.lora_magnitude_vector"] == (1, pm.CHANNELS, 1, 1)


def _peft_dora(tmp_path, model, init_lora_weights=False, perturb=True):
    return pm.peft_made(
        tmp_path, model, perturb=perturb, target_modules=["fc", "proj", "conv"],
        init_lora_weights=init_lora_weights, use_dora=True,
    )  # fmt: skip


def test_peft_made_dora_adapter_loads_with_equal_logits(tmp_path, tiny):
    _, params, (ids, image) = tiny
    peft_model = _peft_dora(tmp_path, copy.deepcopy(tiny[0]))
    lora, config = pm.load(tmp_path, params)
    assert lora["proj"]["lora_magnitude"].shape == (2, 3)
    assert lora["blocks"]["fc"]["lora_magnitude"].shape == (pm.LAYERS, pm.DIM)
    assert lora["conv"]["lora_magnitude"].shape == (pm.CHANNELS,)
    ours = pm.flax_logits(jaxlora.merge(params, lora, config), ids, image)
    theirs = pm.torch_logits(peft_model, ids, image)
    diff = np.abs(ours - theirs).max()
    print(f"DoRA import: max |logit diff| {diff:.3g}")
    assert np.abs(ours - pm.torch_logits(tiny[0], ids, image)).max() > 1e-2
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_peft_initial_magnitude_is_jaxlora_column_norm(tmp_path, tiny):
    """PEFT's norm of (out, in) weights over ``in`` per row is jaxlora's per-column norm."""
    _, params, _ = tiny
    _peft_dora(tmp_path, copy.deepcopy(tiny[0]), init_lora_weights=True, perturb=False)
    lora, config = pm.load(tmp_path, params)
    _, ours = jaxlora.split(params, config, jax.random.key(0), variant="dora")
    for module in (("blocks", "fc"), ("proj",), ("conv",)):
        theirs = paths.get_in(lora, module + ("lora_magnitude",))
        mine = paths.get_in(ours, module + ("lora_magnitude",))
        np.testing.assert_allclose(theirs, mine, rtol=1e-6, atol=0, err_msg=str(module))


def test_dora_round_trip_is_exact(tmp_path, tiny):
    _, params, _ = tiny
    config = pm.lora_config(DORA_TARGETS)
    _, lora = jaxlora.split(params, config, jax.random.key(5), variant="dora")
    lora = perturbed(lora, 6)
    abstract = jax.eval_shape(lambda: params)
    jpeft.save_peft(tmp_path, lora, config, abstract, module_name=pm.module_name)
    back, _ = pm.load(tmp_path, abstract)
    assert_trees_bitwise_equal(back, lora)


# --- errors -------------------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path, tiny):
    _, params, _ = tiny
    config = pm.lora_config(DORA_TARGETS)
    _, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    jpeft.save_peft(tmp_path, lora, config, params, module_name=pm.module_name)
    return tmp_path, params


def test_missing_magnitude_is_an_error(exported):
    directory, params = exported
    pm.rewrite(directory, lambda t: t.pop(MAGNITUDE))
    with pytest.raises(ValueError, match=rf"does not fit `frozen`: missing keys {MAGNITUDE}"):
        pm.load(directory, params)


def test_misshaped_magnitude_is_an_error(exported):
    directory, params = exported
    pm.rewrite(directory, lambda t: t.update({MAGNITUDE: np.ones((1, 6), np.float32)}))
    with pytest.raises(
        ValueError, match=rf"mis-shaped keys `{MAGNITUDE}` \(1, 6\) \(expected \(6,\)\)"
    ):
        pm.load(directory, params)


def test_magnitudes_without_use_dora_are_unexpected(exported):
    directory, params = exported
    pm.rewrite(directory, edit_config=lambda d: d.update(use_dora=False))
    with pytest.raises(
        ValueError, match=r"unexpected keys base_model\.model\.blocks\.0\.fc\.lora_mag"
    ):
        pm.load(directory, params)


def test_dora_export_errors(tmp_path, tiny):
    _, params, _ = tiny
    config = pm.lora_config(DORA_TARGETS)
    _, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    del lora["proj"]["lora_magnitude"]
    with pytest.raises(
        ValueError, match=r"`lora` does not fit `frozen`: `proj/lora_magnitude` miss"
    ):
        jpeft.save_peft(tmp_path, lora, config, params, module_name=pm.module_name)


def test_dora_on_an_embedding_is_an_error(tmp_path, tiny):
    _, params, _ = tiny
    config = pm.lora_config(DORA_TARGETS, target_modules=["embed", "proj"], alpha_pattern={})
    _, lora = jaxlora.split(params, config, jax.random.key(1))
    jpeft.save_peft(tmp_path, lora, config, params, module_name=pm.module_name)
    pm.rewrite(tmp_path, edit_config=lambda d: d.update(use_dora=True))
    with pytest.raises(
        ValueError, match="DoRA adapts dense and conv kernels; `embed` is an embedding"
    ):
        pm.load(tmp_path, params)
