"""The masked-patch-prediction objective (App. B.1.2) on the shared loop.

The model (vit_jax/models/mpp.py) corrupts half of its patch embeddings and
makes a prediction at every patch position. This module computes the targets
from the batch's images inside the step, the loss over the corrupted patches
and the evaluation metrics, and builds the pretraining Task; the data's
labels are ignored.

Targets of a P x P patch of images in [-1, 1] (uint8 / 127.5 - 1):
  'mean_color'       each channel's mean over the patch in 3 bits (8 equal
                     bins of [-1, 1]), as one of 512 classes
                     r * 64 + g * 8 + b;
  'downsized_color'  the patch averaged down to 4x4 (over P/4 x P/4 blocks),
                     each cell's colour as above: 16 classes;
  'pixels'           the patch's P * P * 3 values (row, column, channel).
An image's loss is the mean over its corrupted patches of the softmax
cross-entropy (averaged over the 16 cells for 'downsized_color') or of the
squared error (averaged over the values for 'pixels').

Evaluation reports the mean loss and, for the colour targets, `accuracy`:
the fraction of right predictions at corrupted patches, and
`majority_accuracy`: that of always predicting the split's most frequent
colour there, the baseline to beat.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import data, eval_step, steps
from vit_jax.models import mpp as mpp_model
from vit_jax.objectives.task import Task, model_from_config

OBJECTIVE = 'masked_patch_prediction'


def patches(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, N, P, P, C), patches in the order of the tokens."""
  batch, height, width, channels = images.shape
  rows, cols = height // patch_size, width // patch_size
  x = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, rows * cols, patch_size, patch_size, channels)


def quantize_color(colors: jax.Array) -> jax.Array:
  """RGB values in [-1, 1] (..., 3) -> int32 classes of 3 bits per channel."""
  levels = 2**mpp_model.COLOR_BITS
  level = jnp.clip(jnp.floor((colors + 1) / 2 * levels), 0, levels - 1)
  weights = levels ** jnp.arange(colors.shape[-1] - 1, -1, -1)
  return jnp.sum(level.astype(jnp.int32) * weights, axis=-1)


