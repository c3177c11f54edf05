"""Published weights by name: cache, resolution, offline failure."""

import time

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY_VIT, init_params, randomize
from vit_jax import checkpoints, models
from vit_jax.checkpoints import published

AUGREG = 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0'


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to reach the bucket fails the test."""

  def refuse(*args):
    raise AssertionError(f'network access: {args}')

  monkeypatch.setattr(published, '_probe', refuse)
  monkeypatch.setattr(published, '_copy', refuse)


def test_names_resolve_to_the_bucket():
  assert published.url('augreg', AUGREG) == (
    f'gs://vit_models/augreg/{AUGREG}.npz'
  )
  assert published.model_of('augreg', AUGREG) == 'ViT-B_16'
  assert published.model_of('augreg', 'R26_S_32-i21k-300ep') == 'R26+ViT-S_32'
  assert published.model_of('imagenet21k', 'R50+ViT-B_16') == 'R50+ViT-B_16'
  assert (
    published.model_of('imagenet21k+imagenet2012', 'ViT-L_16-224') == 'ViT-L_16'
  )
  assert published.is_name('imagenet21k:ViT-B_16')
  assert not published.is_name('gs://vit_models/imagenet21k/ViT-B_16.npz')
  with pytest.raises(ValueError, match='ViT-B_16, ViT-B_32'):
    published.model_of('imagenet21k', 'ViT-Q_16')
  for name in published.AUGREG_RECOMMENDED:
    published.model_of('augreg', name)  # every listed model is registered


def test_a_cached_file_is_used_without_network(tmp_path, no_network):
  model = models.get_model('ViT-B_16', 5, patch_size=4, **TINY_VIT)
  params = randomize(init_params(model, jnp.zeros((1, 16, 16, 3))))
  cached = tmp_path / 'augreg' / f'{AUGREG}.npz'
  cached.parent.mkdir()
  np.savez(cached, **checkpoints.flatten(params))
  loaded = checkpoints.load(f'augreg:{AUGREG}', weights_cache=str(tmp_path))
  # The name says the model: no model_name needed.
  assert loaded.description.model_name == 'ViT-B_16'
  np.testing.assert_array_equal(
    loaded.variables['params']['embedding']['kernel'],
    params['embedding']['kernel'],
  )


def test_the_environment_variable_sets_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(published.ENV, str(tmp_path))
  assert published.cache_dir() == tmp_path
  assert published.cache_dir(str(tmp_path / 'x')) == tmp_path / 'x'


def test_offline_fails_fast_naming_url_and_place(tmp_path, monkeypatch):
  def unreachable(source):
    raise OSError('Name or service not known')

  monkeypatch.setattr(published, '_probe', unreachable)
  with pytest.raises(checkpoints.WeightsUnavailableError) as e:
    checkpoints.load('imagenet21k:ViT-B_16', weights_cache=str(tmp_path))
  message = str(e.value)
  assert 'gs://vit_models/imagenet21k/ViT-B_16.npz' in message
  assert str(tmp_path / 'imagenet21k' / 'ViT-B_16.npz') in message
  assert not (tmp_path / 'imagenet21k' / 'ViT-B_16.npz').exists()


def test_a_bucket_that_does_not_answer_times_out(tmp_path, monkeypatch):
  monkeypatch.setattr(published, 'PROBE_TIMEOUT', 0.2)
  monkeypatch.setattr(published, '_probe', lambda source: time.sleep(3))
  start = time.perf_counter()
  with pytest.raises(checkpoints.WeightsUnavailableError, match='no answer'):
    published.resolve(f'augreg:{AUGREG}', str(tmp_path))
  assert time.perf_counter() - start < 2


def test_a_fetched_file_lands_in_the_cache(tmp_path, monkeypatch):
  copied = []

  def fake_copy(source, destination):
    copied.append(str(source))
    np.savez(destination.open('wb'), x=np.zeros(1))

  monkeypatch.setattr(published, '_probe', lambda source: True)
  monkeypatch.setattr(published, '_copy', fake_copy)
  path = published.resolve('imagenet21k:ViT-B_16', str(tmp_path))
  assert copied == ['gs://vit_models/imagenet21k/ViT-B_16.npz']
  assert path == tmp_path / 'imagenet21k' / 'ViT-B_16.npz' and path.exists()
