"""Adapter initialisations beyond PEFT's defaults: PiSSA (Meng et al., 2024).

:func:`pissa_split` starts A and B from the top singular vectors of each adapted kernel and takes
that part out of the frozen base, so the model is unchanged at step 0 but trains its principal
subspace.
"""

from jaxlora._src.tree.pissa import pissa_factors as pissa_factors
from jaxlora._src.tree.pissa import pissa_split as pissa_split

__all__ = ["pissa_factors", "pissa_split"]
