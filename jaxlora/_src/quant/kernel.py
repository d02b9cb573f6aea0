"""One quantised kernel: the :class:`QuantizedKernel` pytree and its int8, NF4 and Q4_1 formats.

Formats (all codes are per layer, so a stacked ``nn.scan`` kernel can be sliced along its stack
axes together with its codes):

* ``"int8"``: symmetric, one float32 scale per output channel (per stack index), ``W ≈ q·scale``
  with ``q`` in [-127, 127]; error at most ``scale / 2`` per element.
* ``"nf4"``: the 16 NormalFloat levels of QLoRA, one absmax per block of ``block_size`` elements
  of the kernel flattened in its own (row-major) order; two codes per byte. With
  ``double_quant=True`` the absmax values are themselves stored as int8, centred on their mean,
  with one float32 scale per group of 256 blocks (QLoRA quantises them to FP8 instead; this linear
  int8 variant has the same size, 8 bits per block, and a simple error bound).
* ``"q4_1"``: llama.cpp's GGUF Q4_1 blocks (32 elements, 4-bit codes, float16 scale ``d`` and
  minimum ``m``, ``W ≈ d·q + m``); :func:`~jaxlora.quant.from_gguf_q4_1` keeps a GGUF tensor
  in this form.

Whole params trees are :mod:`jaxlora.quant_tree`; every public name is importable from
:mod:`jaxlora.quant`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._src import validate

METHODS = ("int8", "nf4", "q4_1")
#: The 16 NF4 levels (QLoRA, Dettmers et al. 2023, Appendix E), normalised to [-1, 1].
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
#: Blocks per float32 scale of double-quantised NF4 absmax values (as in QLoRA).
DOUBLE_QUANT_GROUP = 256
#: Elements per Q4_1 block (fixed by llama.cpp).
Q4_1_BLOCK = 32
_LOW = np.uint8(0x0F)


def _static(**kwargs: Any) -> Any:
    return dataclasses.field(metadata={"static": True}, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A frozen kernel stored as integer codes plus scales; a pytree, so it passes through ``jit``.

    Attributes:
        codes: int8 (``"int8"``, kernel-shaped) or uint8 holding two 4-bit codes per byte
            (``"nf4"``, ``"q4_1"``: ``stack + (n_blocks, block_size // 2)``).
        scale: per-channel scale, per-block absmax (NF4; int8 codes when double-quantised) or
            per-block ``d`` (Q4_1, float16).
        zero: Q4_1's per-block minimum ``m`` (float16); else None.
        scale_scale: double-quantised NF4: float32 scale per group of absmax codes; else None.
        scale_mean: double-quantised NF4: the mean the absmax codes are centred on; else None.
        method: ``"int8"``, ``"nf4"`` or ``"q4_1"``.
        kernel_shape: the shape of one layer's kernel (without stacked axes).
        dtype: the dtype :func:`dequantize` returns.
        layout: the kernel's layout letters (see :mod:`jaxlora.targets`).
        block_size: elements per block (block-wise methods).
        transposed: blocks run along the rows of the transposed kernel (GGUF's ``(out, in)``).
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None = None
    scale_scale: jax.Array | None = None
    scale_mean: jax.Array | None = None
    method: str = _static(default="int8")
    kernel_shape: tuple[int, ...] = _static(default=())
    dtype: str = _static(default="float32")
    layout: str = _static(default="io")
    block_size: int = _static(default=0)
    transposed: bool = _static(default=False)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading stacked-layer axes (they shrink when ``nn.scan`` slices the codes)."""
        n_own = len(self.kernel_shape) if self.method == "int8" else 2
        return tuple(self.codes.shape[: self.codes.ndim - n_own])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float kernel this stands for."""
        return self.stack_shape + self.kernel_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes and every scale."""
        parts = (self.codes, self.scale, self.zero, self.scale_scale, self.scale_mean)
        return sum(int(p.size) * p.dtype.itemsize for p in parts if p is not None)


def is_quantized(leaf: Any) -> bool:
    """True for a :class:`QuantizedKernel` (use as ``is_leaf`` in ``jax.tree`` calls)."""
    return isinstance(leaf, QuantizedKernel)


