"""Mixed precision: bfloat16 compute with float32 parameters, statistics and losses.

`model.dtype` = "auto" (bfloat16 on GPU/TPU, float32 on CPU, where bfloat16 is
emulated and slower), "float32" or "bfloat16"; "float64" (JAX_ENABLE_X64=1) for
numerical checks, where float32 rounding would hide what is compared (a ReLU input
within rounding of 0 can take either branch). The parameters stay float32 in the
state and the optimiser; each forward pass casts them and the input images to the
compute dtype (the cast is differentiable, so gradients arrive in float32).
BatchNorm reduces its statistics in float32 (float64 under float64;
`fsad.models.norm.TorchBatchNorm`) and the heads hand float32 scores to the losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fsad.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def compute_dtype(name: str = "auto"):
    """The compute dtype a `model.dtype` name stands for on this backend."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    if name not in DTYPES:
        raise UserError(f"model.dtype={name!r} is not a compute dtype; use auto, float32 or "
                        f"bfloat16 (or float64 for numerical checks)")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise UserError("model.dtype=float64 needs JAX's 64-bit mode, which is off: set "
                        "JAX_ENABLE_X64=1, or use float32")
    return DTYPES[name]


def accumulation_dtype(dtype):
    """The dtype that sums of `dtype` values run in: float32, or the input's own where it
    is wider (float64), as a convolution kernel sums bfloat16 products in float32."""
    return jnp.promote_types(jnp.float32, dtype)


def cast_floating(tree, dtype):
    """Every floating-point leaf of a pytree cast to dtype (others untouched)."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    return jax.tree.map(cast, tree)


def apply_in(model, dtype, params, batch_stats, *inputs, **kw):
    """model.apply with params and floating inputs cast to the compute dtype; BatchNorm
    statistics (batch_stats) stay float32."""
    with jax.named_scope("cast_to_compute_dtype"):  # a name for profiles
        variables = {"params": cast_floating(params, dtype), "batch_stats": batch_stats}
        inputs = [None if x is None else cast_floating(x, dtype) for x in inputs]
    return model.apply(variables, *inputs, **kw)
