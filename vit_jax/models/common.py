"""Pieces shared by every model family: compute dtype, logical axes, remat.

Parameters are always float32. The compute dtype decides the dtype of
activations and of matmul/convolution inputs; with bfloat16 the products are
accumulated in float32 (`preferred_element_type`) and rounded back, which is
both what TPUs do natively and what makes AMX-BF16 CPUs fast (a bfloat16 to
bfloat16 matmul is not).
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

COMPUTE_DTYPES = ('float32', 'bfloat16')

# Rematerialisation policies by name; 'none' disables remat altogether.
REMAT_POLICIES = (
  'none',
  'nothing_saveable',
  'dots_saveable',
  'dots_with_no_batch_dims_saveable',
  'everything_saveable',
)


def compute_dtype(name: str | Dtype) -> Dtype:
  """Returns the jnp dtype for a compute-dtype name, checking it."""
  if not isinstance(name, str):
    name = jnp.dtype(name).name
  if name not in COMPUTE_DTYPES:
    raise ValueError(
      f'Unknown compute dtype {name!r}; use one of {COMPUTE_DTYPES}.'
    )
  return jnp.dtype(name)


def dot_general(
  dtype: Dtype, output_dtype: Dtype | None = None
) -> Callable[..., jax.Array] | None:
  """A dot_general for flax layers that accumulates in float32.

  The result is rounded to `output_dtype` (default: `dtype`). Returns None
  (the layer's default) for float32 compute.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return None
  output_dtype = dtype if output_dtype is None else output_dtype

  def accumulate_in_float32(lhs, rhs, *args, **kwargs):
    kwargs['preferred_element_type'] = jnp.float32
    return jax.lax.dot_general(lhs, rhs, *args, **kwargs).astype(output_dtype)

  return accumulate_in_float32


def conv_general_dilated(dtype: Dtype) -> Callable[..., jax.Array] | None:
  """A conv_general_dilated for flax layers that accumulates in float32."""
  if jnp.dtype(dtype) == jnp.float32:
    return None

  def accumulate_in_float32(lhs, rhs, *args, **kwargs):
    kwargs['preferred_element_type'] = jnp.float32
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs).astype(dtype)

  return accumulate_in_float32


def partitioned(
  init: nn.initializers.Initializer, names: Sequence[str | None]
) -> nn.initializers.Initializer:
  """Attaches logical axis names to a parameter initializer."""
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical axis names.

  A no-op unless the caller set `nn.logical_axis_rules` and a mesh.
  """
  return nn.with_logical_constraint(x, tuple(names))


def remat_policy(name: str):
  """Returns the jax.checkpoint policy for a name (None for 'none')."""
  if name not in REMAT_POLICIES:
    raise ValueError(
      f'Unknown remat policy {name!r}; use one of {REMAT_POLICIES}.'
    )
  if name == 'none':
    return None
  return getattr(jax.checkpoint_policies, name)
