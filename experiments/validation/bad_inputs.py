"""How jaxlora's public API treats wrong inputs: a battery of mistakes, each classified.

Every case is an input decided up front to be wrong (wrong type, None, empty, wrong shape or dtype,
a bad number, a misspelled name, another model's tree, a damaged file, a mismatched config). Each
outcome is one of:

* ``clear``: a ValueError / TypeError / FileNotFoundError / KeyError whose message holds one of
  the case's expected tokens (the argument name, the field name or the leaf path);
* ``obscure``: an exception of another type, or a message without any token;
* ``silent``: the call returned: the wrong input was accepted.

A case whose *preparation* (building the wrong input, damaging a file) fails is a ``harness``
error: a bug of this script, reported apart and never counted.

    python experiments/validation/bad_inputs.py          # all cases -> results/bad_inputs.json
    python experiments/validation/bad_inputs.py --quick  # a ~40-case subset, no JSON unless --out

The percentage is a measurement, not a pass mark.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxlora  # noqa: E402
from jaxlora import LoraConfig, adapters, checkpoint, inits, quant  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results" / "bad_inputs.json"
CLEAR_TYPES = (ValueError, TypeError, FileNotFoundError, KeyError)
KEY = jax.random.key(0)
NAN = float("nan")
INF = float("inf")
RANK = ("`rank`", "rank=")  # the argument `rank` (not the config field `r`)


@dataclasses.dataclass
class Case:
    func: str
    name: str
    run: Callable[[Any], Any]
    tokens: tuple[str, ...]
    prepare: Callable[[], Any] | None = None


@dataclasses.dataclass
class Outcome:
    func: str
    name: str
    outcome: str
    exception: str | None
    message: str
    tokens: list[str]


# --- models and trees -----------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(6, name="up")(x))
        return nn.Dense(2, name="down")(x)


class DropMLP(nn.Module):
    """The same MLP; the name differs only so that a class is passed where an instance belongs."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="down")(nn.relu(nn.Dense(6, name="up")(x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(4, 6, rngs=rngs)
        self.down = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


class NnxOther(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.query(x)


@dataclasses.dataclass
class World:
    """Everything the cases share, built once (small shapes, CPU)."""

    tmp: pathlib.Path
    model: nn.Module
    x: jax.Array
    params: dict
    config: LoraConfig
    frozen: dict
    lora: dict
    other: dict
    other_lora: dict
    other_config: LoraConfig
    dora_lora: dict
    drop_config: LoraConfig
    drop_lora: dict
    nnx_model: nnx.Module
    graphdef: Any
    nnx_frozen: Any
    nnx_lora: dict
    nnx_other: Any
    embed_params: dict
    combined: dict
    qparams: dict
    _dirs: int = 0

    def fresh_dir(self) -> pathlib.Path:
        self._dirs += 1
        path = self.tmp / f"d{self._dirs}"
        path.mkdir()
        return path


def build_world(tmp: pathlib.Path) -> World:
    model = MLP()
    x = jax.random.normal(jax.random.key(1), (3, 4))
    params = model.init(jax.random.key(2), x)["params"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"], init_lora_weights=False)
    frozen, lora = jaxlora.split(params, config, KEY)
    other = {
        "encoder": {
            "query": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)},
            "value": {"kernel": jnp.ones((8, 8))},
        }
    }
    other_config = LoraConfig(r=2, target_modules=["query", "value"])
    _, other_lora = jaxlora.split(other, other_config, KEY)
    _, dora_lora = jaxlora.split(params, config, KEY, variant="dora")
    drop_config = dataclasses.replace(config, lora_dropout=0.5)
    _, drop_lora = jaxlora.split(params, drop_config, KEY)
    nnx_model = NnxMLP(nnx.Rngs(0))
    graphdef, nnx_state = nnx.split(nnx_model)
    nnx_frozen, nnx_lora = jaxlora.split(nnx_state, config, KEY)
    nnx_other = nnx.split(NnxOther(nnx.Rngs(0)))
    embed_params = {"embed": {"embedding": jnp.ones((10, 4))}, "up": {"kernel": jnp.ones((4, 4))}}
    qbase = {"up": {"kernel": jnp.ones((64, 64))}, "down": {"kernel": jnp.ones((64, 8))}}
    return World(
        tmp=tmp,
        model=model,
        x=x,
        params=params,
        config=config,
        frozen=frozen,
        lora=lora,
        other=other,
        other_lora=other_lora,
        other_config=other_config,
        dora_lora=dora_lora,
        drop_config=drop_config,
        drop_lora=drop_lora,
        nnx_model=nnx_model,
        graphdef=graphdef,
        nnx_frozen=nnx_frozen,
        nnx_lora=nnx_lora,
        nnx_other=nnx_other,
        embed_params=embed_params,
        combined=jaxlora.combine(frozen, lora),
        qparams=qbase,
    )


# --- generic wrong values -------------------------------------------------------------------------


def bad_trees() -> list[tuple[str, Any]]:
    return [("None", None), ("str", "params"), ("int", 5), ("list", [1.0, 2.0])]


def bad_configs(w: World) -> list[tuple[str, Any]]:
    return [
        ("None", None),
        ("dict", w.config.to_dict()),
        ("str", "up"),
        ("the class", LoraConfig),
    ]


def bad_keys() -> list[tuple[str, Any]]:
    return [
        ("None", None),
        ("str", "key"),
        ("float array", jnp.ones(2)),
        ("batch of keys", jax.random.split(KEY, 3)),
        ("float scalar", 0.5),
    ]


def with_leaf(tree: dict, path: Sequence[str], value: Any) -> dict:
    """A copy of a nested dict with the leaf at ``path`` replaced (``value=...`` deletes it)."""
    out = dict(tree)
    head, *rest = path
    if rest:
        out[head] = with_leaf(tree[head], rest, value)
    elif value is ...:
        del out[head]
    else:
        out[head] = value
    return out


def broken_adapters(w: World, lora: dict) -> list[tuple[str, Any, tuple[str, ...]]]:
    """(name, wrong adapter, tokens) for a Θ of the MLP (``up`` and ``down``, r=2)."""
    a = lora["up"]["lora_a"]
    b = lora["up"]["lora_b"]
    return [
        ("lora_a transposed", with_leaf(lora, ["up", "lora_a"], a.T), ("up",)),
        ("lora_b transposed", with_leaf(lora, ["up", "lora_b"], b.T), ("up",)),
        ("lora_a rank 3", with_leaf(lora, ["up", "lora_a"], jnp.ones((4, 3))), ("up",)),
        ("lora_b missing", with_leaf(lora, ["up", "lora_b"], ...), ("up", "lora_b")),
        ("lora_a missing", with_leaf(lora, ["down", "lora_a"], ...), ("down", "lora_a")),
        ("unknown leaf lora_c", with_leaf(lora, ["up", "lora_c"], a), ("lora_c",)),
        ("lora_a as list", with_leaf(lora, ["up", "lora_a"], a.tolist()), ("up", "lora_a")),
        ("lora_a int32", with_leaf(lora, ["up", "lora_a"], a.astype(jnp.int32)), ("up",)),
        ("lora_a None", with_leaf(lora, ["up", "lora_a"], None), ("up", "lora_a")),
        ("lora_a 1-D", with_leaf(lora, ["up", "lora_a"], jnp.ones(8)), ("up",)),
        ("lora_a string", with_leaf(lora, ["up", "lora_a"], "A"), ("up", "lora_a")),
        ("another model's adapter", w.other_lora, ("encoder", "query", "lora")),
        ("module not in base", {**lora, "ghost": lora["up"]}, ("ghost",)),
        ("lora not a dict", [lora["up"]], ("lora",)),
        ("frozen passed as lora", w.frozen, ("lora", "kernel")),
        ("empty adapter", {}, ("lora", "up", "down")),
    ]


# --- the battery ----------------------------------------------------------------------------------


def config_cases(w: World) -> list[Case]:
    fields: dict[str, list[tuple[str, Any]]] = {
        "r": [("0", 0), ("-1", -1), ("2.5", 2.5), ("'8'", "8"), ("None", None), ("True", True)],
        "lora_alpha": [
            ("0", 0),
            ("-1", -1),
            ("nan", NAN),
            ("inf", INF),
            ("'16'", "16"),
            ("None", None),
            ("True", True),
        ],
        "lora_dropout": [
            ("-0.1", -0.1),
            ("1.0", 1.0),
            ("1.5", 1.5),
            ("nan", NAN),
            ("'0.1'", "0.1"),
            ("None", None),
            ("True", True),
        ],
        "bias": [
            ("'None'", "None"),
            ("'lora'", "lora"),
            ("''", ""),
            ("None", None),
            ("True", True),
        ],
        "target_modules": [
            ("[]", []),
            ("['']", [""]),
            ("[1]", [1]),
            ("5", 5),
            ("bad regex '('", "("),
            ("[None]", [None]),
            ("dict", {"up": 1}),
        ],
        "exclude_modules": [("[]", []), ("[3]", [3]), ("bad regex '['", "["), ("5", 5)],
        "modules_to_save": [("[]", []), ("['']", [""]), ("7", 7), ("[None]", [None])],
        "rank_pattern": [
            ("{'up': 0}", {"up": 0}),
            ("{'up': -2}", {"up": -2}),
            ("{'up': 2.5}", {"up": 2.5}),
            ("{'up': '4'}", {"up": "4"}),
            ("{'': 2}", {"": 2}),
            ("bad regex key", {"(": 2}),
            ("list of pairs", [("up", 2)]),
            ("str", "up"),
        ],
        "alpha_pattern": [
            ("{'up': 0}", {"up": 0}),
            ("{'up': nan}", {"up": NAN}),
            ("{'up': 'x'}", {"up": "x"}),
            ("bad regex key", {"(": 1.0}),
            ("int", 3),
        ],
        "use_rslora": [("'yes'", "yes"), ("1", 1), ("None", None)],
        "init_lora_weights": [
            ("'gauss'", "gauss"),
            ("'pissa'", "pissa"),
            ("2", 2),
            ("None", None),
        ],
        "task_type": [("5", 5), ("['SEQ_CLS']", ["SEQ_CLS"]), ("'SEQ_CLASS' typo", "SEQ_CLASS")],
        "dtype": [
            ("'int32'", "int32"),
            ("'floaty'", "floaty"),
            ("None", None),
            ("'bool'", "bool"),
            ("5", 5),
            ("'complex64'", "complex64"),
        ],
        "layouts": [
            ("{'up': 'xx'}", {"up": "xx"}),
            ("{'up': ''}", {"up": ""}),
            ("{'up': 5}", {"up": 5}),
            ("{'up': 'ss'}", {"up": "ss"}),
            ("{'up': 'is'} s not leading", {"up": "is"}),
            ("{'up': 'ii'} no output", {"up": "ii"}),
            ("list", ["io"]),
        ],
        "layers_to_transform": [
            ("-1", -1),
            ("'0'", "0"),
            ("[0.5]", [0.5]),
            ("True", True),
            ("[]", []),
        ],
        "layers_pattern": [("5", 5), ("''", ""), ("bad regex '('", "(")],
    }
    cases = []
    for field, values in fields.items():
        tokens = (f"`{field}`", f"'{field}'", field) if field != "r" else ("`r`", "'r'", "rank")
        for label, value in values:
            kwargs = {"target_modules": ["up", "down"], field: value}
            cases.append(
                Case("LoraConfig", f"{field}={label}", lambda _, k=kwargs: LoraConfig(**k), tokens)
            )
    extra = [
        ("misspelled field rank=", {"rank": 4}, ("rank",)),
        ("misspelled field target_module=", {"target_module": ["up"]}, ("target_module",)),
        ("misspelled field alpha=", {"alpha": 16}, ("alpha",)),
        (
            "layers_to_transform with regex target_modules",
            {"target_modules": "up", "layers_to_transform": [0]},
            ("layers_to_transform",),
        ),
        (
            "layers_pattern without layers_to_transform",
            {"target_modules": ["up"], "layers_pattern": "layers"},
            ("layers_pattern",),
        ),
    ]
    for label, kwargs, tokens in extra:
        cases.append(Case("LoraConfig", label, lambda _, k=kwargs: LoraConfig(**k), tokens))
    for label, data, tokens in [
        ("from_dict unknown key", {"r": 2, "lora_alhpa": 4}, ("lora_alhpa",)),
        ("from_dict list", [["r", 2]], ("LoraConfig", "dict", "data")),
        ("from_dict None", None, ("LoraConfig", "dict", "data")),
    ]:
        cases.append(Case("LoraConfig", label, lambda _, d=data: LoraConfig.from_dict(d), tokens))
    for label, text, tokens in [
        ("from_json invalid", "{r: 2", ("JSON", "json", "config")),
        ("from_json a list", "[1, 2]", ("JSON", "json", "LoraConfig", "dict")),
        ("from_json empty", "", ("JSON", "json", "config")),
        ("from_json bad value", '{"r": -3}', ("`r`",)),
    ]:
        cases.append(Case("LoraConfig", label, lambda _, t=text: LoraConfig.from_json(t), tokens))
    return cases


