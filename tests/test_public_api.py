"""Every public callable refuses wrong arguments at entry, found without anyone listing them.

The public callables are enumerated from the ``__all__`` of ``jaxlora``, its public submodules and
``jaxlora.models`` (functions, classes and their public methods). Each must have a valid call in
tests/public_api_calls.py; then each parameter in turn is replaced by every wrong value that its
annotation rules out (None where None is no default, a wrong type, a str for a sequence, NaN, ±inf,
a negative number, zero, an empty list or string, an unknown name, an empty array, a dict for a
config, ...). The call must raise a ValueError or TypeError whose message names the parameter,
unless ``ALLOWED`` holds a reason why that value is right there. A new public function without a
valid call fails ``test_every_public_callable_has_a_valid_call``; a new parameter without a check
fails its callable's test; an allow-list entry that is no longer needed fails as stale.

Nothing here compiles a model: wrong values must fail before any work starts (``stop`` in the
table stands in for the work of the few callables that would run a model).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import pytest

from tests import public_api_calls as calls

MODULES = (
    "jaxlora",
    *(
        f"jaxlora.{name}"
        for name in (
            "adapters analysis checkpoint inits loraplus peft quant remat sharding variants"
        ).split()
    ),
    "jaxlora.models",
    *(f"jaxlora.models.{name}" for name in "decoding gemma llama shapes".split()),
)
NAN, INF = float("nan"), float("inf")

#: The catalogue of wrong values, by kind. Factories, so arrays are made afresh.
WRONG: dict[str, Callable[[], Any]] = {
    "None": lambda: None,
    "str": lambda: "x",
    "str_false": lambda: "False",
    "int": lambda: 3,
    "float": lambda: 1.5,
    "nan": lambda: NAN,
    "inf": lambda: INF,
    "-inf": lambda: -INF,
    "negative_int": lambda: -1,
    "negative_float": lambda: -1.0,
    "zero": lambda: 0,
    "empty_str": lambda: "",
    "unknown_name": lambda: "no-such-name",
    "str_for_sequence": lambda: "ab",
    "empty_list": lambda: [],
    "list_of_int": lambda: [1],
    "list_for_dict": lambda: [1.0],
    "dict_config": lambda: calls.CONFIG.to_dict(),
    "empty_array": lambda: jnp.zeros((0,)),
    "float_array": lambda: jnp.ones((2,)),
}

RECORD = "a record the library builds and returns (and jax rebuilds as a pytree with tracers)"
LINEN = "a flax linen Module: its config is a checked dataclass; methods run inside init/apply"
ABSTRACT = "an abstract base class: jaxlora calls its methods with checked values"
FREE_TEXT = "free text: any string is valid"
ANY_TREE = "any pytree is valid: leaves that are not QuantizedKernel pass through unchanged"
MISSING_KEY = "an unknown adapter name is a KeyError listing the adapters, as a dict's lookup"
#: Reasons of entries that are gaps (tried, and stale once refused); every other reason says the
#: value is right there, so it is not tried at all.
GAPS = (MISSING_KEY,)

#: ``(callable, parameter, kind)`` -> why that wrong value is accepted; ``"*"`` matches any.
#: An entry for one kind that the callable now refuses properly is stale and fails the test.
ALLOWED: dict[tuple[str, str, str], str] = {
    **{
        (name, "*", "*"): RECORD
        for name in (
            "jaxlora.ParamCount", "jaxlora.Target", "jaxlora.analysis.Amplification",
            "jaxlora.checkpoint.Restored", "jaxlora.variants.FileEntry",
            "jaxlora.models.GenerationResult", "jaxlora.quant.QuantizedKernel",
            "jaxlora.models.KVCache", "jaxlora.models.KVCache.init", "jaxlora.models.KVCache.write",
            "jaxlora.models.KVCache.attention_mask", "jaxlora.models.KVCache.advance",
            "jaxlora.models.KVCache.replace",
        )
    },
    **{
        (f"jaxlora.variants.Variant{method}", "*", "*"): ABSTRACT
        for method in ("", ".check", ".init", ".merge", ".unmerge", ".factored", ".file_entries")
    },
    **{
        (f"jaxlora.models.{cls}{method}", "*", "*"): LINEN
        for cls in ("BertClassifier", "BertEncoder", "GemmaForCausalLM", "LlamaForCausalLM")
        for method in ("", ".setup", ".hidden_states", ".logits")
    },
    ("jaxlora.checkpoint.checkpoint_manager", "best_metric", "unknown_name"): (
        "any metric name is valid here: `save` refuses metrics that lack it"
    ),
    ("jaxlora.checkpoint.save", "step", "zero"): "step 0 is a valid first step",
    ("jaxlora.variants.register", "*", "*"): (
        "registering changes the process-wide registry, so no valid call runs here; every"
        " declaration mistake is tested in test_validation_silent.py::test_register_refuses_*"
    ),
    ("jaxlora.loraplus.loraplus", "embedding_lr", "zero"): "0 freezes the embedding factors",
    **{
        (f"jaxlora.loraplus.{fn}", "embedding_paths", "empty_list"): "no embeddings (the default)"
        for fn in ("loraplus", "loraplus_labels")
    },
    ("jaxlora.AdapterBank.add", "name", "unknown_name"): "a new adapter's name: any name is valid",
    ("jaxlora.AdapterBank.get", "name", "unknown_name"): MISSING_KEY,
    ("jaxlora.AdapterBank.remove", "name", "unknown_name"): MISSING_KEY,
    ("jaxlora.AdapterBank.params", "name", "unknown_name"): MISSING_KEY,
    ("jaxlora.LoraConfig", "lora_dropout", "zero"): "0 is no dropout (the default)",
    **{
        ("jaxlora.LoraConfig", field, "None"): "None reads as no entries (PEFT's JSON writes null)"
        for field in ("rank_pattern", "alpha_pattern", "layouts")
    },
    **{
        (f"jaxlora.LoraConfig.{method}", "module_path", kind): reason
        for method in ("rank_for", "alpha_for", "scale_for")
        for kind, reason in (
            ("empty_str", "'' is the path of a root module"),
            ("unknown_name", "any path is valid: one no pattern matches gets `r` / `lora_alpha`"),
        )
    },
    ("jaxlora.find_targets", "argument", "unknown_name"): "a free label used in messages",
    ("jaxlora.find_targets", "caller", "unknown_name"): "a free label used in messages",
    ("jaxlora.models.chat_prompt", "user_message", "empty_str"): FREE_TEXT,
    ("jaxlora.models.chat_prompt", "user_message", "unknown_name"): FREE_TEXT,
    ("jaxlora.models.chat_prompt", "system", "empty_str"): FREE_TEXT,
    ("jaxlora.models.chat_prompt", "system", "unknown_name"): FREE_TEXT,
    ("jaxlora.save_peft", "base_model_name_or_path", "unknown_name"): FREE_TEXT + " (a hub id)",
    ("jaxlora.peft.config_from_peft", "source", "unknown_name"): "a free label used in messages",
    ("jaxlora.inits.pissa_split", "niter", "zero"): "0 power iterations: a coarse randomised SVD",
    ("jaxlora.inits.pissa_factors", "niter", "zero"): "0 power iterations: a coarse randomised SVD",
    ("jaxlora.variants.unregister", "name", "unknown_name"): "documented: a no-op",
    ("jaxlora.variants.variant_of", "where", "empty_str"): "'' (the default): no path to name",
    ("jaxlora.variants.variant_of", "where", "unknown_name"): "a free label used in messages",
    ("jaxlora.variants.column_norm", "n_stack", "zero"): "0: no stacked axes",
    ("jaxlora.models.GemmaConfig.is_sliding", "layer", "zero"): "layer 0 is the first layer",
    ("jaxlora.models.GemmaConfig.rope", "layer", "zero"): "layer 0 is the first layer",
    ("jaxlora.models.GemmaConfig", "bos_token_id", "zero"): "0 is a valid token id",
    ("jaxlora.models.GemmaConfig", "eos_token_id", "zero"): "0 is a valid token id",
    ("jaxlora.models.LlamaConfig", "bos_token_id", "zero"): "0 is a valid token id",
    ("jaxlora.models.LlamaConfig", "eos_token_id", "zero"): "0 is a valid token id",
    ("jaxlora.quant.tie", "tree", "*"): ANY_TREE,
    ("jaxlora.quant.shapes", "params", "*"): ANY_TREE,
    ("jaxlora.quant.dequantize_tree", "params", "*"): ANY_TREE,
    ("jaxlora.remat.recompute", "num_tied", "zero"): "0: no argument is tied",
    ("jaxlora.models.decoding.step_function", "*", "*"): (
        "the generate loop's internal step, exported for custom loops: its arguments are the ones "
        "`generate` checked"
    ),
    ("jaxlora.models.decoding.sample_logits", "temperature", "zero"): "0 is greedy (the default)",
    ("jaxlora.models.shapes.TransformerShape", "relative_buckets", "zero"): "0: no tables",
    ("jaxlora.models.shapes.TransformerShape", "name", "unknown_name"): FREE_TEXT,
    ("jaxlora.models.llama.generate", "eos_id", "zero"): "0 is a valid token id",
    ("jaxlora.models.BertConfig", "hidden_dropout", "zero"): "0 is no dropout",
    ("jaxlora.models.BertConfig", "attention_dropout", "zero"): "0 is no dropout",
    ("jaxlora.init_sharded", "rank_axis", "str"): "'x' is the name of the mesh's axis here",
    ("jaxlora.lora_shardings", "rank_axis", "str"): "'x' is the name of the mesh's axis here",
    ("jaxlora.sharding.factor_specs", "rank_axis", "str"): "a mesh axis name; no mesh to check",
    ("jaxlora.models.generate", "temperature", "zero"): "0 is greedy decoding (the default)",
    ("jaxlora.models.generate", "stop_tokens", "empty_list"): "no stop tokens (the default)",
    ("jaxlora.models.generate", "stop_tokens", "int"): "one stop token id",
    ("jaxlora.models.generate", "pad_id", "zero"): "0 is a valid token id",
    ("jaxlora.models.load_gguf_llama", "path", "unknown_name"): "a missing file: named in the error",  # noqa: E501
    **{
        (name, param, kind): reason
        for name in ("jaxlora.models.peft_module_name", "jaxlora.peft.default_module_name")
        for param, kind, reason in (
            ("path", "empty_str", "'' is the path of a root module"),
            ("path", "unknown_name", "any module path is valid"),
            ("index", "empty_list", "no layer index: the module is not stacked"),
        )
    },
    ("jaxlora.peft.peft_config", "base_model_name_or_path", "unknown_name"): FREE_TEXT,
}  # fmt: skip


def _public() -> Iterator[tuple[str, Any]]:
    """``(qualified name, object)`` of every public callable, each object once."""
    seen: set[int] = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not callable(obj) or _is_alias(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{module_name}.{name}", obj
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if attr.startswith("_") or not isinstance(
                        value, types.FunctionType | classmethod | staticmethod
                    ):
                        continue
                    yield f"{module_name}.{name}.{attr}", getattr(obj, attr)


def _is_alias(obj: Any) -> bool:
    """A type alias (``Params = Any``, ``LoraTree = dict[...]``) is no entry point."""
    return (
        obj is Any
        or isinstance(obj, types.GenericAlias)
        or type(obj).__module__ == "typing"
        or getattr(obj, "__module__", None) in ("typing", "collections.abc")
    )


PUBLIC = dict(_public())


def _allowed(name: str, param: str, kind: str) -> str | None:
    for key in ((name, param, kind), (name, param, "*"), (name, "*", kind), (name, "*", "*")):
        if key in ALLOWED:
            return ALLOWED[key]
    return None


def _parts(annotation: str) -> list[str]:
    """The top-level alternatives of an annotation string: ``'int | None'`` -> int, None."""
    parts, depth, current = [], 0, ""
    for ch in annotation:
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return [p for p in parts if p]


def kinds_for(param: inspect.Parameter) -> list[str]:
    """The wrong-value kinds that ``param``'s annotation rules out."""
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        return []
    if not isinstance(annotation, str):
        annotation = getattr(annotation, "__name__", str(annotation))
    parts = _parts(annotation)
    optional = "None" in parts or param.default is None
    parts = [p for p in parts if p != "None"]
    heads = {re.split(r"[\[.]", p)[-1] if "[" not in p else p.split("[")[0].split(".")[-1]
             for p in parts}  # fmt: skip
    kinds: list[str] = [] if optional else ["None"]
    sequence = heads & {"Sequence", "Iterable", "tuple", "list"}
    if heads <= {"Any"}:
        return []
    if "PathLike" in annotation:
        return kinds + ["int", "empty_str"]
    if "LoraConfig" in heads and len(heads) == 1:
        return kinds + ["dict_config", "str"]
    if heads & {"Params"}:  # any pytree: a list of arrays is a model's params too
        return kinds + ["int", "str"]
    if heads & {"LoraTree", "Mapping", "dict"}:
        return kinds + ["int", "str", "list_for_dict"]
    if heads & {"PRNGKey"}:
        return kinds + ["int", "str", "float_array"]
    if heads & {"Array", "ArrayLike", "ndarray"} and not sequence:
        return kinds + ["str", "empty_array"]
    if "str" in heads and sequence:
        return kinds + ["int", "empty_list", "list_of_int"]
    if sequence:
        return kinds + ["str_for_sequence", "empty_list"] + ([] if "int" in heads else ["int"])
    if heads == {"str"}:
        return kinds + ["int", "empty_str", "unknown_name"]
    if "float" in heads:
        return kinds + ["str", "nan", "inf", "-inf", "negative_float", "zero"]
    if heads == {"int"}:
        return kinds + ["str", "float", "negative_int", "zero"]
    if heads == {"bool"}:
        return kinds + ["str_false"]
    if heads & {"int", "str"}:  # int | str, bool | str, ...
        return kinds + ["float", "empty_str"]
    return kinds + ["int", "str"]  # a class: a config, a module, a function, an optimizer, ...


