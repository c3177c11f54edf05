"""Checks the weight exchange against timm and transformers themselves.

  python benchmarks/interop.py --timm_python=/tmp/timm-venv/bin/python \
      --timm_pythonpath=DIR_WITH_TORCHVISION_STUB

1. This project writes each model with `checkpoints.save(...,
   format='safetensors')`; timm loads the file as the README shows, and its
   logits on the same images are compared with this project's.
2. timm writes each model with `safetensors.torch.save_file` and a
   `config.json` naming its architecture; this project loads the folder
   with `checkpoints.load` and compares logits the same way.
3. transformers writes a small `ViTForImageClassification` with
   `save_pretrained`; this project loads the folder (its class names too)
   and compares logits.
Prints one line per model and direction: max |logit difference| and the
largest logit. The timm side runs in timm's own environment (the venv of
benchmarks/interleave.py), as a subprocess of this script.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMM_PYTHON = flags.DEFINE_string(
  'timm_python', None, "Python of timm's environment.", required=True
)
_TIMM_PYTHONPATH = flags.DEFINE_string(
  'timm_pythonpath', '', "PYTHONPATH for timm's environment."
)

# (this project's model, its attribute overrides, timm's name).
TO_TIMM = (
  ('ViT-Ti_16', {}, 'vit_tiny_patch16_224'),
  ('ViT-S_16', {'gelu_approximate': False}, 'vit_small_patch16_224'),
  ('R26+ViT-S_32', {}, 'vit_small_r26_s32_224'),
)
FROM_TIMM = (
  'vit_tiny_patch16_224',
  'vit_small_r26_s32_224',
  'resnetv2_50x1_bit',
)
NUM_CLASSES = 5
IMAGE_SIZE = 224

# Runs in timm's environment: argv = (mode, folder, ...).
_TIMM_SIDE = """
import json, sys
import numpy as np, timm, torch
from safetensors.torch import save_file
mode, folder = sys.argv[1], sys.argv[2]
images = torch.from_numpy(np.load(folder + '/images.npy')).permute(0, 3, 1, 2)
if mode == 'load':
  config = json.load(open(folder + '/config.json'))
  model = timm.create_model(
    config['architecture'], pretrained=True, num_classes=int(sys.argv[3]),
    pretrained_cfg_overlay=dict(file=folder + '/model.safetensors',
                                num_classes=int(sys.argv[3])),
    **config.get('model_args', {}))
else:
  torch.manual_seed(0)
  model = timm.create_model(sys.argv[3], num_classes=int(sys.argv[4]))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            folder + '/model.safetensors')
  json.dump({'architecture': sys.argv[3], 'num_classes': int(sys.argv[4])},
            open(folder + '/config.json', 'w'))
with torch.no_grad():
  np.save(folder + '/timm_logits.npy', model.eval()(images).numpy())
"""

# Runs in that environment too: argv = (folder,); a small transformers ViT.
_TRANSFORMERS_SIDE = """
import sys
import numpy as np, torch
from transformers import ViTConfig, ViTForImageClassification
folder = sys.argv[1]
torch.manual_seed(0)
labels = {0: 'cat', 1: 'dog', 2: 'eel'}
config = ViTConfig(
  hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
  intermediate_size=128, image_size=32, patch_size=8, num_labels=3,
  id2label=labels, label2id={v: k for k, v in labels.items()})
model = ViTForImageClassification(config).eval()
with torch.no_grad():
  for p in model.parameters():
    p.add_(0.05 * torch.randn_like(p))
model.save_pretrained(folder, safe_serialization=True)
images = torch.from_numpy(np.load(folder + '/images.npy')).permute(0, 3, 1, 2)
with torch.no_grad():
  np.save(folder + '/timm_logits.npy', model(pixel_values=images).logits.numpy())
"""


def _timm(*args: str, side: str = _TIMM_SIDE) -> None:
  # transformers imports the real torchvision's modules if it sees one, so
  # the stand-in is only on timm's path.
  path = _TIMM_PYTHONPATH.value if side == _TIMM_SIDE else ''
  env = dict(os.environ, PYTHONPATH=path)
  subprocess.run([_TIMM_PYTHON.value, '-c', side, *args], check=True, env=env)


def _report(direction: str, name: str, ours, theirs) -> None:
  diff = float(np.max(np.abs(np.asarray(ours) - theirs)))
  print(
    f'{direction} {name}: max |diff| {diff:.2e}, '
    f'max |logit| {float(np.max(np.abs(theirs))):.2f}',
    flush=True,
  )


def main(argv):
  del argv
  sys.path.insert(0, REPO)
  import jax

  from vit_jax import checkpoints, sharding
  from vit_jax.models.description import ModelDescription

  images = np.random.default_rng(1).uniform(
    -1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)
  )
  images = images.astype(np.float32)
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as root:
    for name, overrides, timm_name in TO_TIMM:
      folder = os.path.join(root, 'to_timm', timm_name)
      os.makedirs(folder)
      np.save(os.path.join(folder, 'images.npy'), images)
      description = ModelDescription(
        name, NUM_CLASSES, IMAGE_SIZE, overrides=overrides
      )
      model = description.build()
      variables = sharding.strip_boxes(
        model.init(jax.random.key(0), images[:1])
      )
      variables = jax.tree.map(
        lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape), variables
      )
      variables = jax.tree.map(lambda x: x.astype(np.float32), variables)
      checkpoints.save(
        os.path.join(folder, 'model.safetensors'),
        variables,
        description,
        format='safetensors',
      )
      with open(os.path.join(folder, 'config.json')) as f:
        assert json.load(f)['architecture'] == timm_name
      _timm('load', folder, str(NUM_CLASSES))
      _report(
        'this project -> timm',
        name,
        model.apply(variables, images, train=False),
        np.load(os.path.join(folder, 'timm_logits.npy')),
      )
    for timm_name in FROM_TIMM:
      folder = os.path.join(root, 'from_timm', timm_name)
      os.makedirs(folder)
      np.save(os.path.join(folder, 'images.npy'), images)
      _timm('save', folder, timm_name, str(NUM_CLASSES))
      loaded = checkpoints.load(folder, image_size=IMAGE_SIZE)
      _report(
        'timm -> this project',
        f'{timm_name} ({loaded.description.model_name})',
        loaded.model.apply(loaded.variables, images, train=False),
        np.load(os.path.join(folder, 'timm_logits.npy')),
      )
    folder = os.path.join(root, 'from_transformers')
    os.makedirs(folder)
    np.save(os.path.join(folder, 'images.npy'), images[:, :32, :32])
    _timm(folder, side=_TRANSFORMERS_SIDE)
    # A small ViT: the registry name it is a variant of.
    loaded = checkpoints.load(folder, model_name='ViT-Ti_16')
    assert loaded.description.class_names == ('cat', 'dog', 'eel')
    _report(
      'transformers -> this project',
      'ViTForImageClassification (D=64, 2 layers, 8 px patches, 32 px)',
      loaded.model.apply(loaded.variables, images[:, :32, :32], train=False),
      np.load(os.path.join(folder, 'timm_logits.npy')),
    )


if __name__ == '__main__':
  app.run(main)