def split_cases(w: World) -> list[Case]:
    cases = []
    fn = jaxlora.split
    for label, value in bad_trees():
        cases.append(Case("split", f"params={label}", lambda _, v=value: fn(v, w.config, KEY),
                          ("params", "target_modules")))  # fmt: skip
    cases.append(Case("split", "params={}", lambda _: fn({}, w.config, KEY),
                      ("params", "target_modules")))  # fmt: skip
    cases.append(Case("split", "params=another model's tree", lambda _: fn(w.other, w.config, KEY),
                      ("target_modules",)))  # fmt: skip
    cases.append(Case("split", "params kernel as list",
                      lambda _: fn(with_leaf(w.params, ["up", "kernel"], [[1.0] * 6] * 4),
                                   w.config, KEY), ("up",)))  # fmt: skip
    cases.append(Case("split", "params kernel int32",
                      lambda _: fn(with_leaf(w.params, ["up", "kernel"], jnp.ones((4, 6), int)),
                                   w.config, KEY), ("up",)))  # fmt: skip
    cases.append(Case("split", "params kernel 1-D",
                      lambda _: fn(with_leaf(w.params, ["up", "kernel"], jnp.ones(6)),
                                   w.config, KEY), ("up",)))  # fmt: skip
    cases.append(Case("split", "params kernel 3-D without layout",
                      lambda _: fn(with_leaf(w.params, ["up", "kernel"], jnp.ones((4, 2, 3))),
                                   w.config, KEY), ("up", "layouts")))  # fmt: skip
    cases.append(Case("split", "params kernel None",
                      lambda _: fn(with_leaf(w.params, ["up", "kernel"], None), w.config, KEY),
                      ("up",)))  # fmt: skip
    for label, value in bad_configs(w):
        cases.append(Case("split", f"config={label}", lambda _, v=value: fn(w.params, v, KEY),
                          ("config",)))  # fmt: skip
    for label, value in bad_keys():
        cases.append(Case("split", f"key={label}", lambda _, v=value: fn(w.params, w.config, v),
                          ("key",)))  # fmt: skip
    for label, value in [("'DoRA'", "DoRA"), ("'lroa'", "lroa"), ("None", None), ("5", 5),
                         ("''", "")]:  # fmt: skip
        cases.append(Case("split", f"variant={label}",
                          lambda _, v=value: fn(w.params, w.config, KEY, variant=v),
                          ("variant",)))  # fmt: skip
    cases.append(Case("split", "variant='dora' on an embedding",
                      lambda _: fn(w.embed_params, LoraConfig(target_modules=["embed"]), KEY,
                                   variant="dora"), ("embed",)))  # fmt: skip
    mismatched = [
        ("target misspelled 'dwon'", LoraConfig(target_modules=["up", "dwon"]), ("dwon",)),
        ("target regex matching nothing", LoraConfig(target_modules="enc.*"), ("target_modules",)),
        ("target a bias-only name", LoraConfig(target_modules=["bias"]), ("bias",)),
        ("rank_pattern matching nothing",
         LoraConfig(target_modules=["up"], rank_pattern={"query": 4}), ("rank_pattern", "query")),
        ("alpha_pattern matching nothing",
         LoraConfig(target_modules=["up"], alpha_pattern={"qq": 4}), ("alpha_pattern", "qq")),
        ("exclude_modules matching nothing",
         LoraConfig(target_modules=["up"], exclude_modules=["zz"]), ("exclude_modules", "zz")),
        ("layouts with 3 axes for a 2-D kernel",
         LoraConfig(target_modules=["up"], layouts={"up": "sio"}), ("layouts", "up")),
        ("layouts matching nothing",
         LoraConfig(target_modules=["up"], layouts={"query": "ioo"}), ("layouts", "query")),
        ("modules_to_save matching nothing",
         LoraConfig(target_modules=["up"], modules_to_save=["classifier"]),
         ("modules_to_save", "classifier")),
        ("target_modules=None", LoraConfig(), ("target_modules",)),
    ]  # fmt: skip
    for label, config, tokens in mismatched:
        cases.append(Case("split", label, lambda _, c=config: fn(w.params, c, KEY), tokens))
    layered = {f"layers_{i}": {"up": {"kernel": jnp.ones((4, 4))}} for i in range(2)}
    cases.append(Case("split", "layers_to_transform=[5] in a 2-layer model",
                      lambda _: fn(layered, LoraConfig(target_modules=["up"],
                                                        layers_to_transform=[5]), KEY),
                      ("layers_to_transform", "5")))  # fmt: skip
    return cases


def merge_like_cases(w: World, name: str, fn: Callable) -> list[Case]:
    cases = []
    for label, value in bad_trees():
        cases.append(Case(name, f"frozen={label}", lambda _, v=value: fn(v, w.lora, w.config),
                          ("frozen", "merged", "up")))  # fmt: skip
    cases.append(Case(name, "frozen={}", lambda _: fn({}, w.lora, w.config),
                      ("up", "frozen", "merged")))  # fmt: skip
    cases.append(Case(name, "frozen=another model's tree", lambda _: fn(w.other, w.lora, w.config),
                      ("up",)))  # fmt: skip
    cases.append(Case(name, "frozen kernel transposed",
                      lambda _: fn(with_leaf(w.frozen, ["up", "kernel"], jnp.ones((6, 4))),
                                   w.lora, w.config), ("up",)))  # fmt: skip
    cases.append(Case(name, "frozen missing module 'down'",
                      lambda _: fn(with_leaf(w.frozen, ["down"], ...), w.lora, w.config),
                      ("down",)))  # fmt: skip
    cases.append(Case(name, "frozen kernel int32",
                      lambda _: fn(with_leaf(w.frozen, ["up", "kernel"], jnp.ones((4, 6), int)),
                                   w.lora, w.config), ("up",)))  # fmt: skip
    cases.append(Case(name, "frozen and lora swapped", lambda _: fn(w.lora, w.frozen, w.config),
                      ("lora", "frozen", "kernel")))  # fmt: skip
    for label, value, tokens in broken_adapters(w, w.lora):
        cases.append(Case(name, f"lora: {label}", lambda _, v=value: fn(w.frozen, v, w.config),
                          tokens))  # fmt: skip
    for label, value in [*bad_configs(w), ("None lora", None)]:
        if label == "None lora":
            cases.append(Case(name, "lora=None", lambda _: fn(w.frozen, None, w.config),
                              ("lora",)))  # fmt: skip
            continue
        cases.append(Case(name, f"config={label}", lambda _, v=value: fn(w.frozen, w.lora, v),
                          ("config",)))  # fmt: skip
    mismatched = [
        ("config with r=4 for a rank-2 adapter", dataclasses.replace(w.config, r=4), ("up", "r")),
        ("config targeting only 'up'",
         dataclasses.replace(w.config, target_modules=("up",)), ("down",)),
        ("another model's config", w.other_config, ("config", "query", "up")),
        ("config with bias='all' but no biases in lora",
         dataclasses.replace(w.config, bias="all"), ("bias",)),
    ]  # fmt: skip
    for label, config, tokens in mismatched:
        cases.append(Case(name, label, lambda _, c=config: fn(w.frozen, w.lora, c), tokens))
    return cases


def unmerge_extra(w: World) -> list[Case]:
    return [
        Case("unmerge", "DoRA adapter", lambda _: jaxlora.unmerge(w.frozen, w.dora_lora, w.config),
             ("DoRA", "dora", "lora_magnitude")),
    ]  # fmt: skip


def apply_cases(w: World) -> list[Case]:
    cases = []
    for mode in ("factored", "merged"):
        for kind in ("linen", "nnx"):
            func = f"apply[{kind},{mode}]"
            model = w.model if kind == "linen" else w.graphdef
            frozen = w.frozen if kind == "linen" else w.nnx_frozen
            lora = w.lora if kind == "linen" else w.nnx_lora

            def call(*args, m=model, f=frozen, lo=lora, md=mode, **kwargs):
                kw = {"m": m, "f": f, "lo": lo, "c": w.config, "x": w.x, **kwargs}
                model_, frozen_, lora_ = kw.pop("m"), kw.pop("f"), kw.pop("lo")
                config_, x_ = kw.pop("c"), kw.pop("x")
                return jaxlora.apply(model_, frozen_, lora_, config_, x_, mode=md, **kw)

            for label, value in [("None", None), ("str", "model"), ("a function", lambda x: x)]:
                cases.append(Case(func, f"model={label}", lambda _, v=value, c=call: c(m=v),
                                  ("model",)))  # fmt: skip
            cls = DropMLP if kind == "linen" else NnxMLP
            cases.append(Case(func, "model=the class, not an instance",
                              lambda _, v=cls, c=call: c(m=v), ("model",)))  # fmt: skip
            other_model = w.nnx_other[0] if kind == "linen" else w.model
            cases.append(Case(func, "model of the other framework",
                              lambda _, v=other_model, c=call: c(m=v),
                              ("model", "frozen", "up", "query")))  # fmt: skip
            other_frozen = w.nnx_other[1] if kind == "nnx" else w.other
            cases.append(Case(func, "frozen=another model's tree",
                              lambda _, v=other_frozen, c=call: c(f=v),
                              ("up", "frozen", "query")))  # fmt: skip
            cases.append(Case(func, "frozen=None", lambda _, c=call: c(f=None), ("frozen", "up")))
            for label, value, tokens in broken_adapters(w, lora)[:8]:
                cases.append(Case(func, f"lora: {label}", lambda _, v=value, c=call: c(lo=v),
                                  tokens))  # fmt: skip
            cases.append(Case(func, "lora=None", lambda _, c=call: c(lo=None), ("lora",)))
            cases.append(Case(func, "lora of another model",
                              lambda _, c=call: c(lo=w.other_lora),
                              ("encoder", "query", "lora")))  # fmt: skip
            for label, value in bad_configs(w)[:3]:
                cases.append(Case(func, f"config={label}", lambda _, v=value, c=call: c(c=v),
                                  ("config",)))  # fmt: skip
            cases.append(Case(func, "config with r=4 for a rank-2 adapter",
                              lambda _, c=call: c(c=dataclasses.replace(w.config, r=4)),
                              ("up", "r")))  # fmt: skip
            for label, value in [("'merge'", "merge"), ("'FACTORED'", "FACTORED"),
                                 ("None", None), ("1", 1)]:  # fmt: skip
                cases.append(Case(func, f"mode={label}",
                                  lambda _, v=value, m=model, f=frozen, lo=lora:
                                  jaxlora.apply(m, f, lo, w.config, w.x, mode=v),
                                  ("mode",)))  # fmt: skip
            cases.append(
                Case(
                    func,
                    "input with 5 features for a 4-input kernel",
                    lambda _, c=call: c(x=jnp.ones((3, 5))),
                    ("shape", "up"),
                )
            )
            for label, value in [("str", "key"), ("int", 5), ("{'dropout': 5}", {"dropout": 5})]:
                cases.append(Case(func, f"rngs={label}", lambda _, v=value, c=call: c(rngs=v),
                                  ("rngs", "dropout", "key")))  # fmt: skip
            cases.append(Case(func, "lora_deterministic='yes'",
                              lambda _, c=call: c(lora_deterministic="yes"),
                              ("lora_deterministic",)))  # fmt: skip
            cases.append(Case(func, "model_kwargs=5", lambda _, c=call: c(model_kwargs=5),
                              ("model_kwargs",)))  # fmt: skip
            cases.append(Case(func, "method='nope'", lambda _, c=call: c(method="nope"),
                              ("method", "nope")))  # fmt: skip
            cases.append(Case(func, "remat matching no module",
                              lambda _, c=call: c(remat="nothing_here"), ("remat",)))  # fmt: skip
            cases.append(Case(func, "remat=5", lambda _, c=call: c(remat=5), ("remat",)))
            if kind == "linen":
                cases.append(Case(func, "variables=5", lambda _, c=call: c(variables=5),
                                  ("variables",)))  # fmt: skip
            else:
                cases.append(Case(func, "variables given to an NNX model (linen only)",
                                  lambda _, c=call: c(variables={"batch_stats": {}}),
                                  ("variables",)))  # fmt: skip
            lo_drop = w.drop_lora if kind == "linen" else w.nnx_lora
            if mode == "merged":
                cases.append(Case(func, "dropout on in merged mode",
                                  lambda _, c=call, lo=lo_drop: c(
                                      lo=lo, c=w.drop_config, rngs={"dropout": KEY}),
                                  ("merged", "dropout")))  # fmt: skip
            else:
                cases.append(Case(func, "lora_deterministic=False without a dropout key",
                                  lambda _, c=call, lo=lo_drop: c(
                                      lo=lo, c=w.drop_config, lora_deterministic=False),
                                  ("dropout",)))  # fmt: skip
    return cases


