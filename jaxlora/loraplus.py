"""LoRA+ (Hayou et al., 2024): a larger learning rate for B than for A, as an optax transform."""

from jaxlora._src.optim.loraplus import LABELS as LABELS
from jaxlora._src.optim.loraplus import loraplus as loraplus
from jaxlora._src.optim.loraplus import loraplus_labels as loraplus_labels

__all__ = ["LABELS", "loraplus", "loraplus_labels"]
