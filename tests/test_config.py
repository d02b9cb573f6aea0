import math

import jax
import pytest

from jaxlora import LoraConfig


def test_defaults_follow_peft():
    config = LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 8, 0.0, "none")
    assert config.init_lora_weights is True and config.use_rslora is False
    assert config.dtype == "float32"


def test_lists_become_tuples_and_config_is_hashable():
    config = LoraConfig(target_modules=["q", "v"], rank_pattern={"q": 4})
    assert config.target_modules == ("q", "v")
    assert hash(config) == hash(LoraConfig(target_modules=("q", "v"), rank_pattern={"q": 4}))
    assert {config: 1}[LoraConfig(target_modules=["q", "v"], rank_pattern={"q": 4})] == 1


def test_config_passes_through_jit_as_static():
    config = LoraConfig(r=4, lora_alpha=8)

    @jax.jit
    def scale(x, config):
        return x * config.scale_for("any")

    assert float(scale(1.0, config)) == 2.0


@pytest.mark.parametrize(("rslora", "expected"), [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scale(rslora, expected):
    config = LoraConfig(r=4, lora_alpha=16, use_rslora=rslora)
    assert config.scale_for("x/q") == pytest.approx(expected)


def test_patterns_override_rank_and_alpha():
    config = LoraConfig(
        r=8, lora_alpha=16, rank_pattern={"layer_0/q": 2, "layer_.*/v": 4}, alpha_pattern={"v": 1}
    )
    assert config.rank_for("enc/layer_0/q") == 2
    assert config.rank_for("enc/layer_1/q") == 8
    assert config.rank_for("enc/layer_3/v") == 4
    assert config.alpha_for("enc/layer_3/v") == 1
    assert config.scale_for("enc/layer_3/v") == pytest.approx(1 / 4)
    assert config.scale_for("enc/layer_0/q") == pytest.approx(16 / 2)


def test_json_round_trip():
    config = LoraConfig(
        r=4,
        lora_alpha=32,
        lora_dropout=0.1,
        bias="lora_only",
        target_modules="enc/.*/(q|v)",
        exclude_modules=["head"],
        modules_to_save=["classifier"],
        rank_pattern={"q": 2},
        alpha_pattern={"v": 8.0},
        use_rslora=True,
        init_lora_weights="gaussian",
        task_type="SEQ_CLS",
        dtype="bfloat16",
        layouts={"attn/query": "ioo"},
    )
    assert LoraConfig.from_json(config.to_json()) == config
    assert LoraConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 0}, ValueError, "`r` must be a positive int"),
        ({"r": 2.0}, ValueError, "`r` must be a positive int"),
        ({"r": True}, ValueError, "`r` must be a positive int"),
        ({"lora_alpha": "8"}, ValueError, "`lora_alpha` must be a finite number"),
        ({"lora_alpha": float("nan")}, ValueError, "`lora_alpha` must be a finite number"),
        ({"lora_dropout": 1.0}, ValueError, r"`lora_dropout` must be in \[0, 1\)"),
        ({"lora_dropout": -0.1}, ValueError, r"`lora_dropout` must be in \[0, 1\)"),
        ({"lora_dropout": "0.1"}, TypeError, "`lora_dropout` must be a float"),
        ({"bias": "some"}, ValueError, "`bias` must be one of"),
        ({"target_modules": ["q", 3]}, TypeError, "`target_modules` must be a string"),
        ({"target_modules": []}, ValueError, "`target_modules` is an empty list"),
        ({"target_modules": "(q"}, ValueError, "not a valid regular expression"),
        ({"exclude_modules": [""]}, TypeError, "`exclude_modules` must be a string"),
        ({"modules_to_save": 5}, TypeError, "`modules_to_save` must be a string"),
        ({"rank_pattern": {"q": 0}}, ValueError, r"`rank_pattern\['q'\]` must be a positive int"),
        ({"rank_pattern": [("q", 2)]}, TypeError, "`rank_pattern` must be a dict"),
        ({"rank_pattern": {"(": 2}}, ValueError, "`rank_pattern` key '\\(' is not a valid regex"),
        ({"rank_pattern": {"": 2}}, TypeError, "`rank_pattern` keys must be non-empty strings"),
        ({"alpha_pattern": {"q": None}}, ValueError, r"`alpha_pattern\['q'\]` must be a finite"),
        ({"use_rslora": 1}, TypeError, "`use_rslora` must be a bool"),
        ({"init_lora_weights": "pissa"}, ValueError, "`init_lora_weights` must be True, False"),
        ({"task_type": 3}, TypeError, "`task_type` must be a string"),
        ({"dtype": "int8"}, ValueError, "`dtype` must name a floating dtype"),
        ({"dtype": "nonsense"}, ValueError, "`dtype` must name a floating dtype"),
        ({"layouts": {"q": "ois"}}, ValueError, r"`layouts\['q'\]` must be a layout string"),
    ],
)
def test_every_field_is_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**kwargs)


def test_unknown_json_keys_are_an_error():
    with pytest.raises(ValueError, match=r"unknown LoraConfig keys \['rank'\]"):
        LoraConfig.from_dict({"rank": 4})
