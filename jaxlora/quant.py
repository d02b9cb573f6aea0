"""Quantised storage of frozen kernels: int8 per output channel, NF4 block-wise, GGUF Q4_1.

LoRA trains only Θ, so the frozen base can be stored in fewer bits (QLoRA, Dettmers et al., 2023).
:func:`quantize` replaces selected kernels of a params tree by :class:`QuantizedKernel` leaves,
pytrees of integer codes and float scales; :func:`dequantize_tree` turns them back into float
arrays inside a jitted loss. Nothing is ever differentiated w.r.t. the codes: gradients are taken
w.r.t. Θ only (``jax.grad(loss)(lora, qfrozen, batch)``).

This module gathers the public names of four smaller ones: :mod:`jaxlora.quant_kernel` (one
kernel and its formats), :mod:`jaxlora.quant_tree` (whole params trees), :mod:`jaxlora.quant_gguf`
(GGUF Q4_1 files) and :mod:`jaxlora.quant_forward` (the layer-by-layer dequantising forward).

Merging an adapter into a quantised base (:func:`merge_quantized`, then :func:`requantize`) is
lossy: :func:`requantization_error` measures it. Measured on a 1024×1024 kernel drawn from
N(0, 0.02²) with a random rank-8 update of relative size ‖sΔW‖/‖W‖ = 0.05 (``python -m
jaxlora.quant``): after int8 requantisation the merged weight is off by 0.79% (relative Frobenius
error) and the update by 15.7%; after NF4 by 5.2% and 104%: the NF4 rounding error is as large as
the whole update, so a merged QLoRA adapter should be deployed on a float (or int8) base, or kept
unmerged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora import core
from jaxlora.config import LoraConfig
from jaxlora.quant_forward import interceptor as interceptor
from jaxlora.quant_forward import tie as tie
from jaxlora.quant_gguf import from_gguf_q4_1 as from_gguf_q4_1
from jaxlora.quant_gguf import load_gguf_llama as load_gguf_llama
from jaxlora.quant_gguf import permute_rows as permute_rows
from jaxlora.quant_kernel import DOUBLE_QUANT_GROUP as DOUBLE_QUANT_GROUP
from jaxlora.quant_kernel import METHODS as METHODS
from jaxlora.quant_kernel import NF4_LEVELS as NF4_LEVELS
from jaxlora.quant_kernel import Q4_1_BLOCK as Q4_1_BLOCK
from jaxlora.quant_kernel import QuantizedKernel as QuantizedKernel
from jaxlora.quant_kernel import dequantize as dequantize
from jaxlora.quant_kernel import is_quantized as is_quantized
from jaxlora.quant_kernel import quantize_kernel as quantize_kernel
from jaxlora.quant_tree import dequantize_tree as dequantize_tree
from jaxlora.quant_tree import merge_quantized as merge_quantized
from jaxlora.quant_tree import quantize as quantize
from jaxlora.quant_tree import requantization_error as requantization_error
from jaxlora.quant_tree import requantize as requantize
from jaxlora.quant_tree import shapes as shapes
from jaxlora.quant_tree import split_quantized as split_quantized
from jaxlora.types import LORA_A, LORA_B

__all__ = [
    "NF4_LEVELS", "QuantizedKernel", "dequantize", "dequantize_tree", "from_gguf_q4_1",
    "interceptor", "is_quantized", "load_gguf_llama", "merge_quantized", "permute_rows", "quantize",
    "quantize_kernel", "requantization_error", "requantize", "shapes", "split_quantized", "tie",
]  # fmt: skip

if __name__ == "__main__":  # the requantisation figures quoted in the module docstring
    w = 0.02 * jax.random.normal(jax.random.key(0), (1024, 1024))
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["d"], init_lora_weights=False)
    for method in ("int8", "nf4"):
        q = quantize({"d": {"kernel": w}}, ["d"], method)
        _, theta = split_quantized(q, cfg, jax.random.key(1))
        rel = float(jnp.linalg.norm(core.delta(theta["d"][LORA_A], theta["d"][LORA_B])) /
                    jnp.linalg.norm(w))  # fmt: skip
        theta = jax.tree.map(lambda x, rel=rel: x * jnp.sqrt(0.05 / rel), theta)
        print(method, requantization_error(q, theta, cfg))
