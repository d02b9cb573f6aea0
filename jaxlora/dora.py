"""DoRA (Liu et al., 2024): weight-decomposed LoRA, a magnitude per output column beside A and B."""

from jaxlora._src.types import LORA_MAGNITUDE as LORA_MAGNITUDE
from jaxlora._src.variants.dora import PEFT_MAGNITUDE as PEFT_MAGNITUDE
from jaxlora._src.variants.dora import column_norm as column_norm
from jaxlora._src.variants.dora import dora_kernel as dora_kernel
from jaxlora._src.variants.dora import magnitude_factor as magnitude_factor
from jaxlora._src.variants.shortcuts import dora_merge as dora_merge
from jaxlora._src.variants.shortcuts import dora_split as dora_split

__all__ = [
    "LORA_MAGNITUDE",
    "PEFT_MAGNITUDE",
    "column_norm",
    "dora_kernel",
    "dora_merge",
    "dora_split",
    "magnitude_factor",
]