def count_cases(w: World) -> list[Case]:
    fn = jaxlora.count
    cases = []
    for label, value in bad_trees():
        cases.append(Case("count", f"frozen={label}", lambda _, v=value: str(fn(v, w.lora)),
                          ("frozen",)))  # fmt: skip
    for label, value, tokens in broken_adapters(w, w.lora):
        if label in {"lora_b missing", "lora_a missing", "empty adapter", "lora_a rank 3"}:
            continue  # a partial adapter still has a countable size
        cases.append(Case("count", f"lora: {label}", lambda _, v=value: str(fn(w.frozen, v)),
                          tokens))  # fmt: skip
    cases.append(Case("count", "lora=another model's config tree (a LoraConfig)",
                      lambda _: str(fn(w.frozen, w.config)), ("lora",)))  # fmt: skip
    cases.append(
        Case(
            "count",
            "frozen with string leaves",
            lambda _: str(fn({"up": {"kernel": "W"}}, None)),
            ("up", "kernel"),
        )
    )
    return cases


def combine_partition_cases(w: World) -> list[Case]:
    cases = []
    for label, value in bad_trees():
        cases.append(
            Case(
                "combine",
                f"frozen={label}",
                lambda _, v=value: jaxlora.combine(v, w.lora),
                ("frozen",),
            )
        )
        cases.append(
            Case(
                "combine",
                f"lora={label}",
                lambda _, v=value: jaxlora.combine(w.frozen, v),
                ("lora",),
            )
        )
    cases.append(Case("combine", "lora of another model",
                      lambda _: jaxlora.combine(w.frozen, w.other_lora),
                      ("encoder", "query", "lora")))  # fmt: skip
    cases.append(
        Case(
            "combine",
            "frozen and lora swapped",
            lambda _: jaxlora.combine(w.lora, w.frozen),
            ("lora", "kernel", "frozen"),
        )
    )
    cases.append(Case("combine", "lora with a module not in frozen",
                      lambda _: jaxlora.combine(w.frozen, {**w.lora, "ghost": w.lora["up"]}),
                      ("ghost",)))  # fmt: skip
    for label, value in bad_trees():
        cases.append(
            Case(
                "partition",
                f"combined={label}",
                lambda _, v=value: jaxlora.partition(v, w.config),
                ("combined",),
            )
        )
    for label, value in bad_configs(w):
        cases.append(
            Case(
                "partition",
                f"config={label}",
                lambda _, v=value: jaxlora.partition(w.combined, v),
                ("config",),
            )
        )
    cases.append(Case("partition", "combined without any factors (the plain base)",
                      lambda _: jaxlora.partition(w.frozen, w.config),
                      ("lora_a", "combined", "up")))  # fmt: skip
    cases.append(
        Case(
            "partition",
            "combined of another model",
            lambda _: jaxlora.partition(jaxlora.combine(w.other, w.other_lora), w.config),
            ("up", "query", "config"),
        )
    )
    return cases


def delta_cases(w: World) -> list[Case]:
    a, b = jnp.ones((4, 2)), jnp.ones((2, 6))
    d = jaxlora.delta
    rows = [
        ("a=None", lambda _: d(None, b), ("`a`", "a=")),
        ("b=None", lambda _: d(a, None), ("`b`", "b=")),
        ("a 1-D", lambda _: d(jnp.ones(4), b), ("`a`", "a=", "rank")),
        ("rank mismatch (4,3)x(2,6)", lambda _: d(jnp.ones((4, 3)), b), ("rank", "`a`", "`b`")),
        ("a string", lambda _: d("a", b), ("`a`", "a=")),
        ("n_stack=-1", lambda _: d(a, b, n_stack=-1), ("n_stack",)),
        ("n_stack=5 beyond the axes", lambda _: d(a, b, n_stack=5), ("n_stack",)),
        ("n_stack='1'", lambda _: d(a, b, n_stack="1"), ("n_stack",)),
        ("n_stack=1.5", lambda _: d(a, b, n_stack=1.5), ("n_stack",)),
        ("stack sizes differ", lambda _: d(jnp.ones((3, 4, 2)), jnp.ones((2, 2, 6)), n_stack=1),
         ("stack", "n_stack")),
        ("a and b swapped", lambda _: d(b, a), ("rank", "`a`", "`b`")),
    ]  # fmt: skip
    return [Case("delta", label, run, tokens) for label, run, tokens in rows]


def freeze_mask_cases(w: World) -> list[Case]:
    cases = []
    for label, value in [("None", None), ("str 'adam'", "adam"),
                         ("optax.adam, uncalled", optax.adam), ("int", 3)]:  # fmt: skip
        cases.append(Case("freeze", f"optimizer={label}",
                          lambda _, v=value: jaxlora.freeze(v, w.config).init(w.combined),
                          ("optimizer",)))  # fmt: skip
    for label, value in bad_configs(w):
        cases.append(Case("freeze", f"config={label}",
                          lambda _, v=value: jaxlora.freeze(optax.sgd(0.1), v).init(w.combined),
                          ("config",)))  # fmt: skip
    cases.append(Case("freeze", "init on the frozen base (no factors)",
                      lambda _: jaxlora.freeze(optax.sgd(0.1), w.config).init(w.frozen),
                      ("lora_a", "factor", "up")))  # fmt: skip
    for label, value in bad_trees():
        cases.append(
            Case(
                "trainable_mask",
                f"combined={label}",
                lambda _, v=value: jaxlora.trainable_mask(v, w.config),
                ("combined",),
            )
        )
    for label, value in bad_configs(w):
        cases.append(
            Case(
                "trainable_mask",
                f"config={label}",
                lambda _, v=value: jaxlora.trainable_mask(w.combined, v),
                ("config",),
            )
        )
    cases.append(Case("trainable_mask", "combined without factors",
                      lambda _: jaxlora.trainable_mask(w.frozen, w.config),
                      ("lora_a", "combined", "up")))  # fmt: skip
    return cases


def find_infer_cases(w: World) -> list[Case]:
    cases = []
    ft = jaxlora.find_targets
    for label, value in bad_trees():
        cases.append(Case("find_targets", f"params={label}", lambda _, v=value: ft(v, w.config),
                          ("params", "target_modules")))  # fmt: skip
    for label, value in bad_configs(w):
        cases.append(Case("find_targets", f"config={label}", lambda _, v=value: ft(w.params, v),
                          ("config",)))  # fmt: skip
    cases.append(
        Case(
            "find_targets",
            "another model's tree",
            lambda _: ft(w.other, w.config),
            ("target_modules",),
        )
    )
    cases.append(
        Case(
            "find_targets",
            "misspelled target 'dwon'",
            lambda _: ft(w.params, LoraConfig(target_modules=["dwon"])),
            ("dwon",),
        )
    )
    cases.append(
        Case(
            "find_targets",
            "3-D kernel without layout",
            lambda _: ft({"q": {"kernel": jnp.ones((4, 2, 3))}}, LoraConfig(target_modules=["q"])),
            ("layouts", "q"),
        )
    )
    il = jaxlora.infer_layouts
    for label, value in [("None", None), ("str", "MLP"), ("params dict", w.params), ("int", 3)]:
        cases.append(Case("infer_layouts", f"module={label}", lambda _, v=value: il(v, w.x),
                          ("module",)))  # fmt: skip
    cases.append(Case("infer_layouts", "linen class, not an instance",
                      lambda _: il(MLP, w.x), ("module",)))  # fmt: skip
    cases.append(Case("infer_layouts", "nnx class, not an instance",
                      lambda _: il(NnxMLP), ("module",)))  # fmt: skip
    cases.append(Case("infer_layouts", "linen without sample inputs",
                      lambda _: il(w.model), ("input", "args", "x")))  # fmt: skip
    cases.append(
        Case(
            "infer_layouts",
            "linen method='nope'",
            lambda _: il(w.model, w.x, method="nope"),
            ("method", "nope"),
        )
    )
    cases.append(Case("infer_layouts", "nnx GraphDef instead of module",
                      lambda _: il(w.graphdef), ("module", "GraphDef")))  # fmt: skip
    return cases


def sharding_cases(w: World) -> list[Case]:
    mesh = jax.make_mesh((1,), ("model",))
    specs = {"up": {"kernel": P(None, "model"), "bias": P("model")},
             "down": {"kernel": P("model", None), "bias": P()}}  # fmt: skip
    ls, ins = jaxlora.lora_shardings, jaxlora.init_sharded
    cases = []
    for label, value in bad_trees():
        cases.append(
            Case(
                "lora_shardings",
                f"frozen={label}",
                lambda _, v=value: ls(v, w.config, specs),
                ("frozen", "target_modules"),
            )
        )
    for label, value in bad_configs(w):
        cases.append(
            Case(
                "lora_shardings",
                f"config={label}",
                lambda _, v=value: ls(w.frozen, v, specs),
                ("config",),
            )
        )
    rows = [
        ("shardings=5", lambda _: ls(w.frozen, w.config, 5), ("shardings",)),
        ("shardings='model'", lambda _: ls(w.frozen, w.config, "model"), ("shardings",)),
        ("shardings of another tree", lambda _: ls(w.frozen, w.config,
                                                   {"encoder": {"query": {"kernel": P()}}}),
         ("shardings", "up")),
        ("spec longer than its kernel",
         lambda _: ls(w.frozen, w.config, with_leaf(specs, ["up", "kernel"], P(None, None, "m"))),
         ("up",)),
        ("leaf a string", lambda _: ls(w.frozen, w.config, with_leaf(specs, ["up", "kernel"], "m")),
         ("up", "shardings")),
        ("leaf missing", lambda _: ls(w.frozen, w.config, with_leaf(specs, ["up", "kernel"], ...)),
         ("up", "shardings")),
        ("rank_axis naming no mesh axis",
         lambda _: ls(w.frozen, w.config, specs, rank_axis="nope", mesh=mesh),
         ("rank_axis", "nope")),
        ("rank_axis clashing with base spec",
         lambda _: ls(w.frozen, w.config, specs, rank_axis="model"), ("rank_axis",)),
        ("rank_axis=5", lambda _: ls(w.frozen, w.config, specs, rank_axis=5), ("rank_axis",)),
        ("mesh='mesh'", lambda _: ls(w.frozen, w.config, specs, mesh="mesh"), ("mesh",)),
        ("spec axis not in mesh",
         lambda _: ls(w.frozen, w.config, with_leaf(specs, ["up", "kernel"], P(None, "tp")),
                      mesh=mesh), ("tp", "up")),
        ("rules=5 with logical names",
         lambda _: ls(w.frozen, w.config, with_leaf(specs, ["up", "kernel"], P(None, "embed")),
                      rules=5), ("rules",)),
        ("shardings=None on unboxed host arrays",
         lambda _: ls(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), w.frozen),
                      w.config), ("sharding", "up")),
    ]  # fmt: skip
    cases += [Case("lora_shardings", label, run, tokens) for label, run, tokens in rows]
    for label, value in bad_keys():
        cases.append(Case("init_sharded", f"key={label}",
                          lambda _, v=value: ins(w.frozen, w.config, v, specs, mesh=mesh),
                          ("key",)))  # fmt: skip
    for label, value in bad_configs(w)[:3]:
        cases.append(Case("init_sharded", f"config={label}",
                          lambda _, v=value: ins(w.frozen, v, KEY, specs, mesh=mesh),
                          ("config",)))  # fmt: skip
    rows = [
        ("PartitionSpecs without a mesh", lambda _: ins(w.frozen, w.config, KEY, specs),
         ("mesh",)),
        ("frozen=None", lambda _: ins(None, w.config, KEY, specs, mesh=mesh),
         ("frozen", "target_modules")),
        ("shardings=5", lambda _: ins(w.frozen, w.config, KEY, 5, mesh=mesh), ("shardings",)),
        ("trainable bias as ShapeDtypeStruct (no value)",
         lambda _: ins(with_leaf(w.frozen, ["up", "bias"], jax.ShapeDtypeStruct((6,), jnp.float32)),
                       dataclasses.replace(w.config, bias="all"), KEY, specs, mesh=mesh),
         ("up", "bias")),
        ("mesh='mesh'", lambda _: ins(w.frozen, w.config, KEY, specs, mesh="mesh"), ("mesh",)),
        ("spec axis not in mesh",
         lambda _: ins(w.frozen, w.config, KEY, with_leaf(specs, ["up", "kernel"], P(None, "tp")),
                       mesh=mesh), ("tp", "up")),
    ]  # fmt: skip
    cases += [Case("init_sharded", label, run, tokens) for label, run, tokens in rows]
    return cases


