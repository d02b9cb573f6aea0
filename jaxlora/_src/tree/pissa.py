"""Adapter initialisations beyond PEFT's default: PiSSA (Meng et al., 2024).

PiSSA starts the adapter on the principal part of each kernel: with ``W = U S Vᵀ`` (the kernel
reshaped to ``fan_in × fan_out`` per stack index), ``s·A·B = U_r S_r V_rᵀ`` exactly, for the
config's scale s, and the frozen base becomes the residual ``W − s·A·B``. The model's output is
unchanged at step 0 (within float rounding), and training moves the principal directions first.
"""

from __future__ import annotations

import math

import jax
import jax.core
import jax.numpy as jnp

from jaxlora._src import paths, validate
from jaxlora._src.config import axes_order
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import Target, find_targets
from jaxlora._src.quant.kernel import is_quantized
from jaxlora._src.tree import core
from jaxlora._src.types import LORA_A, LORA_B, LoraTree, Params, PRNGKey


def _top_svd(
    m: jax.Array, rank: int, niter: int | None, key: PRNGKey
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U_r, S_r, V_rᵀ)`` of a batch of matrices: exact, or randomised with ``niter`` power
    iterations on a rank-r sketch (Halko et al., 2011; what PEFT's ``pissa_niter_k`` does)."""
    if niter is None:
        u, s, vt = jnp.linalg.svd(m, full_matrices=False)
        return u[..., :rank], s[..., :rank], vt[..., :rank, :]
    sketch = jax.random.normal(key, m.shape[:-2] + (m.shape[-1], rank), m.dtype)
    mt = jnp.swapaxes(m, -1, -2)
    q = jnp.linalg.qr(m @ sketch)[0]
    for _ in range(niter):
        q = jnp.linalg.qr(m @ jnp.linalg.qr(mt @ q)[0])[0]
    u, s, vt = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ m, full_matrices=False)
    return q @ u, s, vt


def pissa_factors(
    w: jax.Array, target: Target, niter: int | None = None, key: PRNGKey | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(a, b, residual)`` for one kernel: ``s·A·B = U_r S_r V_rᵀ``, residual ``W − s·A·B``.

    Raises:
        ValueError: when the target's scale is 0 (``lora_alpha=0``) or its rank exceeds the
            kernel's smaller side.
    """
    validate.array("w", w, floating=True, min_ndim=1, nonempty=True)
    if not isinstance(target, Target):
        raise validate.fail_type("target", "a jaxlora.Target (from `find_targets`)", target)
    if niter is not None:
        validate.integer("niter", niter, minimum=0)
    if key is not None:
        validate.prng_key("key", key)
    scale = target.scale
    n_stack = target.n_stack
    kernel = axes_order.to_canonical(w, target.layout)  # stack, input, output in that order
    fan_out = math.prod(kernel.shape[kernel.ndim - target.n_out :])
    if scale == 0:
        raise ValueError(f"PiSSA needs a nonzero scale; `{target.path}` has `lora_alpha`=0")
    if target.rank > min(target.fan_in, fan_out):
        raise ValueError(
            f"PiSSA rank {target.rank} at `{target.path}` exceeds the kernel's smaller side "
            f"min({target.fan_in}, {fan_out})"
        )
    stack = tuple(kernel.shape[:n_stack])
    matrix = kernel.astype(jnp.float32).reshape(stack + (target.fan_in, fan_out))
    key = jax.random.key(0) if key is None else key
    u, s, vt = _top_svd(matrix, target.rank, niter, key)
    root = jnp.sqrt(s / abs(scale))
    dtype = jnp.dtype("float32")
    a = (u * root[..., None, :]).astype(dtype)
    b = (math.copysign(1.0, scale) * root[..., :, None] * vt).astype(dtype)
    a, b = a.reshape(target.a_shape), b.reshape(target.b_shape)
    residual = kernel.astype(jnp.float32) - scale * core.delta(a, b, n_stack)
    return a, b, axes_order.from_canonical(residual.astype(w.dtype), target.layout)


def _check_float_base(params: Params) -> None:
    """A ValueError naming the quantised kernels of ``params``: PiSSA needs the float kernel."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    quantised = [paths.join(paths.leaf_path(kp)) for kp, leaf in flat if is_quantized(leaf)]
    if quantised:
        raise ValueError(
            f"`params` kernels {paths.preview(quantised)} are quantised; PiSSA needs the float "
            "kernel to take its SVD: run `pissa_split` on the float params, then quantise the "
            "residual (`jaxlora.quant.quantize(residual, ...)`)"
        )


def pissa_split(
    params: Params, config: LoraConfig, key: PRNGKey, niter: int | None = None
) -> tuple[Params, LoraTree]:
    """Splits ``params`` into the PiSSA residual base and an adapter on the top-r singular part.

    Args:
        params: the float params.
        config: which modules to adapt; each target's rank and scale come from it.
        key: PRNG key (trainable copies as in :func:`jaxlora.split`; the randomised SVD sketch).
        niter: None for an exact SVD, or the power iterations of a randomised rank-r SVD (fast
            for large kernels; 4 is usually plenty).

    Returns:
        ``(residual, lora)``: ``merge(residual, lora, config)`` equals ``params`` up to float32
        rounding (A, B are float32; a bfloat16 base loses the residual's low bits when cast).

    Raises:
        ValueError: for ``niter`` < 0, or as :func:`pissa_factors`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"d": {"kernel": jnp.diag(jnp.arange(1.0, 5.0))}}
        >>> config = jaxlora.LoraConfig(r=1, lora_alpha=4, target_modules=["d"])
        >>> residual, lora = pissa_split(params, config, jax.random.key(0))
        >>> jnp.diag(residual["d"]["kernel"])
        Array([1., 2., 3., 0.], dtype=float32)
        >>> bool(jnp.allclose(jaxlora.merge(residual, lora, config)["d"]["kernel"],
        ...                   params["d"]["kernel"]))
        True
    """
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"`niter` must be None or an int >= 0, got {niter!r}")
    _check_float_base(params)
    _, lora = core.split(params, config, key)
    residuals = {}
    leaves = {keys: leaf for keys, _, leaf in paths.flatten(params)}
    for target in find_targets(params, config):
        keys = target.keys + (target.leaf,)
        kernel = leaves[keys]
        concrete = isinstance(kernel, jax.Array) and not isinstance(kernel, jax.core.Tracer)
        if concrete and not bool(jnp.isfinite(kernel).all()):
            raise ValueError(
                f"`params` {target.leaf} at `{target.path}` holds NaN or inf values; PiSSA's SVD "
                "needs a finite kernel: check the checkpoint the params were loaded from"
            )
        a, b, residual = pissa_factors(leaves[keys], target, niter, core.path_key(key, target.path))
        paths.set_in(lora, target.keys + (LORA_A,), a.astype(config.dtype))
        paths.set_in(lora, target.keys + (LORA_B,), b.astype(config.dtype))
        residuals[keys] = residual
    frozen = paths.map_with_keys(lambda keys, _, leaf: residuals.get(keys, leaf), params)
    return frozen, lora
