"""Model zoo: ViT, ResNet+ViT hybrids, BiT ResNets and conv-stem ViTc."""

from vit_jax.models.registry import (
  canonical_name,
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
  'canonical_name',
  'config_overrides',
  'get_model',
  'list_models',
  'model_spec',
]
