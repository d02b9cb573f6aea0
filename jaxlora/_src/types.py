"""Type aliases shared by the jaxlora modules."""

from __future__ import annotations

from typing import Any, TypeAlias

import jax

#: A parameter pytree: a linen ``params`` dict, an ``nnx.State``, an Equinox module (or its
#: ``eqx.partition`` arrays), or any pytree (dataclasses, NamedTuples, lists, tuples, dicts with
#: any keys) whose leaves are arrays or :class:`jax.ShapeDtypeStruct`.
Params: TypeAlias = Any

#: The adapter Θ: nested dicts mirroring the nesting of :data:`Params`, holding only the adapted
#: modules (``lora_a`` / ``lora_b``) and any trainable copies (biases, ``modules_to_save``). Its
#: keys are the raw keys of the params tree's own key paths, whatever the tree's types: dict keys
#: as they are (ints stay ints), sequence indices as ints, attribute names (Equinox modules,
#: dataclasses, NamedTuples) as strings; see :func:`jaxlora._src.tree.pairing.adapter_for`.
LoraTree: TypeAlias = dict[Any, Any]

#: A JAX PRNG key (new-style ``jax.random.key`` or legacy ``uint32[2]``).
PRNGKey: TypeAlias = jax.Array

#: A module path: the keys from the root of the params tree down to a module, as strings.
ModulePath: TypeAlias = tuple[str, ...]

#: Names of the two adapter factors inside an adapted module of :data:`LoraTree`.
LORA_A = "lora_a"
LORA_B = "lora_b"
#: DoRA's per-output-column magnitude, beside ``lora_a`` / ``lora_b`` (see :mod:`jaxlora.variants`).
LORA_MAGNITUDE = "lora_magnitude"
#: Axis letters for generated einsum specs (52 distinct names).
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Every leaf name that belongs to an adapter rather than to the base model.
ADAPTER_LEAVES = (LORA_A, LORA_B, LORA_MAGNITUDE)
