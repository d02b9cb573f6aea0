"""Gradient checkpointing of linen submodules chosen by path, that saves memory on XLA:CPU too.

``with checkpointed(r"layers_\\d+"): ...`` (or ``jaxlora.apply(..., remat=...)``) recomputes each
selected module in the backward pass instead of keeping its activations; :func:`recompute` is the
same for one function.
"""

from jaxlora._src.forward.remat import checkpointed as checkpointed
from jaxlora._src.forward.remat import recompute as recompute

__all__ = ["checkpointed", "recompute"]
