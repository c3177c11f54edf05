"""timm's ViT training step as an interleaving worker (timm's environment).

The usual timm training step (forward, cross-entropy, backward,
global-norm clipping at 1, SGD with momentum 0.9 on random 224x224 inputs),
run one at a time on request: after its warm-up it prints 'ready', then
runs one step per 'step' line read from stdin and prints its seconds.
"""

import argparse
import contextlib
import sys
import time

import timm
import torch
import torch.nn.functional as F


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--model', default='vit_base_patch16_224')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--dtype', choices=['fp32', 'bf16'], default='bf16')
  args = parser.parse_args()
  torch.manual_seed(0)
  model = timm.create_model(
    args.model, act_layer='gelu_tanh', num_classes=1000, img_size=args.res
  ).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
  x = torch.randn(args.batch, 3, args.res, args.res)
  y = torch.randint(0, 1000, (args.batch,))
  if args.dtype == 'bf16':

    def autocast():
      return torch.autocast('cpu', dtype=torch.bfloat16)
  else:
    autocast = contextlib.nullcontext

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  for _ in range(2):
    step()
  print(
    f'ready {args.dtype} timm {timm.__version__} torch {torch.__version__}',
    flush=True,
  )
  for line in sys.stdin:
    if line.strip() != 'step':
      break
    start = time.perf_counter()
    step()
    print(time.perf_counter() - start, flush=True)


if __name__ == '__main__':
  main()