def _invoke(fn: Callable[..., Any], kwargs: dict[str, Any], args: tuple[Any, ...]) -> Any:
    if args:
        positional = []
        for p in inspect.signature(fn).parameters.values():
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                break
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                positional.append(kwargs.pop(p.name) if p.name in kwargs else p.default)
        result = fn(*positional, *args, **kwargs)
    else:
        result = fn(**kwargs)
    if hasattr(result, "__enter__") and hasattr(result, "__exit__"):
        with result:  # a context manager checks its arguments when entered
            pass
    return result


class Reached(Exception):
    """Raised in place of the work a callable does once its arguments are checked."""


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in skip and p.name not in ("self", "cls")
    ]


def _outcome(fn, kwargs, args) -> tuple[str, BaseException | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _invoke(fn, kwargs, args)
    except Reached:
        return "accepted", None
    except (TypeError, ValueError) as err:
        return "refused", err
    except Exception as err:  # noqa: BLE001 - any other error is reported, not raised
        return "other", err
    return "accepted", None


def _names(param: str, err: BaseException | None) -> bool:
    """Whether ``err`` names ``param`` as jaxlora does: in backticks (```param```, ```param[0]```,
    ```param='x'```), so a dependency's message that happens to hold the word does not count."""
    return err is not None and re.search(rf"`{re.escape(param)}[`\[=.(]", str(err)) is not None


def test_every_public_callable_has_a_valid_call():
    missing = [n for n in PUBLIC if n not in calls.CALLS and _allowed(n, "*", "*") is None]
    assert not missing, "\n".join(
        f"add a valid call of `{n}` to tests/public_api_calls.py and validate its arguments"
        for n in missing
    )
    stale = sorted(set(calls.CALLS) - set(PUBLIC))
    assert not stale, f"tests/public_api_calls.py has calls of non-public names: {stale}"


def _stopped(name: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """The callable of ``name``, with its ``stop`` function (if any) replaced by one raising
    :class:`Reached`."""
    entry = calls.CALLS[name]
    if entry.stop is not None:
        module, attr = entry.stop

        def reached(*args, **kwargs):
            raise Reached

        monkeypatch.setattr(importlib.import_module(module), attr, reached)
    return entry.bound() if entry.bound is not None else PUBLIC[name]


TESTED = sorted(set(calls.CALLS) & set(PUBLIC))


@pytest.mark.slow  # the valid calls compute (and compile): ~15 s together
@pytest.mark.parametrize("name", [n for n in TESTED if calls.CALLS[n].run_valid])
def test_the_valid_call_is_valid(name, monkeypatch):
    """Each table entry is a call that works, so a refused variant is refused for its change."""
    entry = calls.CALLS[name]
    outcome, err = _outcome(_stopped(name, monkeypatch), entry.kwargs(), entry.args)
    if entry.valid_error is not None:
        assert isinstance(err, entry.valid_error), f"valid call of {name}: {err!r}"
    else:
        assert outcome == "accepted", f"the valid call of {name} fails: {err!r}"


@pytest.mark.parametrize("name", TESTED)
def test_wrong_arguments_are_refused_by_name(name, monkeypatch):
    entry = calls.CALLS[name]

    def target() -> Callable[..., Any]:
        return _stopped(name, monkeypatch)

    problems, stale = [], []
    for param in _parameters(target()):
        for kind in kinds_for(param):
            kwargs = entry.kwargs()
            value = WRONG[kind]()
            if param.default is not inspect.Parameter.empty and _same(value, param.default):
                continue  # the default is valid by definition
            reason = _allowed(name, param.name, kind)
            if reason is not None and reason not in GAPS:
                continue  # a right value there: not tried (it may run a computation)
            kwargs[param.name] = value
            outcome, err = _outcome(target(), kwargs, entry.args)
            good = outcome == "refused" and _names(param.name, err)
            if reason is not None:
                if good and (name, param.name, kind) in ALLOWED:
                    stale.append(f"{param.name}={kind}")
                continue
            if not good:
                said = "accepted" if err is None else f"{type(err).__name__}: {str(err)[:160]}"
                problems.append(f"`{param.name}`={value!r:.30} ({kind}): {said}")
    assert not problems, f"{name} lets wrong values through:\n  " + "\n  ".join(problems)
    assert not stale, f"{name}: allow-list entries no longer needed: {stale}"


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, float) and isinstance(default, float) and math.isnan(value):
        return False
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # noqa: BLE001 - arrays compare elementwise
        return False


def test_the_catalogue_reads_annotations():
    def f(a: int, b: float | None = None, c: str = "x", d: typing.Sequence[str] = (), e: Any = 1):
        pass

    kinds = {p.name: kinds_for(p) for p in inspect.signature(f).parameters.values()}
    assert kinds["a"] == ["None", "str", "float", "negative_int", "zero"]
    assert "None" not in kinds["b"] and "nan" in kinds["b"]
    assert kinds["c"] == ["None", "int", "empty_str", "unknown_name"]
    assert kinds["e"] == []
