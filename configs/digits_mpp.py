"""Masked patch prediction on the embedded digits, as a small-scale check.

  python main.py --config=configs/digits_mpp.py --workdir=/tmp/digits_mpp

The digits model and data of configs/digits.py, pretrained without labels:
each corrupted 4x4 patch predicts its 3-bit mean colour. The results report
the masked-patch accuracy next to the majority-colour baseline.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.objective = 'masked_patch_prediction'
  # Corruption regularises enough; a higher learning rate than the
  # supervised default gets past the positional prior sooner.
  config.model.dropout_rate = 0.0
  config.lr.base = 3e-3
  return config