# --- files ----------------------------------------------------------------------------------------


def _saved_checkpoint(w: World, *, opt_state: bool = False) -> pathlib.Path:
    directory = w.fresh_dir() / "ckpt"
    state = optax.adam(1e-3).init(w.lora) if opt_state else None
    with checkpoint.checkpoint_manager(directory) as manager:
        checkpoint.save(manager, 1, w.lora, w.config, opt_state=state)
    return directory


def _restore(directory: pathlib.Path, frozen: Any, **kwargs: Any) -> Any:
    with checkpoint.checkpoint_manager(directory) as manager:
        return checkpoint.restore(manager, frozen, **kwargs)


def _truncate(path: pathlib.Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _lora_data_files(step: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in (step / "lora").rglob("*") if p.is_file() and p.parent.name == "d")


def checkpoint_cases(w: World) -> list[Case]:
    cm, save = checkpoint.checkpoint_manager, checkpoint.save
    cases = []
    for label, kwargs, tokens in [
        ("max_to_keep=0", {"max_to_keep": 0}, ("max_to_keep",)),
        ("max_to_keep=-1", {"max_to_keep": -1}, ("max_to_keep",)),
        ("max_to_keep=1.5", {"max_to_keep": 1.5}, ("max_to_keep",)),
        ("max_to_keep='3'", {"max_to_keep": "3"}, ("max_to_keep",)),
        ("best_mode='mean'", {"best_mode": "mean"}, ("best_mode",)),
        ("best_mode='MIN'", {"best_mode": "MIN"}, ("best_mode",)),
        ("best_metric=5", {"best_metric": 5}, ("best_metric",)),
        ("unknown option", {"max_to_kep": 3}, ("max_to_kep",)),
        ("async_save='yes'", {"async_save": "yes"}, ("async_save",)),
    ]:
        cases.append(
            Case(
                "checkpoint.checkpoint_manager",
                label,
                lambda _, k=kwargs: cm(w.fresh_dir() / "c", **k).close(),
                tokens,
            )
        )
    for label, value in [("None", None), ("int", 5)]:
        cases.append(
            Case(
                "checkpoint.checkpoint_manager",
                f"directory={label}",
                lambda _, v=value: cm(v).close(),
                ("directory",),
            )
        )

    def saving(**overrides: Any) -> Any:
        args = {"step": 1, "lora": w.lora, "config": w.config, **overrides}
        extra = {k: args.pop(k) for k in list(args) if k in {"metrics", "opt_state", "best"}}
        best = extra.pop("best", None)
        with cm(w.fresh_dir() / "c", best_metric=best) as manager:
            return save(manager, args["step"], args["lora"], args["config"], **extra)

    for label, value in [("-1", -1), ("'1'", "1"), ("1.5", 1.5), ("None", None), ("True", True)]:
        cases.append(Case("checkpoint.save", f"step={label}",
                          lambda _, v=value: saving(step=v), ("step",)))  # fmt: skip
    for label, value in [("None", None), ("list", [w.lora]), ("str", "lora")]:
        cases.append(Case("checkpoint.save", f"lora={label}",
                          lambda _, v=value: saving(lora=v), ("lora",)))  # fmt: skip
    for label, value in bad_configs(w):
        cases.append(Case("checkpoint.save", f"config={label}",
                          lambda _, v=value: saving(config=v), ("config",)))  # fmt: skip
    cases.append(
        Case(
            "checkpoint.save",
            "manager=None",
            lambda _: save(None, 1, w.lora, w.config),
            ("manager",),
        )
    )
    cases.append(
        Case(
            "checkpoint.save",
            "manager=a directory path",
            lambda _: save(str(w.fresh_dir()), 1, w.lora, w.config),
            ("manager",),
        )
    )
    cases.append(
        Case(
            "checkpoint.save",
            "metrics without the best_metric",
            lambda _: saving(best="loss", metrics={"acc": 1.0}),
            ("loss", "metrics"),
        )
    )
    cases.append(
        Case(
            "checkpoint.save",
            "no metrics with a best_metric",
            lambda _: saving(best="loss"),
            ("loss", "metrics"),
        )
    )
    cases.append(Case("checkpoint.save", "metrics=5", lambda _: saving(best="loss", metrics=5),
                      ("metrics",)))  # fmt: skip
    cases.append(
        Case(
            "checkpoint.save",
            "metric a string",
            lambda _: saving(best="loss", metrics={"loss": "low"}),
            ("loss", "metrics"),
        )
    )
    cases.append(
        Case(
            "checkpoint.save",
            "adapter not made with config (other model)",
            lambda _: saving(lora=w.other_lora),
            ("config", "encoder", "query", "up"),
        )
    )
    cases.append(Case("checkpoint.save", "lora leaf a string",
                      lambda _: saving(lora=with_leaf(w.lora, ["up", "lora_a"], "A")),
                      ("up", "lora_a")))  # fmt: skip

    def save_twice(step2: int) -> Any:
        with cm(w.fresh_dir() / "c") as manager:
            save(manager, 5, w.lora, w.config)
            return save(manager, step2, w.lora, w.config)

    cases.append(Case("checkpoint.save", "existing step", lambda _: save_twice(5), ("step", "5")))
    cases.append(Case("checkpoint.save", "older step", lambda _: save_twice(3), ("step", "3")))

    # restore
    cases.append(
        Case(
            "checkpoint.restore",
            "missing directory",
            lambda _: _restore(w.fresh_dir() / "nope", w.frozen),
            ("nope",),
        )
    )
    cases.append(
        Case(
            "checkpoint.restore",
            "empty directory (no checkpoint)",
            lambda _: _restore(w.fresh_dir(), w.frozen),
            ("checkpoint", "step"),
        )
    )
    ok = _saved_checkpoint(w)
    with_opt = _saved_checkpoint(w, opt_state=True)
    cases += [
        Case("checkpoint.restore", "step=99 not there", lambda _: _restore(ok, w.frozen, step=99),
             ("99", "step")),
        Case("checkpoint.restore", "step='1'", lambda _: _restore(ok, w.frozen, step="1"),
             ("step",)),
        Case("checkpoint.restore", "step=-1", lambda _: _restore(ok, w.frozen, step=-1),
             ("step",)),
        Case("checkpoint.restore", "frozen of another model",
             lambda _: _restore(ok, w.other), ("up", "target_modules")),
        Case("checkpoint.restore", "frozen=None", lambda _: _restore(ok, None),
             ("frozen", "target_modules")),
        Case("checkpoint.restore", "frozen kernel transposed",
             lambda _: _restore(ok, with_leaf(w.frozen, ["up", "kernel"], jnp.ones((6, 4)))),
             ("up",)),
        Case("checkpoint.restore", "optimizer given, no opt_state saved",
             lambda _: _restore(ok, w.frozen, optimizer=optax.adam(1e-3)),
             ("optimizer", "opt_state")),
        Case("checkpoint.restore", "another optimizer's state (sgd+momentum vs adam)",
             lambda _: _restore(with_opt, w.frozen, optimizer=optax.sgd(0.1, momentum=0.9)),
             ("optimizer", "opt_state")),
        Case("checkpoint.restore", "optimizer='adam'",
             lambda _: _restore(with_opt, w.frozen, optimizer="adam"), ("optimizer",)),
        Case("checkpoint.restore", "manager=None",
             lambda _: checkpoint.restore(None, w.frozen), ("manager",)),
    ]  # fmt: skip

    def damaged(action: Callable[[pathlib.Path], None]) -> Callable[[], pathlib.Path]:
        def prepare() -> pathlib.Path:
            directory = _saved_checkpoint(w)
            action(directory / "1")
            return directory

        return prepare

    damages = [
        ("config invalid JSON", lambda s: (s / "config" / "metadata").write_text("{not json"),
         ("config",)),
        ("config file deleted", lambda s: (s / "config" / "metadata").unlink(), ("config",)),
        ("config edited (r changed)",
         lambda s: (s / "config" / "metadata").write_text(
             (s / "config" / "metadata").read_text().replace('"r": 2', '"r": 3')), ("config",)),
        ("config emptied", lambda s: (s / "config" / "metadata").write_text(""), ("config",)),
        ("config directory deleted", lambda s: shutil.rmtree(s / "config"), ("config",)),
        ("lora data files truncated",
         lambda s: [_truncate(p) for p in _lora_data_files(s)], ("lora",)),
        ("lora data files emptied",
         lambda s: [p.write_bytes(b"") for p in _lora_data_files(s)], ("lora",)),
        ("lora _METADATA deleted", lambda s: (s / "lora" / "_METADATA").unlink(), ("lora",)),
        ("lora _METADATA invalid JSON",
         lambda s: (s / "lora" / "_METADATA").write_text("{"), ("lora", "_METADATA")),
        ("lora directory deleted", lambda s: shutil.rmtree(s / "lora"), ("lora",)),
        ("lora manifest truncated",
         lambda s: _truncate(s / "lora" / "manifest.ocdbt"), ("lora", "manifest")),
        ("checksums deleted", lambda s: (s / "checksums" / "metadata").unlink(),
         ("checksums", "sha256")),
        ("checksums invalid JSON", lambda s: (s / "checksums" / "metadata").write_text("[x"),
         ("checksums", "sha256")),
        ("checksum of a leaf changed",
         lambda s: (s / "checksums" / "metadata").write_text(
             json.dumps({**json.loads((s / "checksums" / "metadata").read_text()),
                         "lora": {"up/lora_a": "0" * 64, "up/lora_b": "0" * 64,
                                  "down/lora_a": "0" * 64, "down/lora_b": "0" * 64}})),
         ("up/lora_a", "up", "sha256")),
        ("step directory emptied",
         lambda s: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(s.iterdir())],
         ("1", "step", "checkpoint")),
    ]  # fmt: skip
    for label, action, tokens in damages:
        cases.append(Case("checkpoint.restore", label, lambda d: _restore(d, w.frozen), tokens,
                          prepare=damaged(action)))  # fmt: skip
    return cases


