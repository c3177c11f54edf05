"""Model zoo: ViT, R50+ViT hybrids, BiT ResNets and conv-stem ViTc."""

from vit_jax.models.registry import (
  config_overrides,
  get_model,
  list_models,
  model_spec,
)
from vit_jax.models.resnet import BiTResNet
from vit_jax.models.vit import VisionTransformer

__all__ = [
  'BiTResNet',
  'VisionTransformer',
  'config_overrides',
  'get_model',
  'list_models',
  'model_spec',
]
