"""Key-by-key translation between this project's tree and PyTorch layouts.

timm's and Hugging Face's state dicts hold the same tensors as this
project's parameters under other names and shapes. One table of `Rule`s per
layout says which of our flat keys ('Transformer/encoderblock_0/...') is
which of theirs ('blocks.0.attn.qkv.weight') and how the array changes; the
same table reads (theirs -> ours) and writes (ours -> theirs).

Templates take integer fields in braces: '{i}' (a block), '{s}' and '{u}'
(a ResNet stage and unit). A field written '{s+1}' in our template is one
more than theirs (PyTorch counts from 0, the JAX names from 1); a format
spec may follow ('{u+1:02d}' for BiT's 'unit01').
"""

import dataclasses
import re
from collections.abc import Iterable, Mapping

import numpy as np

from vit_jax.checkpoints import tree
from vit_jax.models import shapes

# How an array changes from theirs (PyTorch) to ours (Flax).
COPY = 'copy'  # the same array
LINEAR = 'linear'  # nn.Linear (out, in) <-> Dense (in, out)
CONV = 'conv'  # Conv2d OIHW <-> Conv HWIO
HEADS_IN = 'heads_in'  # (H*Dh, D) <-> (D, H, Dh): q, k, v projections
HEADS_BIAS = 'heads_bias'  # (H*Dh,) <-> (H, Dh)
HEADS_OUT = 'heads_out'  # (D, H*Dh) <-> (H, Dh, D): output projection
CONV_HEAD = 'conv_head'  # 1x1 Conv2d (C, F, 1, 1) <-> Dense (F, C)

