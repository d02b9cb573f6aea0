"""Gradient checkpointing of submodules chosen by path, that saves memory on XLA:CPU too.

``with checkpointed(r"layers_\\d+"): ...`` around a linen apply (or ``jaxlora.apply(...,
remat=...)`` on a linen or NNX model) recomputes each selected module in the backward pass instead
of keeping its activations; :func:`recompute` is the same for one function.
"""

from jaxlora._src.forward.remat import checkpointed as checkpointed
from jaxlora._src.forward.remat import recompute as recompute

__all__ = ["checkpointed", "recompute"]
