"""Wrong inputs to the multi-adapter, quantisation, sharding and file APIs: each is refused with
an error naming the argument (see experiments/validation/bad_inputs.py for the full battery)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxlora
from jaxlora import adapters, checkpoint, quant

# The full suite only (writes checkpoints and PEFT directories).
pytestmark = pytest.mark.slow

FROZEN = {"up": {"kernel": jnp.ones((4, 6))}, "down": {"kernel": jnp.ones((6, 4))}}
CONFIG = jaxlora.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False)


def _lora():
    return jaxlora.split(FROZEN, CONFIG, jax.random.key(0))[1]


@pytest.mark.parametrize(
    ("weight", "error"), [(float("nan"), ValueError), ("1", TypeError), (None, TypeError)]
)
def test_add_weighted_refuses_bad_weights(weight, error):
    with pytest.raises(error, match="weight"):
        adapters.add_weighted(FROZEN, [(_lora(), CONFIG, weight)])


@pytest.mark.parametrize(("rank", "method"), [(0, "svd"), (1.5, "svd"), ("2", "svd"), (3, "cat")])
def test_add_weighted_rank_is_named(rank, method):
    with pytest.raises((TypeError, ValueError), match="`rank`"):
        adapters.add_weighted(FROZEN, [(_lora(), CONFIG, 1.0)], method=method, rank=rank)


def test_add_weighted_refuses_transposed_factor():
    lora = _lora()
    lora["up"]["lora_a"] = lora["up"]["lora_a"].T
    with pytest.raises(ValueError, match="up"):
        adapters.add_weighted(FROZEN, [(lora, CONFIG, 1.0)])


def test_bank_weights_must_be_a_nonempty_dict():
    bank = jaxlora.AdapterBank(FROZEN)
    bank.add("fr", _lora(), CONFIG)
    with pytest.raises(TypeError, match="`weights`"):
        bank.add_weighted(["fr"])
    with pytest.raises(ValueError, match="`weights`"):
        bank.add_weighted({})


def test_stack_and_pad_rank_name_their_arguments():
    with pytest.raises(TypeError, match="`adapters`"):
        adapters.stack(_lora())
    with pytest.raises(ValueError, match="differs from `adapters\\[0\\]`"):
        adapters.stack([_lora(), {"up": _lora()["up"]}])
    for rank in (0, "4", 2.5, None):
        with pytest.raises((TypeError, ValueError), match="`rank`"):
            adapters.pad_rank(FROZEN, _lora(), CONFIG, rank)
    with pytest.raises(TypeError, match="`config`"):
        adapters.pad_rank(FROZEN, _lora(), None, 4)


def test_scale_b_checks_multiplier():
    with pytest.raises(TypeError, match="`multiplier`"):
        adapters.scale_b(_lora(), None)
    with pytest.raises(ValueError, match="ghost"):
        adapters.scale_b(_lora(), {"ghost": {"lora_b": 2.0}})
    with pytest.raises(TypeError, match="`multiplier` leaf `up/lora_b`"):
        adapters.scale_b(_lora(), {"up": {"lora_b": "x"}})


def test_quantize_options():
    params = {"up": {"kernel": jnp.ones((64, 64))}}
    with pytest.raises(ValueError, match="`block_size`"):
        quant.quantize(params, ["up"], "q4_1", block_size=128)
    with pytest.raises(TypeError, match="`double_quant`"):
        quant.quantize(params, ["up"], "nf4", double_quant="yes")
    with pytest.raises(ValueError, match="up/kernel.*NaN"):
        quant.quantize({"up": {"kernel": jnp.full((64, 64), jnp.nan)}}, ["up"], "nf4")
    with pytest.raises(TypeError, match="up/kernel"):
        quant.quantize({"up": {"kernel": [[1.0] * 64] * 64}}, ["up"], "nf4")
    assert quant.quantize(params, ["up"], "q4_1")["up"]["kernel"].block_size == 32


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"mesh": "mesh"}, "`mesh`"), ({"rank_axis": 5}, "`rank_axis`")]
)
def test_lora_shardings_option_types(kwargs, name):
    with pytest.raises(TypeError, match=name):
        jaxlora.lora_shardings(FROZEN, CONFIG, **kwargs)


def test_checkpoint_arguments(tmp_path):
    with pytest.raises(TypeError, match="`directory`"):
        checkpoint.checkpoint_manager(None)
    with pytest.raises(TypeError, match="`best_metric`"):
        checkpoint.checkpoint_manager(tmp_path, best_metric=5)
    with pytest.raises(TypeError, match="`async_save`"):
        checkpoint.checkpoint_manager(tmp_path, async_save="yes")
    with pytest.raises(TypeError, match="`manager`"):
        checkpoint.save(str(tmp_path), 1, _lora(), CONFIG)
    other = jaxlora.LoraConfig(r=4, target_modules=["up", "down"])
    with checkpoint.checkpoint_manager(tmp_path, best_metric="loss") as manager:
        with pytest.raises(TypeError, match="`metrics\\['loss'\\]`"):
            checkpoint.save(manager, 1, _lora(), CONFIG, metrics={"loss": "low"})
        with pytest.raises(ValueError, match="rank 2 but `config` gives rank 4"):
            checkpoint.save(manager, 1, _lora(), other, metrics={"loss": 1.0})
        with pytest.raises(TypeError, match="`optimizer`"):
            checkpoint.restore(manager, FROZEN, optimizer="adam")


def test_peft_arguments(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ValueError, match="`directory`"):
        jaxlora.save_peft(file, _lora(), CONFIG, FROZEN)
    with pytest.raises(TypeError, match="`directory`"):
        jaxlora.load_peft(None, FROZEN)
    with pytest.raises(TypeError, match="`base_model_name_or_path`"):
        jaxlora.save_peft(tmp_path / "a", _lora(), CONFIG, FROZEN, base_model_name_or_path=5)
    with pytest.raises(TypeError, match="`module_name`"):
        jaxlora.save_peft(tmp_path / "a", _lora(), CONFIG, FROZEN, module_name=lambda p: p)
    with pytest.raises(TypeError, match="`lora` leaf `up/lora_a`"):
        bad = _lora()
        bad["up"]["lora_a"] = "x"
        jaxlora.save_peft(tmp_path / "a", bad, CONFIG, FROZEN)
    with pytest.raises(TypeError, match="`layouts`"):
        jaxlora.load_peft(tmp_path / "a", FROZEN, layouts=5)