_FIELD = re.compile(r'\{(\w)(\+1)?(?::(\w+))?\}')


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our key(s) <-> their key. Several of ours are fused along axis 0 of
  theirs (timm's qkv), in order."""

  ours: tuple[str, ...]
  theirs: str
  kind: str = COPY


def rules(*entries) -> tuple[Rule, ...]:
  """Rules from (ours, theirs[, kind]) tuples; `ours` a str or tuple."""
  out = []
  for ours, theirs, *kind in entries:
    ours = (ours,) if isinstance(ours, str) else tuple(ours)
    out.append(Rule(ours, theirs, *kind))
  return tuple(out)


def norm(ours: str, theirs: str) -> tuple[tuple[str, str], ...]:
  """A LayerNorm or GroupNorm: scale/bias <-> weight/bias."""
  return (
    (ours + '/scale', theirs + '.weight'),
    (ours + '/bias', theirs + '.bias'),
  )


def dense(ours: str, theirs: str, kernel: str = LINEAR, bias: str = COPY):
  """A layer with a kernel and a bias: kernel/bias <-> weight/bias."""
  return (
    (ours + '/kernel', theirs + '.weight', kernel),
    (ours + '/bias', theirs + '.bias', bias),
  )


def _pattern(template: str) -> re.Pattern:
  parts, last = [], 0
  for m in _FIELD.finditer(template):
    parts.append(re.escape(template[last : m.start()]))
    parts.append(f'(?P<{m.group(1)}>\\d+)')
    last = m.end()
  parts.append(re.escape(template[last:]))
  return re.compile(''.join(parts) + '$')


def _fill(template: str, fields: Mapping[str, int], shift: int) -> str:
  """Formats a template; `shift` is added to fields marked '+1'."""
  return _FIELD.sub(
    lambda m: format(
      fields[m.group(1)] + (shift if m.group(2) else 0), m.group(3) or ''
    ),
    template,
  )


def _fields(match: re.Match, template: str) -> dict[str, int]:
  """The fields of a match of `template`, counted as theirs (from 0)."""
  return {
    k: int(v) - ('{' + k + '+1' in template)
    for k, v in match.groupdict().items()
  }


def _find(compiled, key: str) -> tuple[Rule, re.Match] | None:
  for rule, pattern in compiled:
    m = pattern.match(key)
    if m:
      return rule, m
  return None


def _to_ours(kind: str, value: np.ndarray, heads: int | None) -> np.ndarray:
  if kind == COPY:
    return value
  if kind == LINEAR:
    return value.T
  if kind == CONV:
    return value.transpose(2, 3, 1, 0)
  if kind == CONV_HEAD:
    return value[:, :, 0, 0].T
  if heads is None:
    raise ValueError('The number of attention heads is needed.')
  if kind == HEADS_IN:
    return value.T.reshape(value.shape[1], heads, -1)
  if kind == HEADS_BIAS:
    return value.reshape(heads, -1)
  if kind == HEADS_OUT:
    return value.T.reshape(heads, -1, value.shape[0])
  raise ValueError(f'Unknown rule kind {kind!r}.')


def _to_theirs(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == COPY:
    return value
  if kind == LINEAR:
    return value.T
  if kind == CONV:
    return value.transpose(3, 2, 0, 1)
  if kind == CONV_HEAD:
    return value.T[:, :, None, None]
  if kind == HEADS_IN:
    return value.reshape(value.shape[0], -1).T
  if kind == HEADS_BIAS:
    return value.reshape(-1)
  if kind == HEADS_OUT:
    return value.reshape(-1, value.shape[-1]).T
  raise ValueError(f'Unknown rule kind {kind!r}.')


def to_ours(
  flat: Mapping[str, np.ndarray],
  table: Iterable[Rule],
  heads: int | None,
  layout: str,
) -> dict[str, np.ndarray]:
  """Their flat state dict -> our flat keys.

  Raises:
    tree.CheckpointMismatchError: keys no rule reads, named as in the file.
  """
  compiled = [(rule, _pattern(rule.theirs)) for rule in table]
  out, unread = {}, []
  for key, value in flat.items():
    found = _find(compiled, key)
    if found is None:
      unread.append(key)
      continue
    rule, m = found
    fields = _fields(m, rule.theirs)
    parts = np.split(np.asarray(value), len(rule.ours), axis=0)
    for ours, part in zip(rule.ours, parts, strict=True):
      out[_fill(ours, fields, 1)] = _to_ours(rule.kind, part, heads)
  if unread:
    raise tree.CheckpointMismatchError(
      f'The file has keys that the {layout} layout, as this project reads '
      f'it, does not have (a model variant it cannot run):\n    '
      + '\n    '.join(sorted(unread))
    )
  return out


def to_theirs(
  flat: Mapping[str, np.ndarray], table: Iterable[Rule], layout: str
) -> dict[str, np.ndarray]:
  """Our flat keys (unrolled blocks, published numbering) -> their keys.

  Raises:
    ValueError: parameters that the layout has no place for.
  """
  compiled = [(rule, _pattern(rule.ours[0])) for rule in table]
  out, used = {}, set()
  for key in flat:
    found = _find(compiled, key)
    if found is None:
      continue  # A fused rule's other keys, or no place for it (below).
    rule, m = found
    fields = _fields(m, rule.ours[0])
    names = [_fill(ours, fields, 1) for ours in rule.ours]
    parts = [_to_theirs(rule.kind, np.asarray(flat[n])) for n in names]
    out[_fill(rule.theirs, fields, 0)] = (
      parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    )
    used.update(names)
  left = sorted(set(flat) - used)
  if left:
    raise ValueError(
      f'The {layout} layout has no place for these parameters: {left}.'
    )
  return out


def expected_shapes(
  model, image_size: int, table: Iterable[Rule], layout: str
) -> dict[str, tuple[int, ...]]:
  """Their names and shapes of a model's parameters at a resolution."""
  target = shapes.abstract_variables(model, image_size)['params']
  flat = tree.unstack_blocks(tree.global_block_numbering(tree.flatten(target)))
  # Uninitialised arrays: only their shapes are used.
  empty = {k: np.empty(v.shape, np.float32) for k, v in flat.items()}
  return {k: v.shape for k, v in to_theirs(empty, table, layout).items()}


def check_shapes(
  found: Mapping[str, tuple[int, ...]],
  expected: Mapping[str, tuple[int, ...]],
  what: str,
) -> None:
  """Compares a file's keys and shapes with a model's, in the file's names.

  Raises:
    tree.CheckpointMismatchError: listing missing, unexpected and
      mis-shaped keys.
  """
  problem = tree.describe_mismatch(
    {k: _Shape(tuple(v)) for k, v in found.items()},
    {k: _Shape(tuple(v)) for k, v in expected.items()},
  )
  if problem:
    raise tree.CheckpointMismatchError(f'{what}:{problem}')


@dataclasses.dataclass(frozen=True)
class _Shape:
  """A key's shape where `tree.describe_mismatch` expects an array."""

  shape: tuple[int, ...]