# --- files: concurrent and closed managers, damaged array data, Hugging Face checkpoints --------


def _managers(w: World, *, async_first: bool = False) -> tuple[Any, Any]:
    directory = w.fresh_dir() / "c"
    return checkpoint.checkpoint_manager(directory, async_save=async_first), (
        checkpoint.checkpoint_manager(directory)
    )


def _two_writers(w: World, second_step: int, *, async_first: bool = False) -> Any:
    """A first manager saves step 5; a second one on the same directory, opened before that save,
    then saves ``second_step`` (its cached list of steps is empty)."""
    first, second = _managers(w, async_first=async_first)
    try:
        checkpoint.save(first, 5, w.lora, w.config)
        return checkpoint.save(second, second_step, w.lora, w.config)
    finally:
        first.close()
        second.close()


def _closed_manager(w: World, *, async_save: bool = False) -> Any:
    manager = checkpoint.checkpoint_manager(w.fresh_dir() / "c", async_save=async_save)
    checkpoint.save(manager, 1, w.lora, w.config)
    manager.close()
    return manager


_HF: dict[str, Any] = {}


def _hf_model() -> tuple[Any, dict]:
    """A tiny Llama config and params (numpy, from its tensor specs; no model is built)."""
    if not _HF:
        from flax import traverse_util

        from jaxlora.models.hf.llama import expected_tensors
        from jaxlora.models.llama import LlamaConfig

        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            rope_interleaved=False,
        )
        rng = np.random.default_rng(0)
        flat = {
            spec.path: rng.standard_normal(spec.target_shape, dtype=np.float32)
            for spec in expected_tensors(config).values()
        }
        _HF.update(config=config, params=traverse_util.unflatten_dict(flat))
    return _HF["config"], _HF["params"]


def _hf_export(w: World, shard: str = "5GB") -> pathlib.Path:
    from jaxlora.models.hf.export import save_hf

    config, params = _hf_model()
    directory = w.fresh_dir() / "model"
    save_hf(directory, config, params, max_shard_size=shard)
    return directory


def writer_cases(w: World) -> list[Case]:
    from jaxlora.models import load_hf
    from jaxlora.models.hf.export import save_hf, save_hf_merged

    save = checkpoint.save
    another = ("another checkpoint manager",)
    cases = [
        Case("checkpoint.save", "second manager saves the first's step 5",
             lambda _: _two_writers(w, 5), ("5", "step")),
        Case("checkpoint.save", "stale manager saves step 3 below the latest 5",
             lambda _: _two_writers(w, 3), ("3", "step")),
        Case("checkpoint.save", "second manager saves while an async save is in flight",
             lambda _: _two_writers(w, 6, async_first=True), another),
        Case("checkpoint.save", "save after close", lambda _: save(_closed_manager(w), 2, w.lora,
             w.config), ("closed",)),
        Case("checkpoint.save", "save after close (async manager)",
             lambda _: save(_closed_manager(w, async_save=True), 2, w.lora, w.config),
             ("closed",)),
        Case("checkpoint.restore", "restore after close",
             lambda _: checkpoint.restore(_closed_manager(w), w.frozen), ("closed",)),
        Case("checkpoint.checkpoint_manager", "delete after close",
             lambda _: _closed_manager(w).delete(1), ("closed",)),
    ]  # fmt: skip

    big = {"big": {"kernel": jnp.ones((256, 256))}}
    big_config = LoraConfig(r=2, target_modules=["big"], init_lora_weights=False)

    def big_truncated() -> pathlib.Path:
        directory = w.fresh_dir() / "ckpt"
        with checkpoint.checkpoint_manager(directory) as manager:
            save(manager, 1, jaxlora.split(big, big_config, KEY)[1], big_config)
        for path in (directory / "1" / "lora" / "ocdbt.process_0" / "d").iterdir():
            _truncate(path)
        return directory

    cases.append(Case("checkpoint.restore", "array data truncated (read by tensorstore)",
                      lambda d: _restore(d, big), ("lora",), prepare=big_truncated))  # fmt: skip

    def damaged_hf(shard: str, action: Callable[[pathlib.Path], None]) -> Callable[[], Any]:
        def prepare() -> pathlib.Path:
            directory = _hf_export(w, shard)
            action(sorted(directory.glob("model*.safetensors"))[-1])
            return directory

        return prepare

    def foreign(path: pathlib.Path) -> None:
        path.write_bytes(b"PK\x03\x04 a zip archive")

    for label, shard, action, tokens in [
        ("model.safetensors truncated", "5GB", _truncate, ("model.safetensors",)),
        ("model.safetensors not a safetensors file", "5GB", foreign, ("model.safetensors",)),
        ("a shard truncated", "8KB", _truncate, ("-of-0",)),
        ("a shard not a safetensors file", "8KB", foreign, ("-of-0",)),
    ]:
        cases.append(Case("models.load_hf", label, lambda d: load_hf(d), tokens,
                          prepare=damaged_hf(shard, action)))  # fmt: skip

    def merged(directory: Any) -> Any:
        config, params = _hf_model()
        lora_config = LoraConfig(r=2, target_modules=["q_proj"])
        frozen, lora = jaxlora.split(params, lora_config, KEY)
        return save_hf_merged(directory, config, frozen, lora, lora_config)

    cases += [
        Case("models.save_hf", "directory is a file",
             lambda path: save_hf(path, *_hf_model()), ("directory",),
             prepare=lambda: _a_file(w)),
        Case("models.save_hf", "directory=None", lambda _: save_hf(None, *_hf_model()),
             ("directory",)),
        Case("models.save_hf", "directory=5", lambda _: save_hf(5, *_hf_model()),
             ("directory",)),
        Case("models.save_hf_merged", "directory is a file", merged, ("directory",),
             prepare=lambda: _a_file(w)),
    ]  # fmt: skip
    return cases


def _exported(w: World, lora: dict | None = None) -> pathlib.Path:
    directory = w.fresh_dir() / "adapter"
    jaxlora.save_peft(directory, w.lora if lora is None else lora, w.config, w.frozen)
    return directory


def peft_cases(w: World) -> list[Case]:
    sp, lp = jaxlora.save_peft, jaxlora.load_peft
    cases = []

    def saving(**o: Any) -> Any:
        args = {"directory": w.fresh_dir() / "a", "lora": w.lora, "config": w.config,
                "frozen": w.frozen, **o}  # fmt: skip
        kw = {k: args.pop(k) for k in ("module_name", "base_model_name_or_path") if k in args}
        return sp(args["directory"], args["lora"], args["config"], args["frozen"], **kw)

    for label, value in [("None", None), ("int", 5)]:
        cases.append(
            Case(
                "save_peft",
                f"directory={label}",
                lambda _, v=value: saving(directory=v),
                ("directory",),
            )
        )
    cases.append(
        Case(
            "save_peft",
            "directory is an existing file",
            lambda _: saving(directory=_a_file(w)),
            ("directory", "file"),
        )
    )
    for label, value, tokens in broken_adapters(w, w.lora):
        cases.append(Case("save_peft", f"lora: {label}", lambda _, v=value: saving(lora=v),
                          tokens))  # fmt: skip
    cases.append(Case("save_peft", "lora=None", lambda _: saving(lora=None), ("lora",)))
    for label, value in bad_configs(w):
        cases.append(Case("save_peft", f"config={label}", lambda _, v=value: saving(config=v),
                          ("config",)))  # fmt: skip
    for label, value in bad_trees():
        cases.append(Case("save_peft", f"frozen={label}", lambda _, v=value: saving(frozen=v),
                          ("frozen", "up")))  # fmt: skip
    cases.append(Case("save_peft", "frozen of another model",
                      lambda _: saving(frozen=w.other), ("up",)))  # fmt: skip
    cases.append(
        Case(
            "save_peft",
            "config with r=4 for a rank-2 adapter",
            lambda _: saving(config=dataclasses.replace(w.config, r=4)),
            ("up", "r"),
        )
    )
    for label, value, tokens in [
        ("module_name='up'", "up", ("module_name",)),
        ("module_name returning None", lambda p, i: None, ("module_name",)),
        ("module_name returning an int", lambda p, i: 3, ("module_name",)),
        ("module_name mapping all to one name", lambda p, i: "same", ("same", "module_name")),
        ("module_name with one argument", lambda p: p, ("module_name",)),
        ("module_name returning ''", lambda p, i: "", ("module_name",)),
    ]:
        cases.append(Case("save_peft", label, lambda _, v=value: saving(module_name=v), tokens))
    cases.append(
        Case(
            "save_peft",
            "base_model_name_or_path=5",
            lambda _: saving(base_model_name_or_path=5),
            ("base_model_name_or_path",),
        )
    )

    # load_peft
    def loading(d: pathlib.Path, **o: Any) -> Any:
        frozen = o.pop("frozen", w.frozen)
        return lp(d, frozen, **o)

    cases.append(
        Case("load_peft", "missing directory", lambda _: loading(w.fresh_dir() / "nope"), ("nope",))
    )
    cases.append(Case("load_peft", "directory=None", lambda _: lp(None, w.frozen),
                      ("directory",)))  # fmt: skip
    cases.append(
        Case(
            "load_peft",
            "directory is a file",
            lambda _: loading(_a_file(w)),
            ("directory", "file", "adapter_config"),
        )
    )

    def damaged(action: Callable[[pathlib.Path], None], lora: Any = None) -> Callable[[], Any]:
        def prepare() -> pathlib.Path:
            directory = _exported(w, lora)
            action(directory)
            return directory

        return prepare

    cfg = "adapter_config.json"
    st = "adapter_model.safetensors"

    def edit(**changes: Any) -> Callable[[pathlib.Path], None]:
        def action(d: pathlib.Path) -> None:
            data = json.loads((d / cfg).read_text())
            for k, v in changes.items():
                if v is ...:
                    data.pop(k)
                else:
                    data[k] = v
            (d / cfg).write_text(json.dumps(data))

        return action

    damages = [
        ("adapter_config.json deleted", lambda d: (d / cfg).unlink(), (cfg,)),
        ("safetensors deleted", lambda d: (d / st).unlink(), (st,)),
        ("config invalid JSON", lambda d: (d / cfg).write_text("{oops"), (cfg,)),
        ("config empty", lambda d: (d / cfg).write_text(""), (cfg,)),
        ("config a JSON list", lambda d: (d / cfg).write_text("[1]"), (cfg,)),
        ("safetensors truncated", lambda d: _truncate(d / st), (st,)),
        ("safetensors emptied", lambda d: (d / st).write_bytes(b""), (st,)),
        ("safetensors garbage", lambda d: (d / st).write_bytes(b"\x00" * 64), (st,)),
        ("safetensors last bytes flipped",
         lambda d: (d / st).write_bytes((d / st).read_bytes()[:-4] + b"\xff\xfe\xfd\xfc"),
         (st, "sha256")),
        ("r=-1", edit(r=-1), ("`r`", "'r'", '"r"', "rank")),
        ("r='2'", edit(r="2"), ("`r`", "'r'", '"r"', "rank")),
        ("r=3 (tensors are rank 2)", edit(r=3), ("up", "r")),
        ("r missing (PEFT's default 8)", edit(r=...), ("`r`", "'r'", '"r"', "mis-shaped")),
        ("lora_alpha=0", edit(lora_alpha=0), ("lora_alpha",)),
        ("peft_type='IA3'", edit(peft_type="IA3"), ("peft_type", "IA3")),
        ("target_modules misspelled", edit(target_modules=["up", "dwon"]), ("dwon", "down")),
        ("target_modules=5", edit(target_modules=5), ("target_modules",)),
        ("lora_dropout=2", edit(lora_dropout=2), ("lora_dropout",)),
        ("bias='some'", edit(bias="some"), ("bias",)),
        ("fan_in_fan_out=true", edit(fan_in_fan_out=True), ("fan_in_fan_out",)),
        ("use_dora=true on a plain adapter", edit(use_dora=True), ("use_dora", "magnitude")),
        ("layer_replication set", edit(layer_replication=[[0, 1]]), ("layer_replication",)),
        ("unknown init_lora_weights", edit(init_lora_weights="olora"), ("init_lora_weights",)),
        ("rank_pattern value 0", edit(rank_pattern={"up": 0}), ("rank_pattern",)),
    ]  # fmt: skip
    for label, action, tokens in damages:
        cases.append(Case("load_peft", label, lambda d: loading(d), tokens,
                          prepare=damaged(action)))  # fmt: skip
    cases += [
        Case("load_peft", "frozen of another model", lambda d: loading(d, frozen=w.other),
             ("up",), prepare=damaged(lambda d: None)),
        Case("load_peft", "frozen=None", lambda d: loading(d, frozen=None), ("frozen", "up"),
             prepare=damaged(lambda d: None)),
        Case("load_peft", "frozen missing 'down'",
             lambda d: loading(d, frozen=with_leaf(w.frozen, ["down"], ...)), ("down",),
             prepare=damaged(lambda d: None)),
        Case("load_peft", "frozen kernel transposed",
             lambda d: loading(d, frozen=with_leaf(w.frozen, ["up", "kernel"], jnp.ones((6, 4)))),
             ("up",), prepare=damaged(lambda d: None)),
        Case("load_peft", "dtype='int8'", lambda d: loading(d, dtype="int8"), ("dtype",),
             prepare=damaged(lambda d: None)),
        Case("load_peft", "dtype='floaty'", lambda d: loading(d, dtype="floaty"), ("dtype",),
             prepare=damaged(lambda d: None)),
        Case("load_peft", "layouts={'up': 'xx'}", lambda d: loading(d, layouts={"up": "xx"}),
             ("layouts",), prepare=damaged(lambda d: None)),
        Case("load_peft", "layouts=5", lambda d: loading(d, layouts=5), ("layouts",),
             prepare=damaged(lambda d: None)),
        Case("load_peft", "module_name mapping to other names",
             lambda d: loading(d, module_name=lambda p, i: "model." + p.replace("/", ".")),
             ("model.up", "up"), prepare=damaged(lambda d: None)),
        Case("load_peft", "module_name='up'", lambda d: loading(d, module_name="up"),
             ("module_name",), prepare=damaged(lambda d: None)),
    ]  # fmt: skip
    return cases


