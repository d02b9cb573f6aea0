"""One valid call of every public callable, for tests/test_public_api.py.

Each entry gives the keyword arguments of a call that works (tiny trees, nothing compiled); the
generated test replaces one parameter at a time by wrong values and expects an error naming it.
Parameters left out of ``kwargs`` keep their defaults (and are varied all the same). ``stop``
names a function the callable reaches only after its arguments are checked: the test replaces it
by one that raises, so a wrong value that got through is seen without running a model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora import LoraConfig, adapters, checkpoint, quant
from jaxlora import models as jm

KEY = jax.random.key(0)
CONFIG = LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False)


def frozen() -> dict[str, Any]:
    return {"up": {"kernel": jnp.ones((4, 6))}, "down": {"kernel": jnp.ones((6, 4))}}


@functools.cache
def _lora() -> dict[str, Any]:
    """What ``split(frozen(), CONFIG, KEY)`` gives, built without running its initialisers."""
    return {
        "up": {"lora_a": jnp.full((4, 2), 0.5), "lora_b": jnp.full((2, 6), 0.25)},
        "down": {"lora_a": jnp.full((6, 2), 0.5), "lora_b": jnp.full((2, 4), 0.25)},
    }


def lora() -> dict[str, Any]:
    return jax.tree.map(lambda x: x, _lora())


class Tiny(nn.Module):
    """Two Dense layers named as in :func:`frozen`."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, use_bias=False, name="up")(x)
        return nn.Dense(4, use_bias=False, name="down")(x)


class _Up(nnx.Module):
    def __init__(self):
        self.kernel = nnx.Param(jnp.ones((4, 6)))

    def __call__(self, x):
        return x @ self.kernel


class TinyNnx(nnx.Module):
    """An NNX model with one submodule ``up`` (no initialiser runs)."""

    def __init__(self):
        self.up = _Up()

    def __call__(self, x):
        return self.up(x)


X = jnp.ones((2, 4))
_DIR = tempfile.mkdtemp(prefix="jaxlora-public-api-")
_COUNTER = iter(range(10**9))


def fresh_dir() -> str:
    """A path that does not exist yet, inside this run's temporary folder."""
    return os.path.join(_DIR, f"d{next(_COUNTER)}")


MISSING = os.path.join(_DIR, "missing")  # never created


@functools.cache
def peft_dir() -> str:
    path = fresh_dir()
    jaxlora.save_peft(path, lora(), CONFIG, frozen())
    return path


def bank() -> jaxlora.AdapterBank:
    made = jaxlora.AdapterBank(frozen())
    made.add("fr", lora(), CONFIG)
    return made


def stacked() -> dict[str, Any]:
    return adapters.stack([lora(), lora()])


def target() -> jaxlora.Target:
    return jaxlora.find_targets(frozen(), CONFIG)[0]


def _int8_ones(shape: tuple[int, int]) -> quant.QuantizedKernel:
    """What ``quantize_kernel(jnp.ones(shape), "int8")`` gives, built without computing it."""
    return quant.QuantizedKernel(
        codes=jnp.full(shape, 127, jnp.int8), scale=jnp.full((1, shape[1]), 1 / 127),
        method="int8", kernel_shape=shape, dtype="float32", layout="io",
    )  # fmt: skip


def qkernel() -> quant.QuantizedKernel:
    return _int8_ones((4, 64))


def qfrozen() -> dict[str, Any]:
    return {"up": {"kernel": _int8_ones((4, 6))}, "down": {"kernel": _int8_ones((6, 4))}}


def q4_raw() -> np.ndarray:
    return np.zeros((2, 20), np.uint8)  # 2 rows of one 20-byte Q4_1 block: kernel (32, 2)


def tiny_llama() -> jm.LlamaForCausalLM:
    config = jm.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=4, max_position_embeddings=32,
    )  # fmt: skip
    return jm.LlamaForCausalLM(config)


@functools.cache
def _llama_params() -> dict[str, Any]:
    """Zeros of the tiny Llama's params (shapes from ``eval_shape``: nothing is initialised)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(tiny_llama().init, jax.random.key(0), ids)["params"]
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _hf_llama_config() -> jm.LlamaConfig:
    """The tiny Llama in Hugging Face's rotary layout (what ``save_hf`` writes)."""
    return dataclasses.replace(tiny_llama().config, rope_interleaved=False)


LLAMA_LORA = jaxlora.LoraConfig(r=1, target_modules=["q_proj"])


@functools.cache
def _llama_lora() -> dict[str, Any]:
    return jaxlora.split(_llama_params(), LLAMA_LORA, jax.random.key(0))[1]


