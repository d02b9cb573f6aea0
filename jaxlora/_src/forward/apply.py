"""``jaxlora.apply``: run a linen or NNX model with an adapter, factored or merged.

The factored mode computes ``y = layer(x) + s·((dropout(x)·A)·B)`` inside each adapted layer (no
d×k temporary, no weight-gradient of W): the fast path for training. The merged mode folds the
adapter in first (:func:`jaxlora.merge`: ``W + s·A·B``) and runs the plain model: the reference,
and what a deployed model runs. Both give the same outputs and gradients within float tolerance;
only the factored mode can apply LoRA dropout. Each adapted module runs its own variant on both
paths and both frameworks (a DoRA module rescales each output column by its magnitude factor).

The factored mode runs on a quantised base (:mod:`jaxlora.quant`): each layer reads its kernel
dequantised inside its call (linen keeps only the codes for the backward pass); on a linen model
big bfloat16 layers without LoRA (an output head) are cast a block of columns at a time
(:mod:`jaxlora.chunked`). ``remat=`` recomputes chosen blocks in the backward pass, on linen and
NNX (:mod:`jaxlora.remat`); ``mutable=`` returns the batch statistics and RNG state a training
step updates (:mod:`jaxlora._src.forward.state`). The memory savers are custom VJPs,
made for reverse-mode training (``jax.grad``, ``jax.vjp``); for forward-mode derivatives
(``jax.jvp``, ``jax.jacfwd``) use ``mode="merged"`` without ``remat``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora._src import validate
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.forward import adapted, chunked, linen, nnx_remat
from jaxlora._src.forward import apply_inputs as inputs
from jaxlora._src.forward import nnx as nnx_forward
from jaxlora._src.forward import remat as remat_lib
from jaxlora._src.forward import state as state_lib
from jaxlora._src.quant import forward as quant_forward
from jaxlora._src.quant.kernel import is_quantized
from jaxlora._src.tree import core
from jaxlora._src.types import LoraTree, Params

MODES = ("factored", "merged")


def _has_narrow_floats(frozen: Params) -> bool:
    """Whether the base stores some float leaf in fewer than 32 bits (bfloat16, float16, ...)."""
    leaves = jax.tree.leaves(frozen, is_leaf=is_quantized)
    return any(
        not is_quantized(x) and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4
        for x in leaves
    )


def _is_quantized_tree(frozen: Params) -> bool:
    return any(is_quantized(x) for x in jax.tree.leaves(frozen, is_leaf=is_quantized))


def apply(
    model: nn.Module | nnx.Module | nnx.GraphDef,
    frozen: Params,
    lora: LoraTree,
    config: LoraConfig,
    *args: Any,
    mode: str = "factored",
    rngs: Mapping[str, jax.Array] | jax.Array | None = None,
    lora_deterministic: bool | None = None,
    method: Any = None,
    variables: Mapping[str, Any] | None = None,
    remat: str | Sequence[str] | None = None,
    mutable: Any = False,
    model_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Runs ``model`` with the adapter ``lora`` on the frozen base ``frozen``.

    Args:
        model: a linen module, or an NNX module / ``GraphDef`` (from ``nnx.split``).
        frozen: the base params: the linen ``params`` collection, or the NNX state the adapter was
            split from.
        lora: the adapter Θ from :func:`jaxlora.split`.
        config: the config Θ was made with.
        *args: the model's inputs.
        mode: ``"factored"`` (low-rank forward inside each adapted layer; supports dropout) or
            ``"merged"`` (fold ``W + s·A·B``, then the plain model).
        rngs: PRNG keys by stream, as for linen ``apply`` (a bare key means ``{"dropout": key}``).
            LoRA dropout draws from ``"dropout"``. NNX: an ``nnx.Rngs`` is passed on to the
            model's call as its own ``rngs`` keyword, and LoRA dropout draws from its
            ``dropout`` stream when it has one.
        lora_deterministic: ``True`` turns LoRA dropout off, ``False`` on; ``None`` (default)
            turns it on exactly when a ``"dropout"`` key is given. Named apart from the
            ``deterministic`` argument many models take, which passes through ``**kwargs`` to the
            model untouched.
        method: linen: the method to apply, as for ``Module.apply``; NNX: a method name or a
            function ``f(module, *args, **kwargs)``.
        variables: linen only: other variable collections (e.g. ``batch_stats``).
        remat: modules to recompute in the backward pass instead of keeping their activations
            (gradient checkpointing, :mod:`jaxlora.remat`), by path with the rules of
            ``target_modules``: a regular expression such as ``r"layers_\\d+"`` or a list of
            names (NNX paths as ``nnx.iter_modules`` gives them, e.g. ``"blocks/0"``). Same
            values and gradients, far less activation memory.
        mutable: which non-parameter state the call may update and returns, as
            ``(output, updates)``: ``True`` for all of it (the same call on linen and NNX), or
            linen: collection names (``["batch_stats"]``); NNX: an NNX filter
            (``nnx.BatchStat``, ``(nnx.BatchStat, nnx.RngState)``). Parameters are never part
            of ``updates``. Fold them back for the next step: NNX
            ``frozen = nnx.merge_state(frozen, updates)`` (batch statistics, the model's own RNG
            counters, so each step draws new dropout masks); linen
            ``variables = {**variables, **updates}``. ``False`` (default): the output alone,
            and an NNX call's state updates are discarded.
        model_kwargs: keyword inputs of the model passed on untouched, for names this function
            takes itself (a model's own ``mode``, ``method`` or ``rngs`` keyword).
        **kwargs: keyword inputs of the model.

    Returns:
        What the model returns; with ``mutable``, ``(output, updates)``.

    Raises:
        ValueError: for an unknown ``mode``, for ``mode="merged"`` with LoRA dropout on, for
            dropout on without a ``"dropout"`` key, for a ``remat`` that matches no module,
            for a ``mutable`` that names the ``params`` collection, or for a ``mutable`` entry
            that selects nothing the model holds or creates (a typo such as ``"batchstats"``;
            the error lists the collections that exist).
        TypeError: when ``model`` is neither a linen nor an NNX model, or for a ``mutable``
            the framework cannot read.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxlora
        >>> model = nn.Dense(3)
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
        >>> config = jaxlora.LoraConfig(r=2, target_modules=".*", lora_dropout=0.1)
        >>> frozen, lora = jaxlora.split(params, config, jax.random.key(1))
        >>> x = jnp.ones((1, 4))
        >>> y = jaxlora.apply(model, frozen, lora, config, x, rngs={"dropout": jax.random.key(2)})
        >>> bool(jnp.allclose(y, model.apply({"params": params}, x)))  # B = 0: no change yet
        True
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if lora_deterministic is not None and not isinstance(lora_deterministic, bool):
        raise TypeError(
            f"`lora_deterministic` must be True, False or None, got {lora_deterministic!r}"
        )
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jaxlora.LoraConfig, got {type(config).__name__}")
    validate.tree("frozen", frozen)
    kwargs = inputs.with_model_kwargs(kwargs, model_kwargs)
    if isinstance(rngs, nnx.Rngs):
        wanted = config.lora_dropout > 0 and lora_deterministic is not True and mode == "factored"
        rngs = inputs.nnx_rngs(model, rngs, kwargs, wanted)
    rngs = inputs.normalized_rngs(rngs)
    dropout_on = inputs.dropout_on(config, mode, rngs, lora_deterministic)
    call = (args, kwargs, method)
    if isinstance(model, nn.Module):
        if mutable is False or mutable is None:
            return _apply_linen(model, frozen, lora, config, call, mode, rngs, dropout_on,
                                variables, remat)  # fmt: skip
        kwargs["mutable"] = state_lib.linen_mutable(mutable)
        out, updates = _apply_linen(model, frozen, lora, config, call, mode, rngs, dropout_on,
                                    variables, remat)  # fmt: skip
        state_lib.check_linen_updates(mutable, updates, variables)
        return out, updates
    if isinstance(model, nnx.Module | nnx.GraphDef):
        if variables is not None:
            raise ValueError("`variables` is for linen models; an NNX model's state is `frozen`")
        key = rngs.get(linen.DROPOUT_RNG) if dropout_on else None
        options = (mode, key, remat, state_lib.nnx_mutable(mutable), mutable)
        return _apply_nnx(model, frozen, lora, config, call, options)
    raise TypeError(
        "`model` must be a flax.linen Module, an nnx.Module or an nnx.GraphDef, got "
        f"{type(model).__name__}"
    )


def _apply_linen(model, frozen, lora, config, call, mode, rngs, dropout_on, variables, remat):
    """:func:`apply` for a linen model; ``call = (args, kwargs, method)``."""
    args, kwargs, method = call
    inputs.check_linen_inputs(model, frozen, method, variables)
    variables = dict(variables or {})
    with contextlib.ExitStack() as stack:
        if remat is not None:
            stack.enter_context(remat_lib.checkpointed(remat))
        if mode == "merged":
            params = core.merge(frozen, lora, config)
            return model.apply({**variables, "params": params}, *args, rngs=rngs, method=method,
                               **kwargs)  # fmt: skip
        tree = {**variables, "params": adapted.adapted_params(frozen, lora, config)}
        stack.enter_context(nn.intercept_methods(linen.lora_interceptor(config, not dropout_on)))
        if _is_quantized_tree(frozen):
            # Inside the LoRA interceptor, so the layer it wraps sees the dequantised kernel
            # while the low-rank term is still added outside.
            stack.enter_context(nn.intercept_methods(quant_forward.dequantizing_interceptor()))
        if _has_narrow_floats(frozen):
            # A big bf16 layer without LoRA (the output head) is cast a block at a time.
            stack.enter_context(nn.intercept_methods(chunked.blocked_cast_interceptor()))
        return model.apply(tree, *args, rngs=rngs, method=method, **kwargs)


def _apply_nnx(model, frozen, lora, config, call, options):
    """:func:`apply` for an NNX module or ``GraphDef``; ``options = (mode, key, remat,
    mutable, requested)``: ``key`` turns LoRA dropout on, ``mutable`` is an NNX filter or None,
    ``requested`` the user's ``mutable`` (each of its entries must select a variable)."""
    args, kwargs, method = call
    mode, key, remat, mutable, requested = options
    graphdef = model if isinstance(model, nnx.GraphDef) else nnx.graphdef(model)
    with contextlib.ExitStack() as stack:
        if mode == "merged":
            module = _merge_nnx(graphdef, quant_forward.dequantizing_state(
                core.merge(frozen, lora, config)))  # fmt: skip
        else:
            state = nnx_forward.adapt_state(frozen, lora, config, key)
            module = _merge_nnx(graphdef, quant_forward.dequantizing_state(state))
            stack.enter_context(nnx_forward.hooked_layers())
            if _is_quantized_tree(frozen):
                # Inside the hooks: the quantised layers' calls, LoRA term included, keep only
                # the codes for the backward pass.
                stack.enter_context(quant_forward.dequantizing_layers(module))
        if remat is not None:
            # Entered after the hooks, so a recomputed block re-runs the LoRA term too.
            stack.enter_context(nnx_remat.checkpointed(module, remat))
        out = _call_nnx(module, method, args, kwargs)
    return out if mutable is None else (out, state_lib.updates(module, mutable, requested))


def _merge_nnx(graphdef: nnx.GraphDef, state: Any) -> nnx.Module:
    try:
        return nnx.merge(graphdef, state)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(
            f"`frozen` does not fit the NNX `model` ({type(err).__name__}: {str(err)[:200]}); "
            "pass the state from `nnx.split(model)` that the adapter was made with (a linen "
            "params dict belongs with a linen model)"
        ) from err


def _call_nnx(module, method, args, kwargs):
    if method is None:
        return module(*args, **kwargs)
    if isinstance(method, str):
        inputs.check_method(type(module), nnx.Module, method)
        return getattr(module, method)(*args, **kwargs)
    return method(module, *args, **kwargs)
