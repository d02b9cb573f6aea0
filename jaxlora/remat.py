"""Gradient checkpointing of submodules chosen by path, that saves memory on XLA:CPU too.

``with checkpointed(r"layers_\\d+"): ...`` around a linen apply, ``with checkpointed_nnx(module,
r"blocks/\\d+"): ...`` around an NNX module's call (or ``jaxlora.apply(..., remat=...)`` on either)
recomputes each selected module in the backward pass instead of keeping its activations;
:func:`recompute` is the same for one function.
"""

from jaxlora._src.forward.nnx_remat import checkpointed as checkpointed_nnx
from jaxlora._src.forward.remat import checkpointed as checkpointed
from jaxlora._src.forward.remat import recompute as recompute

__all__ = ["checkpointed", "checkpointed_nnx", "recompute"]
