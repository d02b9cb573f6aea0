"""LoRA variants: what an adapted module holds beside A and B, and how it folds and runs.

``jaxlora.split(params, config, key, variant="dora")`` makes a DoRA adapter (Liu et al., 2024:
weight-decomposed LoRA, a magnitude ``lora_magnitude`` per output column beside the factors);
``variant="lora"``, the default, plain LoRA. ``jaxlora.merge``, ``jaxlora.unmerge``,
``jaxlora.apply`` and the PEFT files tell each module's variant from the leaves it holds
(:func:`variant_of`), so one adapter may mix variants module by module.

A new variant is a subclass of :class:`Variant` (its extra leaves, init, merge, unmerge, factored
output and PEFT file entries) passed to :func:`register`; nothing else changes. Its extra leaves
are a tuple of new names: never a bare str, ``lora_a`` / ``lora_b``, or a base module's leaf
(``kernel``, ``embedding``, ``bias``, ``scale``), which would make plain modules look like the
variant; :func:`register` refuses them.

Example:
    >>> import jax, jax.numpy as jnp, jaxlora
    >>> params = {"q": {"kernel": jnp.full((4, 3), 2.0)}}
    >>> config = jaxlora.LoraConfig(r=2, target_modules=["q"])
    >>> frozen, lora = jaxlora.split(params, config, jax.random.key(0), variant="dora")
    >>> lora["q"]["lora_magnitude"]
    Array([4., 4., 4.], dtype=float32)
    >>> variant_of(lora["q"]).name
    'dora'
"""

from jaxlora._src.types import LORA_MAGNITUDE as LORA_MAGNITUDE
from jaxlora._src.variants.base import FileEntry as FileEntry
from jaxlora._src.variants.base import Variant as Variant
from jaxlora._src.variants.base import adapter_variant as adapter_variant
from jaxlora._src.variants.base import get as get
from jaxlora._src.variants.base import register as register
from jaxlora._src.variants.base import unregister as unregister
from jaxlora._src.variants.base import variant_of as variant_of
from jaxlora._src.variants.base import variants_in as variants_in
from jaxlora._src.variants.dora import DORA as DORA
from jaxlora._src.variants.dora import PEFT_MAGNITUDE as PEFT_MAGNITUDE
from jaxlora._src.variants.dora import column_norm as column_norm
from jaxlora._src.variants.dora import dora_kernel as dora_kernel
from jaxlora._src.variants.dora import magnitude_factor as magnitude_factor
from jaxlora._src.variants.lora import LORA as LORA

__all__ = [
    "DORA",
    "LORA",
    "LORA_MAGNITUDE",
    "PEFT_MAGNITUDE",
    "FileEntry",
    "Variant",
    "adapter_variant",
    "column_norm",
    "dora_kernel",
    "get",
    "magnitude_factor",
    "register",
    "unregister",
    "variant_of",
    "variants_in",
]
