"""FLOP and parameter counts against XLA, formulas and published numbers."""

import ml_collections
import pytest

from configs import flops as flops_config
from vit_jax.analysis import compute_table, flops


@pytest.mark.parametrize(
  ('name', 'image_size', 'overrides'),
  [
    ('ViT-B_16', 224, {}),
    ('ViT-B_16', 224, dict(classifier='gap')),
    ('ViT-B_16', 224, dict(classifier='unpooled', representation_size=512)),
    ('R50+ViT-B_16', 224, {}),
    ('BiT-R50x1', 224, {}),
    ('ViTc-S_16', 224, {}),
    ('ViT-S_16', (384, 192), {}),
    # An odd size: every ResNet map has a ragged border of padding.
    ('BiT-R50x1', 97, {}),
  ],
)
def test_analytic_flops_match_xla(name, image_size, overrides):
  analytic = flops.forward_flops(name, image_size, **overrides)
  xla = flops.xla_forward_flops(name, image_size, **overrides)
  # XLA also counts normalisations and activations: it is a little higher.
  assert analytic <= xla
  assert analytic == pytest.approx(xla, rel=0.05)


def test_vit_flops_equal_the_papers_formula():
  # Paper-facts §9: per block 4ND² + 2N²D + 2NDM multiply-adds, N = tokens
  # + 1, plus P²·3·D per patch; and the head.
  n, d, m, p = 197, 768, 3072, 16
  macs = 12 * (4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m)
  macs += 196 * p * p * 3 * d + d * 1000
  assert flops.forward_flops('ViT-B_16') == 2 * macs
  # Without class token and head: N = 196.
  n = 196
  macs = 12 * (4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m)
  macs += 196 * p * p * 3 * d
  assert flops.forward_flops('ViT-B_16', 224, None, classifier='gap') == (
    2 * macs
  )


@pytest.mark.parametrize(
  ('name', 'published_gmacs'),
  [
    # torchvision's ResNet-50 (same convs and strides as BiT's R50x1).
    ('BiT-R50x1', 4.09),
    # Xiao et al. (ViTc), ViTC-1GF / 4GF / 18GF.
    ('ViTc-Ti_16', 1.08),
    ('ViTc-S_16', 3.96),
    ('ViTc-B_16', 17.7),
  ],
)
def test_dense_conv_count_matches_published_gmacs(name, published_gmacs):
  dense = flops.forward_flops(name, count_padding=True)
  # The published figures have 3 significant digits.
  assert dense / 2e9 == pytest.approx(published_gmacs, rel=0.005)
  # Dropping the taps on zero padding only ever lowers the count.
  assert flops.forward_flops(name) < dense


@pytest.mark.parametrize(
  ('name', 'published'),
  [
    # Exact parameter counts of the released models (1000
    # classes, 224x224).
    ('ViT-Ti_16', 5_717_416),
    ('ViT-S_16', 22_050_664),
    ('ViT-B_16', 86_567_656),
    ('ViT-B_32', 88_224_232),
    ('ViT-B_8', 86_576_872),
    ('ViT-L_16', 304_326_632),
    ('ViT-L_32', 306_535_400),
    ('ViT-H_14', 632_045_800),
    ('R50+ViT-B_16', 98_659_112),
  ],
)
def test_param_count_equals_published(name, published):
  assert flops.param_count(name) == published


def test_param_count_grows_with_the_position_embedding():
  # 384 px at /16: 576 instead of 196 patch embeddings of width 768.
  grown = flops.param_count('ViT-B_16', 384) - flops.param_count('ViT-B_16')
  assert grown == (576 - 196) * 768


def _config(**kwargs):
  config = ml_collections.ConfigDict(
    dict(
      model_name='ViT-B_16',
      image_size=224,
      num_classes=None,
      num_epochs=7.0,
      num_train_examples=303_000_000,
      batch_size=4096,
      total_steps=None,
      model=dict(classifier='token', dropout_rate=0.0, scan=True),
    )
  )
  config.update(kwargs)
  return config


def test_pretraining_exaflops_is_three_forward_passes_per_image():
  forward = flops.forward_flops('ViT-B_16', 224, None)
  expected = 3 * forward * 7 * 303_000_000 / 1e18
  assert compute_table.pretraining_exaflops(_config()) == pytest.approx(
    expected
  )
  # A step budget overrides epochs: steps x batch images.
  by_steps = compute_table.pretraining_exaflops(_config(total_steps=1000))
  assert by_steps == pytest.approx(3 * forward * 1000 * 4096 / 1e18)


def test_pretraining_exaflops_needs_the_dataset_size():
  with pytest.raises(ValueError, match='num_train_examples'):
    compute_table.pretraining_exaflops(_config(num_train_examples=None))


def test_results_table_matches_the_papers_exaflops():
  rows = compute_table.results_table(flops_config.get_config().row_configs.jft)
  assert [(r['model'], r['epochs']) for r in rows] == list(
    compute_table.PAPER_EXAFLOPS
  )
  for row in rows:
    assert row['exaflops'] == pytest.approx(row['paper_exaflops'], rel=0.1), row
    assert row['rel_diff'] == pytest.approx(
      row['exaflops'] / row['paper_exaflops'] - 1
    )
  table = compute_table.format_table(rows)
  lines = table.splitlines()
  assert len(lines) == 2 + len(rows)
  assert lines[0].startswith('| Model | Epochs')
  assert '| ViT-H_14 | 14 |' in table
