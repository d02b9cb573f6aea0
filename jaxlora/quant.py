"""Quantised storage of frozen kernels: int8 per output channel, NF4 block-wise, GGUF Q4_1.

LoRA trains only Θ, so the frozen base can be stored in fewer bits (QLoRA, Dettmers et al., 2023).
:func:`quantize` replaces selected kernels of a params tree by :class:`QuantizedKernel` leaves,
pytrees of integer codes and float scales; :func:`dequantize_tree` turns them back into float
arrays inside a jitted loss. Nothing is ever differentiated w.r.t. the codes: gradients are taken
w.r.t. Θ only (``jax.grad(loss)(lora, frozen, batch)``).

The implementation is in four smaller modules under ``jaxlora/_src/quant/``: ``kernel`` (one
kernel and its formats), ``tree`` (whole params trees), ``gguf`` (GGUF Q4_1 tensors) and
``forward`` (the layer-by-layer dequantising forward that :func:`jaxlora.apply` enters). A Llama
GGUF file is loaded 4-bit by :func:`jaxlora.models.load_gguf_llama`.

Merging an adapter into a quantised base (:func:`merge_quantized`, then :func:`requantize`) is
lossy: :func:`requantization_error` measures it. Measured on a 1024×1024 kernel drawn from
N(0, 0.02²) with a random rank-8 update of relative size ‖sΔW‖/‖W‖ = 0.05 (``python -m
experiments.benchmarks.requantization_error``): after int8 requantisation the merged weight is off
by 0.79% (relative Frobenius error) and the update by 15.7%; after NF4 by 5.2% and 104%: the NF4
rounding error is as large as the whole update, so a merged QLoRA adapter should be deployed on a
float (or int8) base, or kept unmerged.
"""

from __future__ import annotations

from jaxlora._src.quant.dequantize import dequantize as dequantize
from jaxlora._src.quant.dequantize import dequantize_tree as dequantize_tree
from jaxlora._src.quant.forward import dequantizing_interceptor as dequantizing_interceptor
from jaxlora._src.quant.forward import tie as tie
from jaxlora._src.quant.gguf import from_gguf_q4_1 as from_gguf_q4_1
from jaxlora._src.quant.gguf import permute_rows as permute_rows
from jaxlora._src.quant.kernel import DOUBLE_QUANT_GROUP as DOUBLE_QUANT_GROUP
from jaxlora._src.quant.kernel import METHODS as METHODS
from jaxlora._src.quant.kernel import NF4_LEVELS as NF4_LEVELS
from jaxlora._src.quant.kernel import Q4_1_BLOCK as Q4_1_BLOCK
from jaxlora._src.quant.kernel import QuantizedKernel as QuantizedKernel
from jaxlora._src.quant.kernel import is_quantized as is_quantized
from jaxlora._src.quant.kernel import quantize_kernel as quantize_kernel
from jaxlora._src.quant.tree import merge_quantized as merge_quantized
from jaxlora._src.quant.tree import quantize as quantize
from jaxlora._src.quant.tree import requantization_error as requantization_error
from jaxlora._src.quant.tree import requantize as requantize
from jaxlora._src.quant.tree import shapes as shapes
from jaxlora._src.quant.tree import split_quantized as split_quantized

__all__ = [
    "DOUBLE_QUANT_GROUP",
    "METHODS",
    "NF4_LEVELS",
    "Q4_1_BLOCK",
    "QuantizedKernel",
    "dequantize",
    "dequantize_tree",
    "dequantizing_interceptor",
    "from_gguf_q4_1",
    "is_quantized",
    "merge_quantized",
    "permute_rows",
    "quantize",
    "quantize_kernel",
    "requantization_error",
    "requantize",
    "shapes",
    "split_quantized",
    "tie",
]