def manager():
    return checkpoint.checkpoint_manager(fresh_dir())


@functools.cache
def _saved_manager_dir() -> str:
    path = fresh_dir()
    made = checkpoint.checkpoint_manager(path)
    checkpoint.save(made, 1, lora(), CONFIG)
    made.close()
    return path


def tokenizer() -> Any:
    """A three-word ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    made = Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    made.pre_tokenizer = Whitespace()
    return made


def sharded() -> dict[str, Any]:
    """``lora_shardings`` / ``init_sharded`` arguments: a one-device mesh, replicated specs."""
    return {"shardings": jax.tree.map(lambda _: P(), frozen()), "mesh": jax.make_mesh((1,), ("x",))}


@dataclasses.dataclass
class Call:
    """A valid call: ``kwargs()`` gives fresh arguments; ``bound()`` the callable for methods."""

    kwargs: Callable[[], dict[str, Any]] = dict
    args: tuple[Any, ...] = ()  # extra positional arguments (after the named ones: `*args`)
    bound: Callable[[], Callable[..., Any]] | None = None
    stop: tuple[str, str] | None = None  # (module, attribute) reached once arguments passed
    # What the valid call itself raises, if anything: a file loader pointed at a missing file
    # (a wrong argument must be named before any file is opened).
    valid_error: type[BaseException] | tuple[type[BaseException], ...] | None = None
    run_valid: bool = True  # False: the valid call reads packaged data (slow), never run


def _kw(**factories: Any) -> Callable[[], dict[str, Any]]:
    """Keyword arguments whose callable values (factories) are called afresh for each call."""

    def make() -> dict[str, Any]:
        return {
            k: (v() if callable(v) and getattr(v, "_factory", False) else v)
            for k, v in factories.items()
        }

    return make


def fac(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Marks ``fn`` as a factory for :func:`_kw` (a plain callable is passed as it is)."""
    fn._factory = True  # type: ignore[attr-defined]
    return fn


F, L, S = fac(frozen), fac(lora), fac(stacked)