def _a_file(w: World) -> pathlib.Path:
    path = w.fresh_dir() / "file.txt"
    path.write_text("not a directory")
    return path


# --- many adapters, quantisation, PiSSA -----------------------------------------------------------


def adapter_cases(w: World) -> list[Case]:
    bank_fn = jaxlora.AdapterBank
    cases = []
    for label, value in bad_trees():
        cases.append(Case("adapters.AdapterBank", f"frozen={label}",
                          lambda _, v=value: bank_fn(v).add("a", w.lora, w.config),
                          ("frozen", "up")))  # fmt: skip

    def bank() -> jaxlora.AdapterBank:
        b = bank_fn(w.frozen)
        b.add("fr", w.lora, w.config)
        return b

    rows = [
        ("add: name=None", lambda _: bank().add(None, w.lora, w.config), ("name",)),
        ("add: name=5", lambda _: bank().add(5, w.lora, w.config), ("name",)),
        ("add: name=''", lambda _: bank().add("", w.lora, w.config), ("name",)),
        ("add: another model's adapter", lambda _: bank().add("x", w.other_lora, w.other_config),
         ("encoder", "query")),
        ("add: lora_a transposed",
         lambda _: bank().add("x", with_leaf(w.lora, ["up", "lora_a"], w.lora["up"]["lora_a"].T),
                              w.config), ("up",)),
        ("add: config=None", lambda _: bank().add("x", w.lora, None), ("config",)),
        ("add: config a dict", lambda _: bank().add("x", w.lora, w.config.to_dict()),
         ("config",)),
        ("add: config r=4 for rank 2", lambda _: bank().add("x", w.lora,
                                                          dataclasses.replace(w.config, r=4)),
         ("up", "r")),
        ("add: lora=None", lambda _: bank().add("x", None, w.config), ("lora",)),
        ("get: unknown name", lambda _: bank().get("de"), ("de", "fr")),
        ("params: unknown name", lambda _: bank().params("de"), ("de", "fr")),
        ("params: name=5", lambda _: bank().params(5), ("5", "fr", "name")),
        ("remove: unknown name", lambda _: bank().remove("de"), ("de", "fr")),
        ("add_weighted: unknown name", lambda _: bank().add_weighted({"de": 1.0}), ("de", "fr")),
        ("add_weighted: weights a list", lambda _: bank().add_weighted(["fr"]), ("weights",)),
        ("add_weighted: empty weights", lambda _: bank().add_weighted({}), ("weights", "adapter")),
    ]  # fmt: skip
    cases += [Case("adapters.AdapterBank", label, run, tokens) for label, run, tokens in rows]

    aw = adapters.add_weighted
    one = [(w.lora, w.config, 1.0)]
    rows = [
        ("method='avg'", lambda _: aw(w.frozen, one, method="avg"), ("method",)),
        ("method='SVD'", lambda _: aw(w.frozen, one, method="SVD"), ("method",)),
        ("method=None", lambda _: aw(w.frozen, one, method=None), ("method",)),
        ("adapters=[]", lambda _: aw(w.frozen, []), ("adapters", "adapter")),
        ("adapters=None", lambda _: aw(w.frozen, None), ("adapters",)),
        ("adapters a bare lora", lambda _: aw(w.frozen, w.lora), ("adapters",)),
        ("pair instead of triple", lambda _: aw(w.frozen, [(w.lora, w.config)]), ("adapters",)),
        ("weight nan", lambda _: aw(w.frozen, [(w.lora, w.config, NAN)]), ("weight",)),
        ("weight inf", lambda _: aw(w.frozen, [(w.lora, w.config, INF)]), ("weight",)),
        ("weight '1'", lambda _: aw(w.frozen, [(w.lora, w.config, "1")]), ("weight",)),
        ("weight None", lambda _: aw(w.frozen, [(w.lora, w.config, None)]), ("weight",)),
        ("rank=0", lambda _: aw(w.frozen, one, method="svd", rank=0), RANK),
        ("rank=-1", lambda _: aw(w.frozen, one, method="svd", rank=-1), RANK),
        ("rank=1.5", lambda _: aw(w.frozen, one, method="svd", rank=1.5), RANK),
        ("rank='2'", lambda _: aw(w.frozen, one, method="svd", rank="2"), RANK),
        ("rank with method='cat'", lambda _: aw(w.frozen, one, method="cat", rank=3), RANK),
        ("config=None", lambda _: aw(w.frozen, [(w.lora, None, 1.0)]), ("config",)),
        ("another model's adapter", lambda _: aw(w.frozen, [(w.other_lora, w.other_config, 1.0)]),
         ("encoder", "query")),
        ("different bias modes",
         lambda _: aw(w.frozen, [*one, (w.lora, dataclasses.replace(w.config, bias="all"), 1.0)]),
         ("bias",)),
        ("frozen=None", lambda _: aw(None, one), ("frozen", "up")),
        ("lora_a transposed",
         lambda _: aw(w.frozen, [(with_leaf(w.lora, ["up", "lora_a"], w.lora["up"]["lora_a"].T),
                                  w.config, 1.0)]), ("up",)),
    ]  # fmt: skip
    cases += [Case("adapters.add_weighted", label, run, tokens) for label, run, tokens in rows]

    stacked = adapters.stack([w.lora, w.lora])
    am = adapters.apply_mixed
    x = w.x
    rows = [
        ("index 2-D", lambda _: am(w.model, w.frozen, stacked, w.config, jnp.zeros((3, 1), int), x),
         ("index",)),
        ("index wrong length", lambda _: am(w.model, w.frozen, stacked, w.config,
                                            jnp.zeros(2, int), x), ("index",)),
        ("index float", lambda _: am(w.model, w.frozen, stacked, w.config, jnp.zeros(3), x),
         ("index",)),
        ("index out of range (5 of 2)",
         lambda _: am(w.model, w.frozen, stacked, w.config, jnp.full(3, 5), x), ("index",)),
        ("index negative", lambda _: am(w.model, w.frozen, stacked, w.config, jnp.full(3, -1), x),
         ("index",)),
        ("index=None", lambda _: am(w.model, w.frozen, stacked, w.config, None, x), ("index",)),
        ("unstacked adapter", lambda _: am(w.model, w.frozen, w.lora, w.config,
                                           jnp.zeros(3, int), x), ("stacked", "up", "down")),
        ("config=None", lambda _: am(w.model, w.frozen, stacked, None, jnp.zeros(3, int), x),
         ("config",)),
        ("model=None", lambda _: am(None, w.frozen, stacked, w.config, jnp.zeros(3, int), x),
         ("model",)),
        ("no inputs", lambda _: am(w.model, w.frozen, stacked, w.config, jnp.zeros(3, int)),
         ("input", "args", "index")),
    ]  # fmt: skip
    cases += [Case("adapters.apply_mixed", label, run, tokens) for label, run, tokens in rows]

    sk, us = adapters.stack, adapters.unstack
    rows = [
        ("stack([])", lambda _: sk([]), ("adapters",)),
        ("stack(None)", lambda _: sk(None), ("adapters",)),
        ("stack a bare lora", lambda _: sk(w.lora), ("adapters",)),
        ("stack different shapes",
         lambda _: sk([w.lora, with_leaf(w.lora, ["up", "lora_a"], jnp.ones((4, 3)))]), ("up",)),
        ("stack different structures", lambda _: sk([w.lora, w.other_lora]),
         ("structure", "encoder", "up")),
        ("stack different dtypes",
         lambda _: sk([w.lora, jax.tree.map(lambda a: a.astype(jnp.bfloat16), w.lora)]),
         ("dtype", "up")),
        ("unstack({})", lambda _: us({}), ("stacked",)),
        ("unstack(None)", lambda _: us(None), ("stacked",)),
        ("unstack leading axes differ",
         lambda _: us({"up": {"lora_a": jnp.ones((2, 4, 2)), "lora_b": jnp.ones((3, 2, 6))}}),
         ("stacked", "leading")),
        ("unstack scalar leaves", lambda _: us({"up": {"lora_a": jnp.ones(())}}),
         ("stacked", "up")),
    ]  # fmt: skip
    cases += [Case("adapters.stack/unstack", label, run, tokens) for label, run, tokens in rows]

    pr, sb = adapters.pad_rank, adapters.scale_b
    rows = [
        ("pad_rank rank=1 below 2", lambda _: pr(w.frozen, w.lora, w.config, 1), RANK),
        ("pad_rank rank=0", lambda _: pr(w.frozen, w.lora, w.config, 0), RANK),
        ("pad_rank rank='4'", lambda _: pr(w.frozen, w.lora, w.config, "4"), RANK),
        ("pad_rank rank=2.5", lambda _: pr(w.frozen, w.lora, w.config, 2.5), RANK),
        ("pad_rank rank=None", lambda _: pr(w.frozen, w.lora, w.config, None), RANK),
        ("pad_rank config=None", lambda _: pr(w.frozen, w.lora, None, 4), ("config",)),
        ("pad_rank another model's adapter",
         lambda _: pr(w.frozen, w.other_lora, w.config, 4), ("encoder", "query")),
        ("scale_b multiplier of another structure",
         lambda _: sb(w.lora, {"ghost": {"lora_b": 2.0}}), ("multiplier", "ghost", "up")),
        ("scale_b multiplier=None", lambda _: sb(w.lora, None), ("multiplier",)),
        ("scale_b lora=None", lambda _: sb(None, {"up": {"lora_b": 1.0}}), ("lora",)),
        ("scale_b multiplier a string leaf",
         lambda _: sb(w.lora, {"up": {"lora_b": "x"}, "down": {"lora_b": 1.0}}),
         ("multiplier", "up")),
    ]  # fmt: skip
    cases += [Case("adapters.pad_rank/scale_b", label, run, tokens) for label, run, tokens in rows]
    return cases


