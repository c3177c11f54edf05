"""The input-pipeline throughput measurement, on a few small images."""

from vit_jax.data import config as data_config
from vit_jax.data import sources, throughput


def test_images_per_second_on_written_jpegs(tmp_path):
  throughput.write_jpegs(str(tmp_path), 8)
  source = sources.image_folder(str(tmp_path))
  # 8 JPEGs, a quarter of them test: train/ and test/ of two classes.
  assert source.num_examples('train_full') == 6
  assert source.num_examples('test') == 2
  config = data_config.default_config()
  config.batch_size = 4
  config.image_size = 32
  config.pp.randaugment_layers = 2
  rate = throughput.images_per_second(source, config, threads=1, seconds=0.2)
  assert 0 < rate < 1e5
