"""Adapted weights that cannot be read without their adapter: the guarantee of the factored path.

On the factored path every adapted kernel (or embedding table) reaches the model as an
:class:`AdaptedWeight`: the base weight W together with its factors. Whatever code reads it, W
never leaks without its update:

* a layer that the factored path knows (``Dense``, ``Einsum``, ``Conv``, ``Embed``, ... called
  through the layer class's own method) reads it inside :func:`consuming`, gets W, and the
  forward adds ``s·(x·A)·B`` to that call's output;
* every other read (a recurrent cell's inner product, ``self.param("kernel")`` followed by
  ``x @ kernel``, a parent reading ``layer.kernel``, a subclass that overrides the layer's method)
  gets the merged weight ``W + s·A·B``, folded inside the forward pass by the module's variant,
  exactly as :func:`jaxlora.merge` folds it. Gradients reach the factors through the fold.

So an unusual layer costs speed (a d×k temporary for that layer), never correctness, and no layer
class has to be known for the adapter to be used. A fold nobody uses is dead code, removed by XLA
under ``jax.jit``.

Linen reads go through ``flax.linen.meta.unbox`` (``self.param``, ``self.variable(...).value``),
which calls :meth:`AdaptedWeight.unbox`; NNX reads go through :class:`AdaptedParam`'s
``get_value`` (``layer.kernel[...]``, ``.value``, ``jnp.asarray(layer.kernel)``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax import nnx, struct
from flax.core import meta

from jaxlora._src import validate
from jaxlora._src.config import axes_order
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.quant.dequantize import dequantize
from jaxlora._src.quant.kernel import is_quantized
from jaxlora._src.tree import core
from jaxlora._src.types import LORA_A, LORA_B, LoraTree, Params
from jaxlora._src.variants import base as variants

#: The adapted weights being consumed by a factored layer call right now (compared by identity).
_CONSUMING: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "jaxlora_consuming", default=()
)


@contextlib.contextmanager
def consuming(weight: Any) -> Iterator[None]:
    """Within this block, reads of ``weight`` return the bare base weight W.

    Only a factored layer call that adds the low-rank term itself enters it, around its own call.
    """
    token = _CONSUMING.set(_CONSUMING.get() + (weight,))
    try:
        yield
    finally:
        _CONSUMING.reset(token)


def _is_consumed(weight: Any) -> bool:
    return any(weight is w for w in _CONSUMING.get())


def read(value: Any) -> Any:
    """``value``, or what a read of it sees when it is an :class:`AdaptedWeight`."""
    return value.read() if isinstance(value, AdaptedWeight) else value


def _bare(weight: Any) -> Any:
    return meta.unbox(weight) if isinstance(weight, meta.AxisMetadata) else weight


def call_input(kind: str, args, kwargs) -> tuple[Any, Any]:
    """The layer input of a known layer call (``query`` for ``attend``) and, for an ``Einsum``,
    the einsum string given to the call; shared by the linen and NNX factored paths."""
    name = "query" if kind == "attend" else "inputs"
    x = args[0] if args else kwargs[name]
    einsum_str = (
        (args[1] if len(args) > 1 else kwargs.get("einsum_str")) if kind == "einsum" else None
    )
    return x, einsum_str


class AdaptedWeight(struct.PyTreeNode, meta.AxisMetadata):
    """A base weight and its adapter, as one pytree node (W first, so shape checks see W).

    Attributes:
        weight: the base weight W: an array, a ``QuantizedKernel`` or a boxed array.
        factors: the module's adapter leaves (``lora_a``, ``lora_b``, the variant's extras).
        key: a PRNG key for LoRA dropout (NNX; one per stacked slice), or None.
        names: the weight's path (module path, then the leaf name).
        config: the config that gives the module's scale and layout.
    """

    weight: Any
    factors: Mapping[str, Any]
    key: Any = None
    names: tuple[str, ...] = struct.field(pytree_node=False, default=())
    config: LoraConfig | None = struct.field(pytree_node=False, default=None)

    @property
    def where(self) -> str:
        return "/".join(self.names[:-1])

    @property
    def base(self) -> Any:
        """W as the model stored it (unboxed; a quantised kernel stays quantised)."""
        return _bare(self.weight)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def a(self) -> jax.Array:
        return self.factors[LORA_A]

    @property
    def b(self) -> jax.Array:
        return self.factors[LORA_B]

    @property
    def lora_config(self) -> LoraConfig:
        """``config``, which :func:`adapted_params` always sets (TypeError if it is missing)."""
        if self.config is None:
            raise TypeError(f"the adapted weight at `{self.where}` was made without its LoraConfig")
        return self.config

    @property
    def scale(self) -> float:
        """The module's scale ``s`` from the config, at the factors' rank."""
        return self.lora_config.scale_for(self.where, int(self.a.shape[-1]))

    @property
    def canonical(self) -> bool:
        """Whether W's axes are in the factors' order (stack, input, output)."""
        layouts = self.lora_config.layouts
        layout = axes_order.layout_at(layouts, self.where, self.names[-1], self.shape)
        return axes_order.is_canonical(layout)

    def merged(self) -> jax.Array:
        """``W`` folded with its adapter, as :func:`jaxlora.merge` folds it, in W's dtype."""
        weight = self.base
        if is_quantized(weight):
            weight = dequantize(weight)
        out, _ = core.fold_module(self.factors, self.names, weight, self.lora_config, 1.0)
        return out

    def read(self) -> Any:
        """What a read of the weight sees: W inside :func:`consuming`, else the merged weight."""
        return self.base if _is_consumed(self) else self.merged()

    def __jax_array__(self) -> jax.Array:
        # Code that takes the raw variable (``self.variables``) into a jnp op reads it too.
        return self.read()

    # flax.core.meta.AxisMetadata: how linen reads it, and how nn.scan / nn.vmap slice it.
    def unbox(self) -> Any:
        return self.read()

    def replace_boxed(self, val: Any) -> AdaptedWeight:
        return self.replace(weight=val)

    def add_axis(self, index: int, params: dict[str, Any]) -> AdaptedWeight:
        if isinstance(self.weight, meta.AxisMetadata):
            return self.replace(weight=self.weight.add_axis(index, params))
        return self

    def remove_axis(self, index: int, params: dict[str, Any]) -> AdaptedWeight:
        if isinstance(self.weight, meta.AxisMetadata):
            return self.replace(weight=self.weight.remove_axis(index, params))
        return self