def quant_cases(w: World) -> list[Case]:
    q = quant.quantize
    p = w.qparams
    rows = [
        ("method='nf5'", lambda _: q(p, ["up"], "nf5"), ("method",)),
        ("method='NF4'", lambda _: q(p, ["up"], "NF4"), ("method",)),
        ("method=None", lambda _: q(p, ["up"], None), ("method",)),
        ("method='int4'", lambda _: q(p, ["up"], "int4"), ("method",)),
        ("block_size=0", lambda _: q(p, ["up"], "nf4", block_size=0), ("block_size",)),
        ("block_size=-64", lambda _: q(p, ["up"], "nf4", block_size=-64), ("block_size",)),
        ("block_size=63", lambda _: q(p, ["up"], "nf4", block_size=63), ("block_size",)),
        ("block_size=3.5", lambda _: q(p, ["up"], "nf4", block_size=3.5), ("block_size",)),
        ("block_size='64'", lambda _: q(p, ["up"], "nf4", block_size="64"), ("block_size",)),
        ("block_size=128 for q4_1 (fixed 32)",
         lambda _: q(p, ["up"], "q4_1", block_size=128), ("block_size",)),
        ("double_quant with int8", lambda _: q(p, ["up"], "int8", double_quant=True),
         ("double_quant",)),
        ("double_quant='yes'", lambda _: q(p, ["up"], "nf4", double_quant="yes"),
         ("double_quant",)),
        ("targets matching nothing", lambda _: q(p, ["query"], "nf4"), ("query", "target")),
        ("targets regex matching nothing", lambda _: q(p, "enc.*", "nf4"), ("enc", "target")),
        ("targets=[]", lambda _: q(p, [], "nf4"), ("targets", "target_modules")),
        ("targets=5", lambda _: q(p, 5, "nf4"), ("targets", "target_modules")),
        ("targets=None", lambda _: q(p, None, "nf4"), ("targets", "target_modules")),
        ("params=None", lambda _: q(None, ["up"], "nf4"), ("params", "target_modules")),
        ("params of another model", lambda _: q(w.other, ["up"], "nf4"), ("up",)),
        ("int32 kernel", lambda _: q({"up": {"kernel": jnp.ones((64, 64), int)}}, ["up"], "nf4"),
         ("up",)),
        ("kernel as list", lambda _: q({"up": {"kernel": [[1.0] * 64] * 64}}, ["up"], "nf4"),
         ("up",)),
        ("already quantised", lambda _: q(q(p, ["up"], "nf4"), ["up"], "nf4"), ("up",)),
        ("NaN in a kernel",
         lambda _: q({"up": {"kernel": jnp.full((64, 64), NAN)}}, ["up"], "nf4"), ("up", "NaN")),
    ]  # fmt: skip
    return [Case("quant.quantize", label, run, tokens) for label, run, tokens in rows]


def pissa_cases(w: World) -> list[Case]:
    ps = inits.pissa_split
    rows = [
        ("niter=-1", lambda _: ps(w.params, w.config, KEY, niter=-1), ("niter",)),
        ("niter='4'", lambda _: ps(w.params, w.config, KEY, niter="4"), ("niter",)),
        ("niter=1.5", lambda _: ps(w.params, w.config, KEY, niter=1.5), ("niter",)),
        ("niter=nan", lambda _: ps(w.params, w.config, KEY, niter=NAN), ("niter",)),
        ("params=None", lambda _: ps(None, w.config, KEY), ("params", "target_modules")),
        ("params of another model", lambda _: ps(w.other, w.config, KEY), ("target_modules",)),
        ("config=None", lambda _: ps(w.params, None, KEY), ("config",)),
        ("config a dict", lambda _: ps(w.params, w.config.to_dict(), KEY), ("config",)),
        ("key=None", lambda _: ps(w.params, w.config, None), ("key",)),
        ("key='key'", lambda _: ps(w.params, w.config, "key"), ("key",)),
        ("quantised base", lambda _: ps(quant.quantize(w.qparams, ["up"], "nf4"),
                                        LoraConfig(r=2, target_modules=["up"]), KEY), ("up",)),
        ("int32 kernel",
         lambda _: ps(with_leaf(w.params, ["up", "kernel"], jnp.ones((4, 6), int)), w.config, KEY),
         ("up",)),
        ("NaN kernel",
         lambda _: ps(with_leaf(w.params, ["up", "kernel"], jnp.full((4, 6), NAN)), w.config, KEY),
         ("up", "NaN", "finite")),
    ]  # fmt: skip
    return [Case("inits.pissa_split", label, run, tokens) for label, run, tokens in rows]


# --- surfaces added since the first battery: token ids, HF loading, mutable, variants, LoRA+ ------


def _tiny_llama() -> tuple[Any, Any, Any]:
    """A tiny Llama, its config and abstract params (every case here fails before computing)."""
    from jaxlora.models import llama

    config = llama.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
                               num_heads=2, num_kv_heads=1, head_dim=4)  # fmt: skip
    model = llama.LlamaForCausalLM(config)
    params = jax.eval_shape(model.init, KEY, jnp.ones((1, 2), jnp.int32))["params"]
    return model, config, params


def token_id_cases(w: World) -> list[Case]:
    from jaxlora.models import BertConfig, BertEncoder, generate, left_pad, llama

    model, config, params = _tiny_llama()
    real = {"params": params}

    def gen(prompts: Any, **o: Any) -> Any:
        return generate(model, params, prompts, max_new_tokens=1, **o)

    bert = BertEncoder(BertConfig(vocab_size=10, hidden_size=4, num_layers=1, num_heads=1,
                                  intermediate_size=4, max_position_embeddings=4))  # fmt: skip
    bert_vars = jax.eval_shape(bert.init, KEY, jnp.ones((1, 2), jnp.int32))
    rows = [
        ("generate", "prompt id = vocab size", lambda _: gen([[1, 32]]), ("prompts", "32")),
        ("generate", "prompt id negative", lambda _: gen([[1, -4]]), ("prompts",)),
        ("generate", "array prompt id 99", lambda _: gen(np.array([[1, 2], [3, 99]])),
         ("prompts",)),
        ("generate", "prompt id 2**32+3 (wraps in int32)", lambda _: gen([[2**32 + 3]]),
         ("prompts",)),
        ("generate", "pad_id = vocab size", lambda _: gen([[1]], pad_id=32), ("pad_id",)),
        ("generate", "pad_id=-1", lambda _: gen([[1]], pad_id=-1), ("pad_id",)),
        ("generate", "stop token past the vocabulary", lambda _: gen([[1]], stop_tokens=[40]),
         ("stop_tokens",)),
        ("generate", "stop_tokens='2'", lambda _: gen([[1]], stop_tokens="2"), ("stop_tokens",)),
        ("left_pad", "negative id", lambda _: left_pad([[3, -1]]), ("prompts",)),
        ("left_pad", "pad_id=0.5", lambda _: left_pad([[3]], pad_id=0.5), ("pad_id",)),
        ("LlamaForCausalLM", "input id = vocab size",
         lambda _: model.apply(real, np.array([[1, 32]])), ("input_ids",)),
        ("LlamaForCausalLM", "input id negative",
         lambda _: model.apply(real, np.array([[-1, 2]])), ("input_ids",)),
        ("llama.generate", "prompt id past the vocabulary",
         lambda _: llama.generate(params, config, [1, 77], 1), ("prompt_ids",)),
        ("llama.generate", "eos_id past the vocabulary",
         lambda _: llama.generate(params, config, [1, 2], 1, eos_id=32), ("eos_id",)),
        ("llama.generate", "max_new_tokens=2.0",
         lambda _: llama.generate(params, config, [1, 2], 2.0), ("max_new_tokens",)),
        ("BertEncoder", "input id = vocab size",
         lambda _: bert.apply(bert_vars, np.array([[1, 10]])), ("input_ids",)),
        ("BertEncoder", "token type 2 of 2",
         lambda _: bert.apply(bert_vars, np.array([[1, 2]]), token_type_ids=np.array([[0, 2]])),
         ("token_type_ids",)),
        ("BertEncoder", "longer than max_position_embeddings",
         lambda _: bert.apply(bert_vars, np.ones((1, 5), np.int32)),
         ("max_position_embeddings", "input_ids")),
    ]  # fmt: skip
    return [Case(f"models.{func}", label, run, tokens) for func, label, run, tokens in rows]


def _hf_directory(w: World, quantised: str | None = None) -> pathlib.Path:
    """A tiny Llama checkpoint written with numpy (no torch); ``quantised`` names a tensor
    stored as int8."""
    from safetensors.numpy import save_file

    from jaxlora.models.hf import llama as hf_llama
    from jaxlora.models.hf import llama_export

    _, config, _ = _tiny_llama()
    config = dataclasses.replace(config, rope_interleaved=False)
    directory = w.fresh_dir()
    (directory / "config.json").write_text(json.dumps(llama_export.config_to_hf(config)))
    tensors = {name: np.full(spec.shape, 0.25, np.float32)
               for name, spec in hf_llama.expected_tensors(config).items()}  # fmt: skip
    if quantised:
        tensors[quantised] = tensors[quantised].astype(np.int8)
    save_file(tensors, directory / "model.safetensors")
    return directory


def hf_cases(w: World) -> list[Case]:
    from jaxlora.models import load_hf, save_hf
    from jaxlora.models.hf import gemma as hf_gemma
    from jaxlora.models.hf import llama as hf_llama

    q_proj = "model.layers.0.self_attn.q_proj.weight"
    cases = [
        Case("models.load_hf", f"dtype={label}", lambda d, v=value: load_hf(d, dtype=v),
             ("dtype",), prepare=lambda: _hf_directory(w))
        for label, value in [("jnp.int8", jnp.int8), ("'int32'", "int32"), ("bool", bool),
                             ("'bf16x'", "bf16x"), ("jnp.uint8", jnp.uint8)]
    ]  # fmt: skip
    cases += [
        Case("models.load_hf_llama", "dtype=int8",
             lambda d: hf_llama.load_hf_llama(d, dtype="int8"), ("dtype",),
             prepare=lambda: _hf_directory(w)),
        Case("models.load_hf_gemma", "dtype=int8",
             lambda _: hf_gemma.load_hf_gemma(w.tmp / "none", dtype="int8"), ("dtype",)),
        Case("models.load_hf", "int8 tensor under a weight's name", load_hf, (q_proj,),
             prepare=lambda: _hf_directory(w, q_proj)),
    ]  # fmt: skip

    def int_params() -> tuple[Any, dict]:
        from jaxlora.models.hf import llama as hf_llama

        _, config, _ = _tiny_llama()
        config = dataclasses.replace(config, rope_interleaved=False)
        params: dict = {}
        for spec in hf_llama.expected_tensors(config).values():
            node = params
            for key in spec.path[:-1]:
                node = node.setdefault(key, {})
            node[spec.path[-1]] = np.zeros(spec.target_shape, np.float32)
        params["layers_0"]["mlp"]["up_proj"]["kernel"] = np.zeros((8, 16), np.int8)
        return config, params

    from jaxlora.models import generate, llama
    from jaxlora.models.bert import weights as bert_weights

    model, config, params = _tiny_llama()
    leaf = jax.eval_shape(lambda: quant.quantize_kernel(jnp.ones((16, 16)), "int8"))
    cases += [
        Case("models.generate", "cache_dtype=int8",
             lambda _: generate(model, params, [[1]], max_new_tokens=1, cache_dtype=jnp.int8),
             ("cache_dtype",)),
        Case("models.init_cache", "dtype='int32'",
             lambda _: llama.init_cache(config, 1, 4, "int32"), ("dtype",)),
        Case("quant.dequantize", "dtype=int8", lambda _: quant.dequantize(leaf, jnp.int8),
             ("dtype",)),
        Case("quant.dequantize_tree", "dtype='bool'",
             lambda _: quant.dequantize_tree({"k": leaf}, "bool"), ("dtype",)),
        Case("models.bert.hf_state_dict_to_params", "an int8 weight",
             lambda _: bert_weights.hf_state_dict_to_params(
                 {"embeddings.word_embeddings.weight": np.zeros((10, 4), np.int8)}, {}),
             ("embeddings.word_embeddings.weight",)),
    ]  # fmt: skip
    cases.append(Case("models.save_hf", "an int8 kernel",
                      lambda p: save_hf(w.fresh_dir() / "out", *p), ("up_proj", "params"),
                      prepare=int_params))  # fmt: skip
    return cases


