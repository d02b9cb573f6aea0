"""Quantised storage of frozen kernels: int8 per output channel, NF4 block-wise, GGUF Q4_1.

LoRA trains only Θ, so the frozen base can be stored in fewer bits (QLoRA, Dettmers et al., 2023).
:func:`quantize` replaces selected kernels of a params tree by :class:`QuantizedKernel` leaves,
pytrees of integer codes and float scales; :func:`dequantize_tree` turns them back into float
arrays inside a jitted loss. Nothing is ever differentiated w.r.t. the codes: gradients are taken
w.r.t. Θ only (``jax.grad(loss)(lora, qfrozen, batch)``).

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
  minimum ``m``, ``W ≈ d·q + m``); :func:`from_gguf_q4_1` keeps a GGUF tensor in this form.

Merging an adapter into a quantised base (:func:`merge_quantized`, then :func:`requantize`) is
lossy: :func:`requantization_error` measures it. Measured on a 1024×1024 kernel drawn from
N(0, 0.02²) with a random rank-8 update of relative size ‖sΔW‖/‖W‖ = 0.05 (``python -m
jaxlora.quant``): after int8 requantisation the merged weight is off by 0.79% (relative Frobenius
error) and the update by 15.7%; after NF4 by 5.2% and 104%: the NF4 rounding error is as large as
the whole update, so a merged QLoRA adapter should be deployed on a float (or int8) base, or kept
unmerged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import core, paths
from jaxlora.config import LoraConfig
from jaxlora.targets import find_targets
from jaxlora.types import LORA_A, LORA_B, LoraTree, Params, PRNGKey

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


def _pack(codes: jax.Array) -> jax.Array:
    """Codes 0..15 of shape ``(..., n)`` -> bytes ``(..., n // 2)``: first half low, second high."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << np.uint8(4))


def _unpack(packed: jax.Array) -> jax.Array:
    return jnp.concatenate([packed & _LOW, packed >> np.uint8(4)], axis=-1)


def _blocks(w: jax.Array, n_stack: int, block_size: int) -> jax.Array:
    """``stack + rest`` -> ``stack + (n_blocks, block_size)`` float32, zero-padded at the end."""
    stack = w.shape[:n_stack]
    flat = w.astype(jnp.float32).reshape(stack + (-1,))
    pad = -flat.shape[-1] % block_size
    flat = jnp.pad(flat, [(0, 0)] * n_stack + [(0, pad)])
    return flat.reshape(stack + (-1, block_size))


def _unblock(blocks: jax.Array, stack: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
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


def _q4_1(w: jax.Array, layout: str, transposed: bool) -> QuantizedKernel:
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
    block_size: int = 64,
    double_quant: bool = False,
) -> QuantizedKernel:
    """Quantises one kernel; ``layout`` (default ``"io"`` for 2-D) names its axes.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_kernel(jnp.linspace(-1, 1, 512).reshape(16, 32), "int8")
        >>> q.codes.dtype, q.scale.shape, q.shape
        (dtype('int8'), (1, 32), (16, 32))
    """
    _check_options(method, block_size, double_quant)
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
        return _nf4(w, layout, block_size, double_quant)
    return _q4_1(w, layout, transposed=False)


def dequantize(leaf: QuantizedKernel, dtype: Any = None) -> jax.Array:
    """The float kernel a :class:`QuantizedKernel` stands for (in its original dtype by default).

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.linspace(-1, 1, 256).reshape(16, 16)
        >>> bool(jnp.abs(dequantize(quantize_kernel(w, "nf4")) - w).max() < 0.16)
        True
    """
    if not isinstance(leaf, QuantizedKernel):
        raise TypeError(f"`leaf` must be a QuantizedKernel, got {type(leaf).__name__}")
    dtype = jnp.dtype(dtype or leaf.dtype)
    if leaf.method == "int8":
        return (leaf.codes.astype(jnp.float32) * leaf.scale).astype(dtype)
    stack = leaf.stack_shape
    codes = _unpack(leaf.codes)
    if leaf.method == "nf4":
        absmax = leaf.scale
        if leaf.scale_scale is not None:
            grouped = leaf.scale.astype(jnp.float32) * leaf.scale_scale + leaf.scale_mean
            absmax = grouped.reshape(stack + (-1,))[..., : codes.shape[-2]]
        values = jnp.asarray(NF4_LEVELS, jnp.float32)[codes] * absmax[..., None]
    else:
        d, m = leaf.scale.astype(jnp.float32), leaf.zero.astype(jnp.float32)
        values = d[..., None] * codes.astype(jnp.float32) + m[..., None]
    shape = leaf.kernel_shape[::-1] if leaf.transposed else leaf.kernel_shape
    out = _unblock(values, stack, shape)
    return (jnp.swapaxes(out, -1, -2) if leaf.transposed else out).astype(dtype)


def dequantize_tree(params: Params, dtype: Any = None) -> Params:
    """``params`` with every :class:`QuantizedKernel` replaced by its float kernel."""
    return jax.tree.map(
        lambda x: dequantize(x, dtype) if is_quantized(x) else x, params, is_leaf=is_quantized
    )


def shapes(params: Params) -> Params:
    """``params`` with each :class:`QuantizedKernel` replaced by a ``jax.ShapeDtypeStruct``."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )


def _check_options(method: str, block_size: int, double_quant: bool) -> None:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"`block_size` must be an even int >= 2, got {block_size!r}")
    if block_size % 2:
        raise ValueError(f"`block_size` must be even (two 4-bit codes per byte), got {block_size}")
    if double_quant and method != "nf4":
        raise ValueError(f"`double_quant=True` applies to `method='nf4'` only, got {method!r}")


def quantize(
    params: Params,
    targets: LoraConfig | str | Sequence[str] = "all-linear",
    method: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
) -> Params:
    """Replaces the selected kernels of ``params`` by :class:`QuantizedKernel` leaves.

    Args:
        params: float params (a nested dict; the rest of the tree is returned as it is).
        targets: which kernels: a ``LoraConfig`` (its targets and layouts) or a
            ``target_modules`` value (list of names, regex, or ``"all-linear"``, the default,
            which like QLoRA quantises every dense kernel except the output head).
        method: ``"int8"``, ``"nf4"`` or ``"q4_1"``.
        block_size: elements per absmax block for NF4 (Q4_1 blocks are always 32).
        double_quant: store NF4 absmax values as int8 too (NF4 only).

    Returns:
        ``params`` with the chosen kernels quantised. Split the adapter with
        :func:`split_quantized` (or split the float params first, then quantise the frozen tree).

    Raises:
        ValueError: for an unknown ``method``, a bad ``block_size``, or targets matching nothing.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"q": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)}}
        >>> qparams = quantize(params, ["q"], "nf4")
        >>> type(qparams["q"]["kernel"]).__name__, qparams["q"]["kernel"].nbytes
        ('QuantizedKernel', 2304)
    """
    _check_options(method, block_size, double_quant)
    config = targets if isinstance(targets, LoraConfig) else LoraConfig(target_modules=targets)
    chosen = {t.keys + (t.leaf,): t.layout for t in find_targets(params, config)}

    def convert(keys, _, leaf):
        if keys not in chosen:
            return leaf
        return quantize_kernel(leaf, method, chosen[keys], block_size, double_quant)

    return paths.map_with_keys(convert, params)


def requantize(params: Params, like: Params) -> Params:
    """Quantises the leaves of float ``params`` where ``like`` holds a :class:`QuantizedKernel`,
    with the same method, block size, double quantisation and layout."""

    def convert(leaf, ref):
        if not is_quantized(ref):
            return leaf
        if ref.method == "q4_1":
            return _q4_1(leaf, ref.layout, ref.transposed)
        return quantize_kernel(
            leaf, ref.method, ref.layout, ref.block_size or 64, ref.scale_scale is not None
        )

    return jax.tree.map(convert, params, like, is_leaf=is_quantized)


def split_quantized(qfrozen: Params, config: LoraConfig, key: PRNGKey) -> tuple[Params, LoraTree]:
    """:func:`jaxlora.split` for a base whose kernels are quantised: ``(qfrozen, lora)``.

    Raises:
        ValueError: when a trainable copy (``modules_to_save``) would be a quantised kernel.
    """
    view = shapes(qfrozen)
    for _, names, leaf in paths.flatten(view):
        if isinstance(leaf, jax.ShapeDtypeStruct) and config.modules_to_save:
            if any(
                paths.matches_literal(n, paths.join(names[:-1])) for n in config.modules_to_save
            ):
                raise ValueError(
                    f"`modules_to_save` takes the quantised kernel `{paths.join(names)}`; a "
                    "module trained in full must stay in float: leave it out of `quantize`"
                )
    return qfrozen, core.split(view, config, key)[1]


def merge_quantized(qfrozen: Params, lora: LoraTree, config: LoraConfig) -> Params:
    """``jaxlora.merge`` on the dequantised base: float params ``dequant(W) + s·A·B``.

    Use it inside the jitted loss for QLoRA training on the merged path; pass the result to
    :func:`requantize` to store the merged model quantised again (lossy: see
    :func:`requantization_error`).
    """
    return core.merge(dequantize_tree(qfrozen), lora, config)


def requantization_error(
    qfrozen: Params, lora: LoraTree, config: LoraConfig
) -> dict[str, dict[str, float]]:
    """What merging then requantising loses, per quantised adapted kernel.

    Returns:
        ``{module path: {"weight": ‖Q(W') − W'‖ / ‖W'‖, "update": ‖Q(W') − W − sΔW‖ / ‖sΔW‖}}``
        with ``W`` the dequantised base and ``W' = W + sΔW`` the float merge.
    """
    base = dequantize_tree(qfrozen)
    merged = core.merge(base, lora, config)
    again = dequantize_tree(requantize(merged, qfrozen))
    out = {}
    for keys, names, leaf in paths.flatten(shapes(qfrozen)):
        if not isinstance(leaf, jax.ShapeDtypeStruct) or paths.get_in(lora, keys[:-1]) is None:
            continue
        w, w2, q = (np.asarray(paths.get_in(t, keys), np.float64) for t in (base, merged, again))
        update = np.linalg.norm(w2 - w)
        out[paths.join(names[:-1])] = {
            "weight": float(np.linalg.norm(q - w2) / np.linalg.norm(w2)),
            "update": float(np.linalg.norm(q - w - (w2 - w)) / update) if update else 0.0,
        }
    return out


def from_gguf_q4_1(
    raw: np.ndarray, shape: Sequence[int], dtype: Any = "float32"
) -> QuantizedKernel:
    """Keeps a GGUF Q4_1 tensor 4-bit, as the flax kernel ``(in, out)`` it stands for.

    Args:
        raw: the tensor's bytes as ``gguf.GGUFReader`` gives them (``tensor.data``: uint8,
            ``(out, in // 32 * 20)``; each 20-byte block is ``d`` f16, ``m`` f16, 16 code bytes).
        shape: the flax kernel shape ``(in, out)``.
        dtype: what :func:`dequantize` returns.
    """
    n_in, n_out = (int(n) for n in shape)
    raw = np.asarray(raw, np.uint8)
    if n_in % Q4_1_BLOCK or raw.size != n_out * n_in // Q4_1_BLOCK * 20:
        raise ValueError(
            f"`raw` of {raw.size} bytes does not hold Q4_1 blocks of a kernel of shape "
            f"{(n_in, n_out)}: expected {n_out * n_in // Q4_1_BLOCK * 20} bytes and `in` a "
            f"multiple of {Q4_1_BLOCK}"
        )
    blocks = raw.reshape(-1, 20)
    d = np.ascontiguousarray(blocks[:, 0:2]).view(np.float16)[:, 0]
    m = np.ascontiguousarray(blocks[:, 2:4]).view(np.float16)[:, 0]
    return QuantizedKernel(
        jnp.asarray(blocks[:, 4:]), jnp.asarray(d), jnp.asarray(m), method="q4_1",
        kernel_shape=(n_in, n_out), dtype=jnp.dtype(dtype).name, layout="io",
        block_size=Q4_1_BLOCK, transposed=True,
    )  # fmt: skip


def permute_rows(leaf: QuantizedKernel, fn: Callable[[np.ndarray], np.ndarray]) -> QuantizedKernel:
    """Applies a row permutation ``fn`` (on GGUF's ``(out, ...)`` rows) to a transposed Q4_1 leaf,
    e.g. ``jaxlora.models.llama_weights.gguf_rows_to_hf`` for Hugging Face's q/k row order."""
    n_out = leaf.kernel_shape[1]
    arrays = [np.asarray(x).reshape(n_out, -1) for x in (leaf.codes, leaf.scale, leaf.zero)]
    codes, d, m = (jnp.asarray(fn(x).reshape(-1, *np.shape(y)[1:])) for x, y in
                   zip(arrays, (leaf.codes, leaf.scale, leaf.zero), strict=True))  # fmt: skip
    return dataclasses.replace(leaf, codes=codes, scale=d, zero=m)


def load_gguf_llama(path: str | None = None, hf_layout: bool = False) -> tuple[Any, Params]:
    """Loads a Llama GGUF file (default: SmolLM2-135M-Instruct) keeping Q4_1 kernels 4-bit.

    Like ``jaxlora.models.llama_weights.load_smollm2``, but every Q4_1 weight becomes a
    :class:`QuantizedKernel` holding the file's own blocks (dequantised on the fly by
    :func:`dequantize` / :func:`interceptor`); other tensors are read as float32.

    Returns:
        ``(LlamaConfig, params)``.
    """
    from gguf import GGMLQuantizationType

    from jaxlora.models import llama_weights as lw
    from jaxlora.models.gguf_reader import GGUFFile

    file = GGUFFile(lw.smollm2_path() if path is None else path)
    config = lw.config_from_gguf(file)
    params: dict[Any, Any] = {}
    for name in file.tensor_names:
        key = lw._flax_key(name)
        if key is None:
            raise ValueError(f"GGUF tensor `{name}` of `{file.path}` has no place in the model")
        info = file._tensors[name]
        heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(key[-2])
        rows = (
            functools.partial(lw.gguf_rows_to_hf, num_heads=heads) if hf_layout and heads else None
        )
        if info.tensor_type == GGMLQuantizationType.Q4_1 and key[-1] == "kernel":
            n_out, n_in = (int(n) for n in reversed(info.shape))
            leaf = from_gguf_q4_1(info.data, (n_in, n_out))
            leaf = permute_rows(leaf, rows) if rows else leaf
        else:
            weight = file.tensor(name)
            weight = rows(weight) if rows else weight
            leaf = jnp.asarray(weight.T if key[-1] == "kernel" else weight)
        paths.set_in(params, key, leaf)
    if hf_layout:
        config = dataclasses.replace(config, rope_interleaved=False)
    return config, params


def tie(tree: Params, anchor: Any) -> Params:
    """``tree`` with ``0·anchor`` added to the codes and a float scale of each
    :class:`QuantizedKernel`.

    The values do not change, but each kernel's dequantisation now depends on ``anchor`` (a layer
    input, or the cotangent in the backward pass), so XLA cannot hoist it to the start of the
    program. XLA:CPU drops ``optimization_barrier`` and, without a data dependence, computes every
    kernel's float copy up front and keeps them all live, which undoes the memory saving.
    """
    zero = jnp.ravel(anchor)[0].astype(jnp.float32) * np.float32(0)

    def tie_leaf(leaf):
        if not is_quantized(leaf):
            return leaf
        # Both the codes and a float scale: unpacking the codes alone is a full-size temporary.
        field = "scale_scale" if leaf.scale_scale is not None else "scale"
        value = getattr(leaf, field)
        codes = leaf.codes + zero.astype(leaf.codes.dtype)
        return dataclasses.replace(leaf, codes=codes, **{field: value + zero.astype(value.dtype)})

    return jax.tree.map(tie_leaf, tree, is_leaf=is_quantized)


def _dequantized_call(layer, method: str, kwargs: dict) -> Callable[..., Any]:
    """``f(qparams, fparams, args)``: the layer on dequantised kernels, with a VJP that keeps only
    the codes and inputs and dequantises again once the cotangent exists."""

    def call(qparams, fparams, args):
        variables = {"params": {**fparams, **dequantize_tree(qparams)}}
        return layer.apply(variables, *args, method=method, **kwargs)

    @jax.custom_vjp
    def run(qparams, fparams, args):
        return call(tie(qparams, args[0]), fparams, args)

    def forward(qparams, fparams, args):
        return run(qparams, fparams, args), (qparams, fparams, args)

    def backward(residuals, cotangent):
        qparams, fparams, args = residuals
        tied = tie(qparams, jax.tree.leaves(cotangent)[0])
        _, vjp = jax.vjp(lambda f, a: call(tied, f, a), fparams, args)
        return (None, *vjp(cotangent))

    run.defvjp(forward, backward)
    return run


def interceptor() -> Callable[..., Any]:
    """A ``flax.linen.intercept_methods`` interceptor that runs layers whose params hold a
    :class:`QuantizedKernel` on the dequantised kernel. Only the codes and the layer inputs are
    kept for the backward pass, which dequantises again (and re-runs the layer's forward to get
    its VJP), so no float copy of a kernel outlives its use.

    Enter it *inside* the LoRA interceptor, so that it is the last one called before the layer:
    ``with nn.intercept_methods(lora_interceptor(config)), nn.intercept_methods(interceptor()):``.
    LoRA factors are not passed on to the dequantised layer; float params beside the kernel (a
    bias, trainable or not) get their gradients as usual.
    """

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        params = module.variables.get("params", {}) if context.method_name in (
            "__call__", "attend") else {}  # fmt: skip
        if not args or not any(is_quantized(v) for v in params.values()):
            return next_fun(*args, **kwargs)
        own = {k: v for k, v in params.items() if k not in (LORA_A, LORA_B, "lora_magnitude")}
        qparams = {k: v for k, v in own.items() if is_quantized(v)}
        fparams = {k: v for k, v in own.items() if not is_quantized(v)}
        run = _dequantized_call(module.clone(parent=None), context.method_name, kwargs)
        return run(qparams, fparams, tuple(args))

    return intercept


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