def check_options(method: str, block_size: int | None, double_quant: bool) -> None:
    """Checks the options of :func:`quantize_kernel` (and of :func:`jaxlora.quant.quantize`).

    Raises:
        ValueError: for an unknown ``method``, a ``block_size`` that is not an even int >= 2 (or
            not 32 for Q4_1), or ``double_quant`` with a method other than NF4.
        TypeError: when ``double_quant`` is not a bool.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"`double_quant` must be True or False, got {double_quant!r}")
    if double_quant and method != "nf4":
        raise ValueError(f"`double_quant=True` applies to `method='nf4'` only, got {method!r}")
    if method == "q4_1" and block_size not in (None, Q4_1_BLOCK):
        raise ValueError(
            f"`block_size`={block_size!r} does not apply to 'q4_1', whose blocks are always "
            f"{Q4_1_BLOCK} elements (GGUF); leave `block_size` out"
        )
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"`block_size` must be an even int >= 2, got {block_size!r}")
    if block_size % 2:
        raise ValueError(f"`block_size` must be even (two 4-bit codes per byte), got {block_size}")


def _pack(codes: jax.Array) -> jax.Array:
    """Codes 0..15 of shape ``(..., n)`` -> bytes ``(..., n // 2)``: first half low, second high."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << np.uint8(4))


def unpack_codes(packed: jax.Array) -> jax.Array:
    """Two 4-bit codes per byte, back to one code per element."""
    return jnp.concatenate([packed & _LOW, packed >> np.uint8(4)], axis=-1)


def _blocks(w: jax.Array, n_stack: int, block_size: int) -> jax.Array:
    """``stack + rest`` -> ``stack + (n_blocks, block_size)`` float32, zero-padded at the end."""
    stack = w.shape[:n_stack]
    flat = w.astype(jnp.float32).reshape(stack + (-1,))
    pad = -flat.shape[-1] % block_size
    flat = jnp.pad(flat, [(0, 0)] * n_stack + [(0, pad)])
    return flat.reshape(stack + (-1, block_size))


def unblock(blocks: jax.Array, stack: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """Blocks back to the stacked kernel of ``shape`` (the padding of the last block dropped)."""
    flat = blocks.reshape(stack + (-1,))[..., : math.prod(shape)]
    return flat.reshape(stack + shape)


def _int8(w: jax.Array, layout: str) -> QuantizedKernel:
    axes = tuple(k for k, letter in enumerate(layout) if letter in "wi")
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=axes, keepdims=True) / np.float32(127)
    safe = jnp.where(scale > 0, scale, np.float32(1))
    codes = jnp.clip(jnp.round(w32 / safe), -127, 127).astype(jnp.int8)
    n_stack = layout.count("s")
    return QuantizedKernel(
        codes, scale, method="int8", kernel_shape=tuple(w.shape[n_stack:]),
        dtype=w.dtype.name, layout=layout,
    )  # fmt: skip


def _double_quant(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    mean = jnp.mean(absmax, axis=-1, keepdims=True)[..., None]  # stack + (1, 1)
    n_stack = absmax.ndim - 1
    # Centred before padding, so the zero padding never widens the last group's range.
    grouped = _blocks(absmax - mean[..., 0], n_stack, DOUBLE_QUANT_GROUP)
    scale = jnp.max(jnp.abs(grouped), axis=-1, keepdims=True) / np.float32(127)
    safe = jnp.where(scale > 0, scale, np.float32(1))
    codes = jnp.clip(jnp.round(grouped / safe), -127, 127).astype(jnp.int8)
    return codes, scale, mean


def _nf4(w: jax.Array, layout: str, block_size: int, double_quant: bool) -> QuantizedKernel:
    n_stack = layout.count("s")
    blocks = _blocks(w, n_stack, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(absmax > 0, absmax, np.float32(1))
    levels = np.asarray(NF4_LEVELS, np.float32)
    midpoints = jnp.asarray((levels[1:] + levels[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, blocks / safe[..., None]).astype(jnp.uint8)
    scale, scale_scale, scale_mean = absmax, None, None
    if double_quant:
        scale, scale_scale, scale_mean = _double_quant(absmax)
    return QuantizedKernel(
        _pack(codes), scale, None, scale_scale, scale_mean, method="nf4",
        kernel_shape=tuple(w.shape[n_stack:]), dtype=w.dtype.name, layout=layout,
        block_size=block_size,
    )  # fmt: skip


def quantize_q4_1(w: jax.Array, layout: str, transposed: bool = False) -> QuantizedKernel:
    """Q4_1 blocks of 32 elements of ``w`` flattened per layer in row-major order, or of ``w.T``
    when ``transposed`` (GGUF's ``(out, in)`` order, as :func:`~jaxlora.quant.from_gguf_q4_1`
    keeps it).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_q4_1(jnp.linspace(-1, 1, 128).reshape(2, 64), "io")
        >>> q.codes.shape, q.scale.dtype, q.zero.shape
        ((4, 16), dtype('float16'), (4,))
    """
    n_stack = layout.count("s")
    source = jnp.swapaxes(w, -1, -2) if transposed else w
    blocks = _blocks(source, n_stack, Q4_1_BLOCK)
    low, high = jnp.min(blocks, axis=-1), jnp.max(blocks, axis=-1)
    # llama.cpp's rounding: q = trunc((x - m) / d + 0.5), then d and m stored as float16.
    d = (high - low) / np.float32(15)
    inv = jnp.where(d > 0, 1 / jnp.where(d > 0, d, np.float32(1)), np.float32(0))
    q = jnp.trunc((blocks - low[..., None]) * inv[..., None] + np.float32(0.5))
    codes = jnp.clip(q, 0, 15).astype(jnp.uint8)
    return QuantizedKernel(
        _pack(codes), d.astype(jnp.float16), low.astype(jnp.float16), method="q4_1",
        kernel_shape=tuple(w.shape[n_stack:]), dtype=w.dtype.name, layout=layout,
        block_size=Q4_1_BLOCK, transposed=transposed,
    )  # fmt: skip


def quantize_kernel(
    w: jax.Array,
    method: str = "nf4",
    layout: str | None = None,
    block_size: int | None = None,
    double_quant: bool = False,
) -> QuantizedKernel:
    """Quantises one kernel; ``layout`` (default ``"io"`` for 2-D) names its axes.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_kernel(jnp.linspace(-1, 1, 512).reshape(16, 32), "int8")
        >>> q.codes.dtype, q.scale.shape, q.shape
        (dtype('int8'), (1, 32), (16, 32))
    """
    validate.array("w", w, min_ndim=1, nonempty=True)
    if layout is not None:
        validate.string("layout", layout)
    check_options(method, block_size, double_quant)
    layout = layout or ("io" if w.ndim == 2 else "")
    if len(layout) != w.ndim:
        raise ValueError(
            f"`layout`={layout!r} must give one letter per axis of the kernel of shape "
            f"{tuple(w.shape)}"
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"`w` must be a floating kernel, got dtype {w.dtype}")
    if method == "int8":
        return _int8(w, layout)
    if method == "nf4":
        return _nf4(w, layout, block_size or 64, double_quant)
    return quantize_q4_1(w, layout, transposed=False)
