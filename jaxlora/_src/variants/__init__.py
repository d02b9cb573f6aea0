"""LoRA variants: each is one module defining a :class:`~jaxlora._src.variants.base.Variant`,
registered here. A new variant is a new module plus one ``register`` line."""

from jaxlora._src.variants import base, dora, lora

base.register(lora.LORA)
base.register(dora.DORA)