def targets(images: jax.Array, target: str, num_patches: int) -> jax.Array:
  """The targets of every patch of images (B, H, W, 3) cut in `num_patches`.

  Returns:
    int32 (B, N) for 'mean_color', int32 (B, N, 16) for 'downsized_color',
    float32 (B, N, P * P * 3) for 'pixels'.
  """
  batch, height, width, channels = images.shape
  patch_size = math.isqrt(height * width // num_patches)
  if (height % patch_size, width % patch_size) != (0, 0) or (
    height * width != num_patches * patch_size**2
  ):
    raise ValueError(
      f'{num_patches} patches do not tile {height}x{width} images.'
    )
  x = patches(images.astype(jnp.float32), patch_size)
  if target == 'mean_color':
    return quantize_color(jnp.mean(x, axis=(2, 3)))
  if target == 'downsized_color':
    cells = mpp_model.DOWNSIZED
    if patch_size % cells:
      raise ValueError(
        f"The 'downsized_color' target needs patches of a multiple of "
        f'{cells} pixels, not {patch_size}.'
      )
    block = patch_size // cells
    x = x.reshape(batch, num_patches, cells, block, cells, block, channels)
    cell_colors = jnp.mean(x, axis=(3, 5))
    return quantize_color(
      cell_colors.reshape(batch, num_patches, cells * cells, channels)
    )
  if target == 'pixels':
    return x.reshape(batch, num_patches, -1)
  raise ValueError(
    f'Unknown MPP target {target!r}; use one of {mpp_model.TARGETS}.'
  )


def _loss_and_targets(outputs, images, target):
  """Per-example loss over the corrupted patches, and the targets."""
  predictions = outputs['predictions']
  patch_targets = targets(images, target, predictions.shape[1])
  if target == 'pixels':
    per_patch = jnp.mean(jnp.square(predictions - patch_targets), axis=-1)
  else:
    per_patch = optax.softmax_cross_entropy_with_integer_labels(
      predictions, patch_targets
    )
    if per_patch.ndim == 3:  # 'downsized_color': one per cell.
      per_patch = jnp.mean(per_patch, axis=-1)
  corrupted = outputs['corrupted'].astype(jnp.float32)
  loss = jnp.sum(per_patch * corrupted, axis=-1) / jnp.maximum(
    jnp.sum(corrupted, axis=-1), 1.0
  )
  return loss, patch_targets


def make_loss_fn(target: str) -> steps.LossFn:
  """Per-example loss of (model outputs, images)."""

  def loss_fn(outputs, images):
    return _loss_and_targets(outputs, images, target)[0]

  return loss_fn


def make_eval_metrics(target: str) -> eval_step.EvalMetrics:
  """Mean loss, masked-patch accuracy and the majority-colour baseline."""

  def sums(outputs, images, mask):
    loss, patch_targets = _loss_and_targets(outputs, images, target)
    totals = {'loss_sum': jnp.sum(loss * mask), 'examples': jnp.sum(mask)}
    if target == 'pixels':
      return totals
    # One weight per prediction: corrupted patches of real examples.
    weight = outputs['corrupted'] * mask[:, None]
    weight = jnp.broadcast_to(
      weight.reshape(*weight.shape, *(1,) * (patch_targets.ndim - 2)),
      patch_targets.shape,
    ).astype(jnp.float32)
    top1 = jnp.argmax(outputs['predictions'], axis=-1)
    totals['correct'] = jnp.sum((top1 == patch_targets) * weight)
    totals['count'] = jnp.sum(weight)
    totals['color_counts'] = jnp.bincount(
      patch_targets.ravel(), weight.ravel(), length=mpp_model.NUM_COLORS
    )
    return totals

  def summarize(totals: dict[str, np.ndarray]) -> dict[str, float]:
    examples = max(float(totals['examples']), 1.0)
    metrics = {
      'loss': float(totals['loss_sum']) / examples,
      'examples': int(totals['examples']),
    }
    if 'count' in totals:
      count = max(float(totals['count']), 1.0)
      majority = float(np.max(totals['color_counts']))
      metrics['accuracy'] = float(totals['correct']) / count
      metrics['majority_accuracy'] = majority / count
    return metrics

  return eval_step.EvalMetrics(sums, summarize)


def settings(mpp: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model's MPP attributes from `config.mpp`, checked."""
  if mpp.target not in mpp_model.TARGETS:
    raise ValueError(
      f'config.mpp.target={mpp.target!r}; use one of {mpp_model.TARGETS}.'
    )
  if not 0 < mpp.corrupt_rate <= 1:
    raise ValueError(
      f'config.mpp.corrupt_rate={mpp.corrupt_rate} is not in (0, 1].'
    )
  if min(mpp.mask_rate, mpp.random_rate) < 0 or (
    mpp.mask_rate + mpp.random_rate > 1
  ):
    raise ValueError(
      f'config.mpp.mask_rate={mpp.mask_rate} and config.mpp.random_rate='
      f'{mpp.random_rate} must be probabilities that sum to at most 1.'
    )
  return {
    'target': mpp.target,
    'corrupt_rate': float(mpp.corrupt_rate),
    'mask_rate': float(mpp.mask_rate),
    'random_rate': float(mpp.random_rate),
  }


def make_task(config: ml_collections.ConfigDict, ds: 'data.Dataset') -> Task:
  """Masked patch prediction with the configured ViT."""
  del ds  # The objective needs only the images.
  mpp_settings = settings(config.mpp)
  vit, description = model_from_config(config, None)
  description = description.replace(objective=OBJECTIVE, mpp=mpp_settings)
  return Task(
    model=mpp_model.from_vit(vit, **mpp_settings),
    loss_fn=make_loss_fn(mpp_settings['target']),
    description=description,
    target='images',
    rng_streams=(mpp_model.CORRUPTION_RNG,),
    eval_metrics=make_eval_metrics(mpp_settings['target']),
  )