_WHOLE = object()  # no index given: the whole value


class AdaptedParam(nnx.Param):
    """An NNX ``Param`` whose value is an :class:`AdaptedWeight`: reading it gives what
    :meth:`AdaptedWeight.read` gives; ``shape`` and ``dtype`` are W's."""

    def get_value(self, *, index: Any = _WHOLE) -> Any:  # type: ignore[override]
        value = self.get_raw_value().read()
        return value if index is _WHOLE or index is Ellipsis else value[index]

    @property
    def adapted(self) -> AdaptedWeight:
        return self.get_raw_value()

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.get_raw_value().shape

    @property
    def dtype(self) -> Any:
        return self.get_raw_value().dtype

    @property
    def ndim(self) -> int:
        return self.get_raw_value().ndim


def adapted_leaf(config: LoraConfig):
    """The ``fold`` of :func:`core.map_adapted` that wraps a weight instead of folding it."""
    adapter = variants.adapter_leaves()

    def wrap(module, names, weight):
        factors = {n: module[n] for n in adapter if n in module}
        adapted = AdaptedWeight(weight, factors, names=tuple(names), config=config)
        # The checks of `merge` (factors present and fitting, a known variant), traced only.
        jax.eval_shape(adapted.merged)
        return adapted, tuple(factors)

    return wrap


def _hoist(node: Any) -> Any:
    """A box (``nn.LogicallyPartitioned``, ...) around an adapted weight, turned inside out: the
    adapted weight outermost, so that the box's own unboxing happens inside its read."""
    inner = getattr(node, "value", None)
    if isinstance(node, meta.AxisMetadata) and isinstance(inner, AdaptedWeight):
        return inner.replace(weight=node.replace_boxed(inner.weight))
    return node


def adapted_params(frozen: Params, lora: LoraTree, config: LoraConfig) -> Params:
    """``frozen`` with each weight that Θ adapts as an :class:`AdaptedWeight` and each trainable
    copy of Θ in place of its base leaf: the params the factored forward runs on.

    :func:`jaxlora.apply` builds them for you; use this to call a linen model's ``apply``
    yourself under :func:`jaxlora.lora_interceptor` (e.g. together with interceptors of your own).
    Read outside a known layer's call, each adapted weight is ``W + s·A·B``, so a plain
    ``model.apply`` on these params equals ``mode="merged"``.

    Raises:
        ValueError: as :func:`jaxlora.merge` does, when Θ does not fit ``frozen``.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxlora
        >>> model, x = nn.Dense(3), jnp.ones((1, 4))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> config = jaxlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
        >>> frozen, lora = jaxlora.split(params, config, jax.random.key(1))
        >>> tree = {"params": jaxlora.adapted_params(frozen, lora, config)}
        >>> with nn.intercept_methods(jaxlora.lora_interceptor(config)):
        ...     y = model.apply(tree, x)
        >>> merged = model.apply({"params": jaxlora.merge(frozen, lora, config)}, x)
        >>> bool(jnp.allclose(y, merged, atol=1e-5))
        True
    """
    validate.tree("frozen", frozen)
    tree = core.map_adapted(
        frozen, lora, config, adapted_leaf(config), "apply", is_leaf=is_quantized
    )
    return jax.tree.map(_hoist, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
