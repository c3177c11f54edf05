"""Meshes, partition rules, and sharded forward passes."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import TINY_VIT, init_params, random_images, randomize
from vit_jax import models, sharding


def test_mesh_shapes_and_errors():
  assert sharding.create_mesh(-1, 2).shape == {'data': 4, 'model': 2}
  assert sharding.create_mesh(8, -1).shape == {'data': 8, 'model': 1}
  with pytest.raises(ValueError, match='needs 6 devices, but 8'):
    sharding.create_mesh(3, 2)
  with pytest.raises(ValueError, match='does not divide the 8 devices'):
    sharding.create_mesh(-1, 3)
  with pytest.raises(ValueError, match='Unknown sharding strategy'):
    sharding.rules_for('zero3')


def test_a_cpu_mesh_keeps_the_given_device_order():
  devices = jax.devices()[::-1]
  mesh = sharding.create_mesh(4, 2, devices)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in devices]


@pytest.mark.parametrize(
  'failure', [NotImplementedError, AssertionError, ValueError]
)
def test_devices_mesh_utils_cannot_lay_out_keep_the_given_order(
  monkeypatch, failure
):
  def cannot_lay_out(shape, devices):
    raise failure('no layout of this TPU slice for the mesh shape')

  monkeypatch.setattr(sharding.mesh_utils, 'create_device_mesh', cannot_lay_out)
  devices = jax.devices()[1:5]
  mesh = sharding.create_mesh(2, 2, devices)
  assert mesh.shape == {'data': 2, 'model': 2}
  assert [d.id for d in mesh.devices.flat] == [1, 2, 3, 4]


def test_partition_rules_place_parameters():
  model = models.get_model('ViT-B_16', 8, patch_size=4, **TINY_VIT)
  abstract = jax.eval_shape(
    model.init, jax.random.key(0), np.zeros((8, 16, 16, 3))
  )
  mesh = sharding.create_mesh(4, 2)
  block = ('params', 'Transformer', 'encoderblock_0')

  def spec(tree, *path):
    for key in path:
      tree = tree[key]
    return tree.spec

  dp = sharding.tree_shardings(abstract, mesh, 'dp')
  fsdp = sharding.tree_shardings(abstract, mesh, 'fsdp')
  tp = sharding.tree_shardings(abstract, mesh, 'tp')
  mlp = (*block, 'MlpBlock_3', 'Dense_0', 'kernel')
  query = (*block, 'MultiHeadDotProductAttention_1', 'query', 'kernel')
  out = (*block, 'MultiHeadDotProductAttention_1', 'out', 'kernel')
  assert spec(dp, *mlp) == P(None, None)
  assert spec(fsdp, *mlp) == P('data', None)  # (D, M): D over data
  assert spec(fsdp, 'params', 'embedding', 'kernel') == P(
    None, None, None, 'data'
  )
  assert spec(tp, *mlp) == P(None, 'model')  # column parallel
  assert spec(tp, *query) == P(None, 'model', None)  # heads over model
  assert spec(tp, *out) == P('model', None, None)  # row parallel
  # The head (8 classes) is replicated under tp; 5 does not divide 4: fsdp
  # leaves a dimension that its axis does not divide replicated.
  odd = models.get_model(
    'ViT-B_16',
    8,
    patch_size=4,
    **{**TINY_VIT, 'hidden_size': 20, 'num_heads': 4},
  )
  abstract_odd = jax.eval_shape(
    odd.init, jax.random.key(0), np.zeros((8, 16, 16, 3))
  )
  fsdp_odd = sharding.tree_shardings(
    abstract_odd, sharding.create_mesh(8, 1), 'fsdp'
  )
  assert spec(fsdp_odd, *mlp) == P(None, None)


@pytest.mark.parametrize('strategy', ['dp', 'fsdp', 'tp'])
def test_sharded_forward_equals_single_device(strategy):
  model = models.get_model('ViT-B_16', 6, patch_size=4, **TINY_VIT)
  images = random_images((8, 16, 16, 3))
  params = randomize(init_params(model, images))
  expected = jax.jit(model.apply)({'params': params}, images)

  mesh = sharding.create_mesh(4, 2)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)
  shardings = sharding.tree_shardings(abstract, mesh, strategy)
  variables = jax.device_put({'params': params}, nn.unbox(shardings))
  batch = jax.device_put(images, sharding.batch_sharding(mesh))
  with sharding.activation_sharding(mesh, strategy):
    logits = jax.jit(model.apply)(variables, batch)
  assert logits.sharding.spec[0] == 'data'
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
