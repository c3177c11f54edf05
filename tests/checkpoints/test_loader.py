"""`checkpoints.load` and `read`: every layout, and files written earlier."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vit_jax import checkpoints
from vit_jax.models.description import DescriptionError, ModelDescription

# A workdir (orbax checkpoints, model.npz, model.json) written by this
# project's code before the checkpoint package existed, with the logits it
# gave on fixed images then.
FIXTURE = Path(__file__).resolve().parents[1] / 'fixtures' / 'workdir_2026_11'


@pytest.fixture(scope='module')
def expected():
  with np.load(FIXTURE / 'expected_logits.npz') as f:
    return {key: f[key] for key in f.files}


@pytest.mark.parametrize(
  'source, ema, key',
  [
    (FIXTURE, False, 'orbax'),
    (FIXTURE / 'checkpoints', False, 'orbax'),
    (FIXTURE, True, 'orbax_ema'),
    (FIXTURE / 'model.npz', False, 'npz'),
  ],
)
def test_files_written_before_load_to_the_same_logits(
  source, ema, key, expected
):
  loaded = checkpoints.load(source, ema=ema)
  assert loaded.description.model_name == 'ViT-Ti_16'
  assert loaded.description.image_size == 16
  assert loaded.description.num_classes == 10
  logits = loaded.model.apply(loaded.variables, expected['images'], train=False)
  np.testing.assert_allclose(logits, expected[key], rtol=1e-5, atol=1e-6)


def test_relative_paths_load(monkeypatch, expected):
  monkeypatch.chdir(FIXTURE.parent)
  loaded = checkpoints.load(FIXTURE.name)
  logits = loaded.model.apply(loaded.variables, expected['images'], train=False)
  np.testing.assert_allclose(logits, expected['orbax'], rtol=1e-5, atol=1e-6)


def test_a_description_round_trips_through_json():
  written = json.loads((FIXTURE / 'model.json').read_text())
  description = ModelDescription.from_json(written)
  assert description.to_json() == written
  named = description.replace(class_names=('zero', 'one'))
  assert ModelDescription.from_json(named.to_json()) == named


def test_a_bare_npz_needs_the_model_name(tmp_path, expected):
  shutil.copy(FIXTURE / 'model.npz', tmp_path / 'bare.npz')
  with pytest.raises(ValueError, match='model_name'):
    checkpoints.load(tmp_path / 'bare.npz')
  architecture = json.loads((FIXTURE / 'model.json').read_text())['overrides']
  loaded = checkpoints.load(
    tmp_path / 'bare.npz', model_name='ViT-Ti_16', **architecture
  )
  # The resolution comes from the position embeddings, the classes from the
  # head.
  assert loaded.description.image_size == 16
  assert loaded.description.num_classes == 10
  logits = loaded.model.apply(loaded.variables, expected['images'], train=False)
  np.testing.assert_allclose(logits, expected['npz'], rtol=1e-5, atol=1e-6)


def test_a_new_resolution_resizes_the_position_embeddings():
  loaded = checkpoints.load(FIXTURE / 'model.npz', image_size=32)
  posemb = loaded.variables['params']['Transformer']['posembed_input'][
    'pos_embedding'
  ]
  assert posemb.shape == (1, 1 + 8 * 8, 16)
  assert loaded.description.image_size == 32


def test_unknown_layouts_list_what_was_tried(tmp_path):
  (tmp_path / 'weights.dat').write_bytes(b'\x00' * 16)
  with pytest.raises(checkpoints.UnknownLayoutError) as e:
    checkpoints.load(tmp_path / 'weights.dat')
  for layout in checkpoints.LAYOUTS:
    assert f'{layout.name}: {layout.expects}' in str(e.value)
  with pytest.raises(FileNotFoundError, match='nothing_here'):
    checkpoints.load(tmp_path / 'nothing_here')


def test_a_corrupt_description_names_the_file(tmp_path):
  shutil.copy(FIXTURE / 'model.npz', tmp_path / 'model.npz')
  (tmp_path / 'model.json').write_text('{"model_name": "ViT-Ti_16",')
  with pytest.raises(DescriptionError, match=r'model\.json'):
    checkpoints.load(tmp_path / 'model.npz')
  (tmp_path / 'model.json').write_text('{"num_classes": 3}')
  with pytest.raises(DescriptionError, match='model_name'):
    checkpoints.load(tmp_path / 'model.npz')
