"""Fine-tuning on your own images: a folder with one sub-folder per class.

The folder is scikit-learn's digits written as PNGs in folders named
'zero'..'nine' (no train/ or test/), so that the class ids (sorted folder
names) differ from the digits and the names must follow the model. A tiny
ViT is fine-tuned on it from a random initialisation at 32 px with the
folder's recipe (configs/finetune.py:MODEL,PATH), its length resolved from
the number of training images.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import datasets as sk_datasets
from test_pretrain import tiny_config

from configs import common
from configs import evaluate as evaluate_config
from configs import finetune as finetune_config
from configs import predict as predict_config
from vit_jax import checkpoints, data, sharding
from vit_jax import workdir as workdir_lib
from vit_jax.data.write_digits_folder import CLASS_NAMES, write_digits_folder
from vit_jax.jobs import evaluate, finetune, predict, pretrain

FIXTURE = Path(__file__).resolve().parents[1] / 'fixtures' / 'workdir_2026_11'
SORTED_NAMES = sorted(CLASS_NAMES)
# A tiny ViT on 32x32 images: 4x4 patches of 8 pixels.
TINY = {
  'model.patch_size': 8,
  'model.hidden_size': 32,
  'model.num_layers': 2,
  'model.num_heads': 2,
  'model.mlp_dim': 64,
  'image_size': 32,
  'pp.train_crop': 'resize',
  'pp.flip': False,
  'batch_size': 64,
  'eval_batch_size': 256,
  'lr.base': 0.03,
  'log_every': 50,
  'checkpoint_every': 1000,
}
STEPS = 300


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('digits_png')
  assert write_digits_folder(str(root)) == 1797
  return root


def own_config(folder, **overrides):
  config = finetune_config.get_config(f'ViT-Ti_16,{folder}')
  config.init = finetune.RANDOM_INIT
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


@pytest.fixture(scope='module')
def finetuned(folder, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('own_images')
  # The length comes from the data: 100 epochs of the training images would
  # be 2,248 steps at batch 64; the cap brings it to STEPS.
  config = own_config(folder, **{'steps_from_data.max_steps': STEPS})
  assert config.total_steps is None and config.lr.warmup_steps is None
  results = finetune.run(config, str(workdir))
  return workdir, results


def test_the_folder_holds_the_digits_by_name(folder):
  digits = sk_datasets.load_digits()
  for index in (0, 7, 1796):
    name = CLASS_NAMES[digits.target[index]]
    png = np.asarray(Image.open(folder / name / f'{index:04d}.png'))
    np.testing.assert_array_equal(
      png, np.round(digits.images[index] * 255 / 16).astype(np.uint8)
    )
  counts = [len(list((folder / name).iterdir())) for name in CLASS_NAMES]
  assert counts == np.bincount(digits.target).tolist()


def test_a_path_gets_the_recipe_for_new_data(folder, monkeypatch):
  config = finetune_config.get_config(f'ViT-B_16,{folder}')
  assert config.dataset == str(folder)
  assert config.total_steps is None and config.lr.warmup_steps is None
  assert config.lr_grid == (0.001, 0.003, 0.01, 0.03)
  assert config.lr.base == 0.01 and config.image_size == 384
  assert config.batch_size == 512 and config.optimizer.name == 'sgd'
  # A relative path to an existing directory, without a '/'.
  monkeypatch.chdir(folder.parent)
  relative = finetune_config.get_config(f'ViT-B_16,{folder.name}')
  assert relative.total_steps is None
  assert finetune_config.get_config('ViT-B_16,cifar10').total_steps == 10_000
  with pytest.raises(ValueError, match='folder of images'):
    finetune_config.get_config('ViT-B_16,no_such_dataset')


def test_steps_follow_the_number_of_training_images(folder, tmp_path):
  config = own_config(folder, batch_size=512)
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.model)
  images = data.get_dataset(config, mesh).num_examples('train')
  # 100 epochs at batch 512, at least 500 steps, a tenth of them warm-up.
  resolved = finetune.steps_from_data(config)
  expected = max(500, round(100 * images / 512))
  assert resolved.total_steps == expected
  assert resolved.lr.warmup_steps == round(expected / 10)
  longer = own_config(folder, batch_size=64)
  assert finetune.steps_from_data(longer).total_steps == round(
    100 * images / 64
  )
  # num_epochs, and a given warm-up, are kept.
  epochs = own_config(folder, num_epochs=2.0, **{'lr.warmup_steps': 7})
  resolved = finetune.steps_from_data(epochs)
  assert resolved.total_steps == round(2 * images / 64)
  assert resolved.lr.warmup_steps == 7
  # A preset's recipe is left as it is.
  preset = common.finetune('ViT-Ti_16', 'digits')
  assert finetune.steps_from_data(preset) is preset

  # A batch larger than the training set is clipped to it (a multiple of the
  # 8 devices): 3 classes of 10 images keep 8 each for training.
  small = tmp_path / 'small'
  for name in ('a', 'b', 'c'):
    (small / name).mkdir(parents=True)
    for i in range(10):
      shutil.copy(folder / 'zero' / '0000.png', small / name / f'{i}.png')
  resolved = finetune.steps_from_data(own_config(small, batch_size=512))
  assert resolved.batch_size == 24
  assert resolved.total_steps == 500 and resolved.lr.warmup_steps == 50


def test_finetuning_on_a_folder_without_splits(finetuned, folder):
  workdir, results = finetuned
  assert results['test_accuracy'] > 0.6  # 10 classes: chance is 0.1
  config = json.loads((workdir / 'config.json').read_text())
  assert config['total_steps'] == STEPS
  assert config['lr']['warmup_steps'] == STEPS // 10
  # The names travel with the model: the orbax checkpoint and model.json.
  _, description = checkpoints.read(str(workdir))
  assert list(description.class_names) == SORTED_NAMES
  exported = json.loads((workdir / 'model.json').read_text())
  assert exported['class_names'] == SORTED_NAMES


def test_the_splits_are_recorded(finetuned, folder):
  workdir, _ = finetuned
  record = json.loads((workdir / 'splits.json').read_text())
  assert record['dataset'] == str(folder)
  config = own_config(folder)
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.model)
  assert record['splits'] == data.get_dataset(config, mesh).split_files()
  train, val, test = (
    set(record['splits'][s]) for s in ('train', 'val', 'test')
  )
  assert not train & val and not train & test and not val & test
  on_disk = {str(p.relative_to(folder)) for p in folder.glob('*/*.png')}
  assert train | val | test == on_disk
  assert len(test) == len(val) == 179  # a tenth of each class, rounded


def test_a_changed_folder_keeps_the_first_record(tmp_path, caplog):
  first = {'train': ['a/1.png'], 'test': ['a/2.png']}
  path = workdir_lib.record_split_files(tmp_path, 'imgs', first)
  workdir_lib.record_split_files(tmp_path, 'imgs', first)
  assert 'split otherwise' not in caplog.text
  moved = {'train': ['a/2.png'], 'test': ['a/1.png']}
  workdir_lib.record_split_files(tmp_path, 'imgs', moved)
  assert 'split otherwise' in caplog.text
  assert json.loads(path.read_text())['splits'] == first
  assert workdir_lib.record_split_files(tmp_path / 'x', 'digits', None) is None
  assert not (tmp_path / 'x').exists()


def test_predict_names_the_classes_from_the_checkpoint(
  finetuned, folder, tmp_path
):
  workdir, _ = finetuned
  held_out = json.loads((workdir / 'splits.json').read_text())['splits']
  images = held_out['test'][::6]
  config = predict_config.get_config()
  config.init = str(workdir)
  config.images = ','.join(str(folder / path) for path in images)
  results = predict.run(config, str(tmp_path))
  assert results['class_names'] == f'{workdir} (checkpoint)'
  written = json.loads((tmp_path / 'predictions.json').read_text())
  top = [p['top_k'][0] for p in written['predictions']]
  for entry in top:
    assert entry['class'] == SORTED_NAMES[entry['label']]
  # The predicted names are mostly the folders the images are in.
  right = [
    entry['class'] == Path(path).parent.name
    for entry, path in zip(top, images, strict=True)
  ]
  assert np.mean(right) > 0.6


def test_evaluate_reports_the_class_names(finetuned, folder, tmp_path):
  workdir, results = finetuned
  config = evaluate_config.get_config()
  config.init = str(workdir / 'model.npz')  # with model.json beside it
  config.dataset = str(folder)
  evaluated = evaluate.run(config, str(tmp_path))
  assert evaluated['class_names'] == SORTED_NAMES
  assert evaluated['accuracy'] == pytest.approx(results['test_accuracy'])

  # A model whose classes are the folder's in another order (as one trained
  # on data that orders them otherwise): its outputs would be scored
  # against the wrong labels.
  shutil.copy(workdir / 'model.npz', tmp_path / 'reordered.npz')
  description = json.loads((workdir / 'model.json').read_text())
  description['class_names'] = SORTED_NAMES[::-1]
  (tmp_path / 'reordered.json').write_text(json.dumps(description))
  config.init = str(tmp_path / 'reordered.npz')
  with pytest.raises(ValueError, match='in another order'):
    evaluate.run(config, str(tmp_path / 'reordered_run'))


def test_a_workdir_saved_without_class_names_resumes(tmp_path):
  # Written before descriptions held class names; digits now have names.
  workdir = tmp_path / 'old'
  shutil.copytree(FIXTURE, workdir)
  # As if stopped after the checkpoint of step 3, before finishing.
  for name in ('results.json', 'model.npz', 'model.json'):
    (workdir / name).unlink()
  saved = json.loads((workdir / 'config.json').read_text())
  config = tiny_config(total_steps=4)
  config.update_from_flattened_dict(
    {f'model.{k}': saved['model'][k]
     for k in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim')}
  )  # fmt: skip
  for key in ('image_size', 'batch_size', 'ema_decay', 'checkpoint_every'):
    config[key] = saved[key]
  config.model.patch_size = saved['model']['patch_size']
  pretrain.run(config, str(workdir))
  # Steps 1-3 from the fixture, step 4 resumed from its checkpoint.
  rows = map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
  assert [row['step'] for row in rows if 'train_loss' in row] == [1, 2, 3, 4]
  _, description = checkpoints.read(str(workdir))
  assert list(description.class_names) == [str(d) for d in range(10)]
  exported = json.loads((workdir / 'model.json').read_text())
  assert exported['class_names'] == [str(d) for d in range(10)]
