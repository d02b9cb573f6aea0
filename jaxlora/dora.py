"""DoRA (Liu et al., 2024): weight-decomposed LoRA, a magnitude per output column beside A and B."""

from jaxlora._src.variants.dora import column_norm as column_norm
from jaxlora._src.variants.dora import dora_kernel as dora_kernel
from jaxlora._src.variants.dora import dora_merge as dora_merge
from jaxlora._src.variants.dora import dora_split as dora_split
from jaxlora._src.variants.dora import magnitude_factor as magnitude_factor

__all__ = ["column_norm", "dora_kernel", "dora_merge", "dora_split", "magnitude_factor"]