CALLS: dict[str, Call] = {
    # --- jaxlora ------------------------------------------------------------------------------
    "jaxlora.AdapterBank": Call(_kw(frozen=F)),
    "jaxlora.AdapterBank.add": Call(
        _kw(name="de", lora=L, config=CONFIG), bound=lambda: bank().add
    ),
    "jaxlora.AdapterBank.remove": Call(_kw(name="fr"), bound=lambda: bank().remove),
    "jaxlora.AdapterBank.get": Call(_kw(name="fr"), bound=lambda: bank().get),
    "jaxlora.AdapterBank.params": Call(_kw(name="fr"), bound=lambda: bank().params),
    "jaxlora.AdapterBank.add_weighted": Call(
        _kw(weights={"fr": 1.0}), bound=lambda: bank().add_weighted
    ),
    "jaxlora.LoraConfig": Call(_kw(r=2, target_modules=["up"])),
    "jaxlora.LoraConfig.rank_for": Call(_kw(module_path="up"), bound=lambda: CONFIG.rank_for),
    "jaxlora.LoraConfig.alpha_for": Call(_kw(module_path="up"), bound=lambda: CONFIG.alpha_for),
    "jaxlora.LoraConfig.scale_for": Call(_kw(module_path="up"), bound=lambda: CONFIG.scale_for),
    "jaxlora.LoraConfig.to_dict": Call(bound=lambda: CONFIG.to_dict),
    "jaxlora.LoraConfig.to_json": Call(bound=lambda: CONFIG.to_json),
    "jaxlora.LoraConfig.from_dict": Call(_kw(data=CONFIG.to_dict())),
    "jaxlora.LoraConfig.from_json": Call(_kw(text=CONFIG.to_json())),
    "jaxlora.ParamCount.summary": Call(bound=lambda: jaxlora.count(frozen(), lora()).summary),
    "jaxlora.ParamCount.table": Call(bound=lambda: jaxlora.count(frozen(), lora()).table),
    "jaxlora.adapted_params": Call(_kw(frozen=F, lora=L, config=CONFIG)),
    "jaxlora.apply": Call(_kw(model=Tiny(), frozen=F, lora=L, config=CONFIG), args=(X,)),
    "jaxlora.combine": Call(_kw(frozen=F, lora=L)),
    "jaxlora.count": Call(_kw(frozen=F, lora=L)),
    "jaxlora.delta": Call(_kw(a=jnp.ones((4, 2)), b=jnp.ones((2, 6)))),
    "jaxlora.find_targets": Call(_kw(params=F, config=CONFIG)),
    "jaxlora.freeze": Call(_kw(optimizer=optax.sgd(0.1), config=CONFIG)),
    "jaxlora.infer_layouts": Call(_kw(module=Tiny()), args=(X,)),
    "jaxlora.init_sharded": Call(lambda: {**_kw(frozen=F, config=CONFIG, key=KEY)(), **sharded()}),
    "jaxlora.load_peft": Call(_kw(directory=fac(peft_dir), frozen=F)),
    "jaxlora.lora_interceptor": Call(_kw(config=CONFIG)),
    "jaxlora.lora_shardings": Call(lambda: {**_kw(frozen=F, config=CONFIG)(), **sharded()}),
    "jaxlora.merge": Call(_kw(frozen=F, lora=L, config=CONFIG)),
    "jaxlora.factored": Call(_kw(fn=lambda params, x: x, config=CONFIG)),
    "jaxlora.module_paths": Call(_kw(params=F)),
    "jaxlora.partition": Call(
        _kw(combined=fac(lambda: jaxlora.combine(frozen(), lora())), config=CONFIG)
    ),
    "jaxlora.save_peft": Call(_kw(directory=fac(fresh_dir), lora=L, config=CONFIG, frozen=F)),
    "jaxlora.split": Call(_kw(params=F, config=CONFIG, key=KEY)),
    "jaxlora.trainable_labels": Call(
        _kw(combined=fac(lambda: jaxlora.combine(frozen(), lora())), config=CONFIG)
    ),
    "jaxlora.trainable_mask": Call(
        _kw(combined=fac(lambda: jaxlora.combine(frozen(), lora())), config=CONFIG)
    ),
    "jaxlora.unmerge": Call(_kw(merged=F, lora=L, config=CONFIG)),
    # --- jaxlora.adapters ---------------------------------------------------------------------
    "jaxlora.adapters.add_weighted": Call(
        _kw(frozen=F, adapters=fac(lambda: [(lora(), CONFIG, 1.0)]))
    ),
    "jaxlora.adapters.apply_mixed": Call(
        _kw(model=Tiny(), frozen=F, stacked=S, config=CONFIG, index=jnp.array([0, 1])), args=(X,)
    ),
    "jaxlora.adapters.pad_rank": Call(_kw(frozen=F, lora=L, config=CONFIG, rank=3)),
    "jaxlora.adapters.scale_b": Call(_kw(lora=L, multiplier={"up": {"lora_b": 2.0}})),
    "jaxlora.adapters.stack": Call(_kw(adapters=fac(lambda: [lora(), lora()]))),
    "jaxlora.adapters.unstack": Call(_kw(stacked=S)),
    # --- jaxlora.analysis ---------------------------------------------------------------------
    "jaxlora.analysis.amplification": Call(
        _kw(w=np.diag([10.0, 1.0, 1.0]), delta=np.diag([0.0, 2.0, 0.0]), r=1)
    ),
    "jaxlora.analysis.input_subspace": Call(_kw(a=np.eye(4, 2))),
    "jaxlora.analysis.similarity_grid": Call(_kw(a1=np.eye(4, 2), a2=np.eye(4, 2))),
    "jaxlora.analysis.subspace_similarity": Call(_kw(a1=np.eye(4, 2), a2=np.eye(4, 2), i=1, j=1)),
    # --- jaxlora.checkpoint -------------------------------------------------------------------
    "jaxlora.checkpoint.checkpoint_manager": Call(_kw(directory=fac(fresh_dir))),
    "jaxlora.checkpoint.save": Call(_kw(manager=fac(manager), step=1, lora=L, config=CONFIG)),
    "jaxlora.checkpoint.restore": Call(
        _kw(manager=fac(lambda: checkpoint.checkpoint_manager(_saved_manager_dir())), frozen=F)
    ),
    # --- jaxlora.inits ------------------------------------------------------------------------
    "jaxlora.inits.pissa_factors": Call(
        _kw(w=fac(lambda: frozen()[target().path]["kernel"]), target=fac(target))
    ),
    "jaxlora.inits.pissa_split": Call(_kw(params=F, config=CONFIG, key=KEY)),
    # --- jaxlora.loraplus ---------------------------------------------------------------------
    "jaxlora.loraplus.loraplus": Call(_kw(optimizer_factory=optax.sgd, lr=1e-3)),
    "jaxlora.loraplus.loraplus_labels": Call(_kw(tree=L)),
    # --- jaxlora.peft -------------------------------------------------------------------------
    "jaxlora.peft.config_from_peft": Call(
        _kw(peft=fac(lambda: jaxlora.peft.peft_config(CONFIG, frozen())), frozen=F)
    ),
    "jaxlora.peft.default_module_name": Call(_kw(path="up", index=())),
    "jaxlora.peft.peft_config": Call(_kw(config=CONFIG, frozen=F)),
    # --- jaxlora.quant ------------------------------------------------------------------------
    "jaxlora.quant.dequantize": Call(_kw(leaf=fac(qkernel))),
    "jaxlora.quant.dequantize_tree": Call(_kw(params=fac(qfrozen))),
    "jaxlora.quant.dequantizing_interceptor": Call(),
    "jaxlora.quant.from_gguf_q4_1": Call(_kw(raw=fac(q4_raw), shape=(32, 2))),
    "jaxlora.quant.is_quantized": Call(_kw(leaf=fac(qkernel))),
    "jaxlora.quant.merge_quantized": Call(_kw(qfrozen=fac(qfrozen), lora=L, config=CONFIG)),
    "jaxlora.quant.permute_rows": Call(
        _kw(leaf=fac(lambda: quant.from_gguf_q4_1(q4_raw(), (32, 2))), fn=lambda rows: rows)
    ),
    "jaxlora.quant.quantize": Call(_kw(params=F, targets=CONFIG, method="int8")),
    "jaxlora.quant.quantize_kernel": Call(_kw(w=jnp.ones((4, 64)), method="int8")),
    "jaxlora.quant.requantization_error": Call(_kw(frozen=fac(qfrozen), lora=L, config=CONFIG)),
    "jaxlora.quant.requantize": Call(_kw(params=F, like=fac(qfrozen))),
    "jaxlora.quant.shapes": Call(_kw(params=fac(qfrozen))),
    "jaxlora.quant.split_quantized": Call(_kw(params=fac(qfrozen), config=CONFIG, key=KEY)),
    "jaxlora.quant.tie": Call(_kw(tree=fac(qfrozen), anchor=jnp.float32(1.0))),
    # --- jaxlora.remat ------------------------------------------------------------------------
    # Entered outside a model call, so the block ends in "no module was called" (ValueError).
    "jaxlora.remat.checkpointed": Call(_kw(modules="up"), valid_error=ValueError),
    "jaxlora.remat.checkpointed_nnx": Call(
        _kw(root=fac(TinyNnx), modules="up"), valid_error=ValueError
    ),
    "jaxlora.remat.recompute": Call(_kw(fun=lambda w, x: x @ w)),
    # --- jaxlora.sharding ---------------------------------------------------------------------
    "jaxlora.sharding.factor_specs": Call(_kw(target=fac(target), spec=P(None, None))),
    # --- jaxlora.variants ---------------------------------------------------------------------
    "jaxlora.variants.adapter_variant": Call(_kw(lora=L)),
    "jaxlora.variants.column_norm": Call(_kw(v=jnp.ones((4, 6)), n_stack=0, n_out=1)),
    "jaxlora.variants.dora_kernel": Call(
        _kw(w=jnp.ones((4, 6)), a=jnp.ones((4, 2)), b=jnp.ones((2, 6)), m=jnp.ones(6), scale=1.0)
    ),
    "jaxlora.variants.get": Call(_kw(name="dora")),
    "jaxlora.variants.magnitude_factor": Call(
        _kw(w=jnp.ones((4, 6)), a=jnp.ones((4, 2)), b=jnp.ones((2, 6)), m=jnp.ones(6), scale=1.0)
    ),
    "jaxlora.variants.unregister": Call(_kw(name="no-such-variant")),
    "jaxlora.variants.variant_of": Call(_kw(module=fac(lambda: lora()["up"]))),
    "jaxlora.variants.variants_in": Call(_kw(lora=L)),
    # --- jaxlora.models -----------------------------------------------------------------------
    "jaxlora.models.BertConfig": Call(),
    "jaxlora.models.BertConfig.from_hf": Call(
        _kw(
            hf_config={
                "vocab_size": 16,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 16,
                "max_position_embeddings": 32,
                "type_vocab_size": 2,
                "layer_norm_eps": 1e-12,
            }
        )
    ),  # fmt: skip
    "jaxlora.models.GemmaConfig": Call(),
    "jaxlora.models.LlamaConfig": Call(),
    "jaxlora.models.Llama3RopeScaling": Call(
        _kw(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
    ),  # fmt: skip
    "jaxlora.models.GemmaConfig.is_sliding": Call(
        _kw(layer=0), bound=lambda: jm.GemmaConfig().is_sliding
    ),
    "jaxlora.models.GemmaConfig.rope": Call(_kw(layer=0), bound=lambda: jm.GemmaConfig().rope),
    "jaxlora.models.chat_prompt": Call(_kw(user_message="hi")),
    "jaxlora.models.encode_batch": Call(
        _kw(tokenizer=fac(tokenizer), texts=["a b", "b"], max_length=4)
    ),
    "jaxlora.models.generate": Call(
        _kw(model=fac(tiny_llama), params={}, prompts=[[1, 2]], max_new_tokens=2),
        stop=("jaxlora.models.decoding.generation", "_generate"),
    ),
    "jaxlora.models.hamlet_text": Call(run_valid=False),
    "jaxlora.models.rotten_tomatoes": Call(run_valid=False),
    "jaxlora.models.left_pad": Call(_kw(prompts=[[5, 6], [7]])),
    "jaxlora.models.load_gguf_llama": Call(_kw(path=MISSING), valid_error=(OSError, ValueError)),
    "jaxlora.models.save_hf": Call(
        _kw(directory=fac(fresh_dir), config=fac(_hf_llama_config), params=fac(_llama_params))
    ),  # fmt: skip
    "jaxlora.models.save_hf_merged": Call(
        _kw(
            directory=fac(fresh_dir),
            config=fac(_hf_llama_config),
            frozen=fac(_llama_params),
            lora=fac(_llama_lora),
            lora_config=LLAMA_LORA,
        )
    ),  # fmt: skip
    "jaxlora.models.load_hf": Call(_kw(directory=MISSING), valid_error=(OSError, ValueError)),
    "jaxlora.models.load_hf_gemma": Call(_kw(directory=MISSING), valid_error=(OSError, ValueError)),
    "jaxlora.models.load_hf_llama": Call(_kw(directory=MISSING), valid_error=(OSError, ValueError)),
    "jaxlora.models.load_minilm": Call(_kw(path=MISSING), valid_error=(OSError, ValueError)),
    "jaxlora.models.load_minilm_tokenizer": Call(
        _kw(path=MISSING), valid_error=(OSError, ValueError)
    ),
    "jaxlora.models.load_smollm2": Call(_kw(path=MISSING), valid_error=(OSError, ValueError)),
    "jaxlora.models.load_smollm2_tokenizer": Call(
        _kw(path=MISSING), valid_error=(OSError, ValueError)
    ),
    "jaxlora.models.mean_pool": Call(
        _kw(hidden=jnp.ones((2, 3, 4)), attention_mask=jnp.ones((2, 3), jnp.int32))
    ),
    "jaxlora.models.peft_module_name": Call(_kw(path="layers_0/self_attn/q_proj")),
    "jaxlora.models.train_test_split": Call(_kw(num_examples=10)),
    # --- jaxlora.models submodules ------------------------------------------------------------
    "jaxlora.models.decoding.cache_positions": Call(
        _kw(
            cache=fac(lambda: jm.llama.init_cache(tiny_llama().config, 1, 4)),
            new_valid=np.ones((1, 2), np.int32),
        )
    ),
    "jaxlora.models.decoding.sample_logits": Call(_kw(logits=jnp.zeros((1, 4)), key=KEY)),
    "jaxlora.models.gemma.init_cache": Call(
        _kw(
            config=jm.GemmaConfig(
                vocab_size=8,
                hidden_size=4,
                intermediate_size=8,
                num_layers=1,
                num_heads=2,
                num_kv_heads=1,
                head_dim=4,
            ),
            batch=1,
            max_length=4,
        )
    ),
    "jaxlora.models.llama.init_cache": Call(
        _kw(config=fac(lambda: tiny_llama().config), batch=1, max_length=4)
    ),
    "jaxlora.models.llama.apply_rope": Call(
        _kw(
            x=jnp.ones((1, 2, 1, 4)),
            positions=jnp.zeros((1, 2), jnp.int32),
            theta=1e4,
            interleaved=True,
        )
    ),
    "jaxlora.models.llama.rope_frequencies": Call(_kw(head_dim=4, theta=1e4)),
    "jaxlora.models.llama.generate": Call(
        _kw(
            params={}, config=fac(lambda: tiny_llama().config), prompt_ids=[1, 2], max_new_tokens=2
        ),
        stop=("jaxlora.models.llama.greedy", "_greedy"),
    ),
    "jaxlora.models.shapes.TransformerShape": Call(
        _kw(name="tiny", n_layers=1, d_model=4, d_ff=8, vocab=16, n_positions=8)
    ),
    "jaxlora.models.shapes.abstract_params": Call(
        _kw(shape=jm.shapes.TransformerShape("tiny", 1, 4, 8, 16, 8))
    ),
}