class NnxNormed(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.up(x))


def mutable_cases(w: World) -> list[Case]:
    ap = jaxlora.apply
    config = LoraConfig(r=2, target_modules=["up"])
    graphdef, state = nnx.split(NnxNormed(nnx.Rngs(0)))
    frozen, lora = jaxlora.split(state, config, KEY)

    def nnx_call(mutable: Any) -> Any:
        return ap(graphdef, frozen, lora, config, w.x, mutable=mutable)

    def linen_call(mutable: Any) -> Any:
        return ap(w.model, w.frozen, w.lora, w.config, w.x, mutable=mutable)

    rows = [
        ("NNX mutable='batchstats' (typo)", lambda _: nnx_call("batchstats"),
         ("mutable", "batch_stats")),
        ("NNX mutable=['batch_stats', 'cache'] (no cache)",
         lambda _: nnx_call(["batch_stats", "cache"]), ("mutable", "cache")),
        ("NNX mutable=nnx.Param", lambda _: nnx_call(nnx.Param), ("mutable", "Param")),
        ("NNX mutable=nnx.Intermediate (never sown)", lambda _: nnx_call(nnx.Intermediate),
         ("mutable",)),
        ("NNX model without BatchNorm, mutable='batch_stats'",
         lambda _: ap(w.graphdef, w.nnx_frozen, w.nnx_lora, w.config, w.x,
                      mutable="batch_stats"), ("mutable",)),
        ("linen mutable=['batchstats'] (typo)", lambda _: linen_call(["batchstats"]),
         ("mutable",)),
        ("linen mutable='intermediate' (never sown)", lambda _: linen_call("intermediate"),
         ("mutable",)),
    ]  # fmt: skip
    return [Case("apply(mutable=)", label, run, tokens) for label, run, tokens in rows]


def variant_cases(w: World) -> list[Case]:
    from jaxlora import variants

    def probe(**fields: Any) -> Any:
        declared = {"name": "probe", "extra_leaves": ("lora_probe",), "fusable": False, **fields}
        return type("Probe", (type(variants.DORA),), declared)()

    def register(**fields: Any) -> Any:
        variant = variants.register(probe(**fields))
        variants.unregister(variant.name)  # reached only when accepted: leave the registry be
        return variant

    rows = [
        ("extra_leaves=('lora_b',)", {"extra_leaves": ("lora_b",)}, ("extra_leaves", "lora_b")),
        ("extra_leaves=('lora_a', 'g')", {"extra_leaves": ("lora_a", "g")},
         ("extra_leaves", "lora_a")),
        ("extra_leaves=('bias',)", {"extra_leaves": ("bias",)}, ("extra_leaves", "bias")),
        ("extra_leaves=('kernel',)", {"extra_leaves": ("kernel",)}, ("extra_leaves", "kernel")),
        ("extra_leaves=('embedding',)", {"extra_leaves": ("embedding",)},
         ("extra_leaves", "embedding")),
        ("extra_leaves='scale' (a str)", {"extra_leaves": "scale"}, ("extra_leaves",)),
        ("extra_leaves=('g', 'g')", {"extra_leaves": ("g", "g")}, ("extra_leaves",)),
        ("extra_leaves=('g', 3)", {"extra_leaves": ("g", 3)}, ("extra_leaves",)),
        ("extra_leaves=('lora_magnitude',) (DoRA's)", {"extra_leaves": ("lora_magnitude",)},
         ("lora_magnitude", "dora")),
        ("name=''", {"name": ""}, ("name",)),
        ("name=None", {"name": None}, ("name",)),
        ("name='dora' (taken)", {"name": "dora"}, ("dora",)),
        ("fusable='yes'", {"fusable": "yes"}, ("fusable",)),
    ]  # fmt: skip
    cases = [Case("variants.register", label, lambda _, f=fields: register(**f), tokens)
             for label, fields, tokens in rows]  # fmt: skip
    cases += [
        Case("variants.register", "a class, not an instance",
             lambda _: variants.register(type(probe())), ("variant",)),
        Case("variants.unregister", "'lora' (built in)", lambda _: variants.unregister("lora"),
             ("lora", "name")),
        Case("variants.unregister", "'dora' (built in)", lambda _: variants.unregister("dora"),
             ("dora", "name")),
    ]  # fmt: skip
    return cases


def loraplus_cases(w: World) -> list[Case]:
    from jaxlora import loraplus

    def lp(**o: Any) -> Any:
        return loraplus.loraplus(**{"optimizer_factory": optax.sgd, "lr": 0.1, **o})

    rows = [
        ("ratio=nan", {"ratio": NAN}, ("ratio",)),
        ("ratio=inf", {"ratio": INF}, ("ratio",)),
        ("ratio=0", {"ratio": 0.0}, ("ratio",)),
        ("ratio=-4", {"ratio": -4}, ("ratio",)),
        ("ratio='16'", {"ratio": "16"}, ("ratio",)),
        ("ratio=None", {"ratio": None}, ("ratio",)),
        ("lr=nan", {"lr": NAN}, ("lr",)),
        ("lr=inf", {"lr": INF}, ("lr",)),
        ("lr=-1e-3", {"lr": -1e-3}, ("lr",)),
        ("lr=0", {"lr": 0.0}, ("lr",)),
        ("lr='1e-3'", {"lr": "1e-3"}, ("lr",)),
        ("lr=None", {"lr": None}, ("lr",)),
        ("embedding_lr=nan", {"embedding_lr": NAN}, ("embedding_lr",)),
        ("embedding_lr=-1", {"embedding_lr": -1.0}, ("embedding_lr",)),
        ("embedding_paths='emb' (a str)", {"embedding_paths": "emb"}, ("embedding_paths",)),
        ("embedding_paths=[3]", {"embedding_paths": [3]}, ("embedding_paths",)),
        ("embedding_paths=5", {"embedding_paths": 5}, ("embedding_paths",)),
        ("optimizer_factory=optax.sgd(0.1) (a transformation)",
         {"optimizer_factory": optax.sgd(0.1)}, ("optimizer_factory",)),
    ]  # fmt: skip
    cases = [Case("loraplus.loraplus", label, lambda _, o=o: lp(**o), tokens)
             for label, o, tokens in rows]  # fmt: skip
    cases.append(Case("loraplus.loraplus", "embedding_paths naming no module (init)",
                      lambda _: lp(embedding_paths=["emb"]).init(w.lora),
                      ("embedding_paths", "emb")))  # fmt: skip
    return cases


def all_cases(w: World) -> list[Case]:
    return [
        *config_cases(w),
        *split_cases(w),
        *merge_like_cases(w, "merge", jaxlora.merge),
        *merge_like_cases(w, "unmerge", jaxlora.unmerge),
        *unmerge_extra(w),
        *apply_cases(w),
        *count_cases(w),
        *combine_partition_cases(w),
        *delta_cases(w),
        *freeze_mask_cases(w),
        *find_infer_cases(w),
        *sharding_cases(w),
        *checkpoint_cases(w),
        *writer_cases(w),
        *peft_cases(w),
        *adapter_cases(w),
        *quant_cases(w),
        *pissa_cases(w),
        *token_id_cases(w),
        *hf_cases(w),
        *mutable_cases(w),
        *variant_cases(w),
        *loraplus_cases(w),
    ]


# --- running and reporting ------------------------------------------------------------------------


def _message(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    notes = getattr(exc, "__notes__", None)
    if notes:
        text += " " + " ".join(notes)
    return text


def names_a_token(text: str, tokens: Sequence[str]) -> bool:
    """Whether ``text`` holds a token: an identifier as a whole word (``up`` is not in
    ``update``), anything else as a substring."""
    for token in tokens:
        if re.fullmatch(r"\w+", token):
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(token)}(?![A-Za-z0-9])", text):
                return True
        elif token in text:
            return True
    return False


def run_case(case: Case) -> Outcome:
    tokens = list(case.tokens)
    try:
        prepared = case.prepare() if case.prepare else None
    except Exception as exc:  # noqa: BLE001 - a bug of this script, reported apart
        return Outcome(case.func, case.name, "harness", type(exc).__name__, _message(exc), tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = case.run(prepared)
            jax.block_until_ready(result) if _is_arrays(result) else None
        except Exception as exc:  # noqa: BLE001 - classifying any exception is the point
            text = _message(exc)
            named = names_a_token(text, case.tokens)
            outcome = "clear" if isinstance(exc, CLEAR_TYPES) and named else "obscure"
            return Outcome(case.func, case.name, outcome, type(exc).__name__, text, tokens)
    said = "; ".join(sorted({str(c.message)[:100] for c in caught}))
    text = "returned without error" + (f" (warnings: {said})" if said else "")
    return Outcome(case.func, case.name, "silent", None, text, tokens)


def _is_arrays(result: Any) -> bool:
    try:
        leaves = jax.tree.leaves(result)
    except Exception:  # noqa: BLE001
        return False
    return bool(leaves) and all(isinstance(x, jax.Array) for x in leaves)


def quick_subset(cases: list[Case], size: int = 40) -> list[Case]:
    """About ``size`` cases spread over every function, skipping the slow file-damage ones."""
    by_func: dict[str, list[Case]] = {}
    for case in cases:
        by_func.setdefault(case.func, []).append(case)
    pools = [[c for c in group if c.prepare is None][::3] for group in by_func.values()]
    picked: list[Case] = []
    for depth in range(max(map(len, pools))):
        picked += [pool[depth] for pool in pools if depth < len(pool)]
        if len(picked) >= size:
            break
    return picked[:size]


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    counted = [o for o in outcomes if o.outcome != "harness"]
    table: dict[str, dict[str, int]] = {}
    for o in counted:
        row = table.setdefault(o.func, {"cases": 0, "clear": 0, "obscure": 0, "silent": 0})
        row["cases"] += 1
        row[o.outcome] += 1
    n = len(counted)
    pct = {k: (100.0 * sum(o.outcome == k for o in counted) / n if n else math.nan)
           for k in ("clear", "obscure", "silent")}  # fmt: skip
    return {"cases": n, "percent": pct, "by_function": table,
            "harness_errors": len(outcomes) - n}  # fmt: skip


def print_report(summary: dict[str, Any], outcomes: list[Outcome], seconds: float) -> None:
    width = max(len(f) for f in summary["by_function"]) + 2
    print(f"{'function':<{width}}{'cases':>6}{'clear':>7}{'obscure':>9}{'silent':>8}")
    for func, row in summary["by_function"].items():
        print(f"{func:<{width}}{row['cases']:>6}{row['clear']:>7}{row['obscure']:>9}"
              f"{row['silent']:>8}")  # fmt: skip
    pct = summary["percent"]
    print(
        f"\n{summary['cases']} cases in {seconds:.1f} s: {pct['clear']:.1f}% clear, "
        f"{pct['obscure']:.1f}% obscure, {pct['silent']:.1f}% silent"
    )
    for kind in ("obscure", "silent", "harness"):
        listed = [o for o in outcomes if o.outcome == kind]
        if not listed:
            continue
        print(f"\n{kind.upper()} ({len(listed)}):")
        for o in listed:
            exc = f"{o.exception}: " if o.exception else ""
            text = " ".join(o.message.split())[:150]
            print(f"  [{o.func}] {o.name} -> {exc}{text}  (tokens {o.tokens})")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~40-case subset (< 30 s)")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help=f"JSON path (default {RESULTS} for the full run, none for --quick)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    start = time.perf_counter()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="jaxlora_bad_inputs_"))
    try:
        with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
            world = build_world(tmp)
            cases = all_cases(world)
            if args.quick:
                cases = quick_subset(cases)
            outcomes = [run_case(case) for case in cases]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    summary = summarise(outcomes)
    print_report(summary, outcomes, seconds)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    result = {
        **summary,
        "quick": args.quick,
        "seconds": round(seconds, 1),
        "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
        "outcomes": [dataclasses.asdict(o) for o in outcomes],
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    np.set_printoptions(threshold=20)
    main()
