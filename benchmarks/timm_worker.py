"""timm's ViT as an interleaving worker (timm's environment).

--mode=train: the usual timm training step (forward, cross-entropy,
backward, global-norm clipping at 1, SGD with momentum 0.9 on random
inputs). --mode=inference: the forward pass of the `.eval()` model in
`torch.inference_mode()`. --dtype: fp32; bf16, float32 weights under
bfloat16 autocast (which re-casts the weights on every call); bf16w
(inference only), the model converted once with `.to(torch.bfloat16)`.
--device=cuda runs it on the GPU (each step timed to its end by
`torch.cuda.synchronize()`; float32 products in TF32, as JAX's default
precision runs them there); --compile wraps the model in `torch.compile`.
After its warm-up it prints 'ready', then runs one step per 'step' line
read from stdin and prints its seconds; with --profile_steps=N it instead
profiles N steps (`torch.profiler`) and prints one JSON line of
milliseconds per step for each kind of work (see profile_kinds.py).
"""

import argparse
import collections
import contextlib
import json
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F


def _autocast(dtype: str, device: str):
  if dtype == 'bf16':
    return torch.autocast(device, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def train_step(model, x, dtype: str):
  y = torch.randint(0, 1000, (x.shape[0],), device=x.device)
  opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
  model.train()

  def step():
    opt.zero_grad(set_to_none=True)
    with _autocast(dtype, x.device.type):
      loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  return step


def inference_step(model, x, dtype: str):
  model.eval()
  if dtype == 'bf16w':
    model.to(torch.bfloat16)
    x = x.to(torch.bfloat16)

  def step():
    with torch.inference_mode(), _autocast(dtype, x.device.type):
      return model(x)

  return step


# torch operators by kind of work (matched by substring, first kind first);
# the rest count as 'other'.
TORCH_KINDS = {
  'dense products': ('aten::addmm', 'aten::mm', 'aten::bmm', 'aten::linear'),
  'attention': ('flash_attention', 'scaled_dot_product', 'softmax'),
  'GELU': ('gelu',),
  'LayerNorm': ('layer_norm',),
  'casts': ('aten::copy_', 'aten::to', 'aten::_to_copy'),
  'copies and transposes': ('aten::clone', 'aten::contiguous', 'transpose'),
  'reductions': ('aten::sum', 'norm', 'aten::mean'),
  'element-wise': (
    'aten::add',
    'aten::mul',
    'aten::div',
    'aten::fill_',
    'aten::zero_',
    'aten::addcmul',
    'aten::lerp',
  ),
  'patch embedding': ('convolution', 'conv2d'),
}


def profile_kinds(step, steps: int) -> dict[str, float]:
  """ms per step of each kind of work (operators' self time), and 'wall'."""
  walls = []
  activities = [torch.profiler.ProfilerActivity.CPU]
  with torch.profiler.profile(activities=activities) as profile:
    for _ in range(steps):
      start = time.perf_counter()
      step()
      walls.append(time.perf_counter() - start)
  totals = collections.Counter()
  for event in profile.key_averages():
    kind = next(
      (
        kind
        for kind, names in TORCH_KINDS.items()
        if any(name in event.key for name in names)
      ),
      'other',
    )
    totals[kind] += event.self_cpu_time_total / 1e3 / steps
  return {**totals, 'wall': statistics.mean(walls) * 1e3}


def _synchronized(step):
  """`step`, returning only once the GPU has finished its work."""

  def run():
    out = step()
    torch.cuda.synchronize()
    return out

  return run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--model', default='vit_base_patch16_224')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--dtype', choices=['fp32', 'bf16', 'bf16w'])
  parser.add_argument('--mode', choices=['train', 'inference'])
  parser.add_argument('--profile_steps', type=int, default=0)
  parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
  parser.add_argument('--compile', action='store_true')
  args = parser.parse_args()
  if args.mode == 'train' and args.dtype == 'bf16w':
    parser.error('--dtype=bf16w is for --mode=inference only.')
  if args.profile_steps and args.device != 'cpu':
    parser.error('--profile_steps profiles the CPU only; use --device=cpu.')
  if args.device == 'cuda':
    # As XLA's float32 products on NVIDIA GPUs at JAX's default precision.
    torch.set_float32_matmul_precision('high')
  torch.manual_seed(0)
  model = timm.create_model(
    args.model, act_layer='gelu_tanh', num_classes=1000, img_size=args.res
  ).to(args.device)
  x = torch.randn(args.batch, 3, args.res, args.res, device=args.device)
  if args.compile:
    model = torch.compile(model)
  make = train_step if args.mode == 'train' else inference_step
  step = make(model, x, args.dtype)
  if args.device == 'cuda':
    step = _synchronized(step)
  for _ in range(2):
    step()
  if args.profile_steps:
    print(json.dumps(profile_kinds(step, args.profile_steps)), flush=True)
    return
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
