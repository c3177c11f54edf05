"""benchmarks/profile_kinds.py sorts compiled XLA operations by kind of work."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import pytest

BENCHMARKS = os.path.join(
  os.path.dirname(os.path.dirname(__file__)), 'benchmarks'
)


@pytest.fixture(scope='module')
def profile_kinds():
  sys.path.insert(0, BENCHMARKS)  # It imports its neighbour `shared`.
  try:
    spec = importlib.util.spec_from_file_location(
      'profile_kinds', os.path.join(BENCHMARKS, 'profile_kinds.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.path.remove(BENCHMARKS)


def kinds_of(profile_kinds, fn, *args):
  """The kinds of the operations of fn's compiled program, on one device."""
  args = [jax.device_put(a, jax.devices()[0]) for a in args]
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  instructions = profile_kinds._instructions(hlo)
  entry = hlo[hlo.index('ENTRY') :]
  # Only the entry computation's instructions are timed operations.
  names = [name for name in instructions if f'%{name} = ' in entry]
  kinds = {profile_kinds.classify_hlo(instructions[n]) for n in names}
  return kinds - {'other'}  # Parameters, tuples.


@pytest.mark.parametrize(
  'fn, kind',
  [
    (lambda w: w.astype(jnp.bfloat16), 'casts'),
    (lambda w: jnp.sum(w, axis=0), 'reductions'),
    (lambda w: w * 2.0 + 1.0, 'element-wise'),
    (lambda w: (w * 2.0).T, 'element-wise'),
    (lambda w: w.T.astype(jnp.bfloat16), 'copies and transposes'),
    (lambda w: jax.nn.gelu(w, approximate=True), 'GELU'),
    (lambda w: w @ w.T, 'dense products'),
  ],
)
def test_operations_are_sorted_by_what_they_compute(profile_kinds, fn, kind):
  w = jnp.arange(64 * 96, dtype=jnp.float32).reshape(64, 96) / 1000.0
  assert kinds_of(profile_kinds, fn, w) == {kind}


def test_layer_norm_is_layer_norm(profile_kinds):
  from vit_jax.models.layer_norm import LayerNorm

  module = LayerNorm()
  x = jnp.ones((4, 8, 32))
  variables = module.init(jax.random.key(0), x)
  assert 'LayerNorm' in kinds_of(profile_kinds, module.apply, variables, x)


@pytest.mark.parametrize('implementation', ['conv', 'product'])
def test_patch_embedding_is_patch_embedding(profile_kinds, implementation):
  from vit_jax.models.patch_embedding import PatchEmbedding

  # Named 'embedding', as in the ViT, whose name the products' HLO carries.
  module = PatchEmbedding(32, 4, implementation=implementation)
  images = jnp.ones((2, 16, 16, 3))
  variables = module.init(jax.random.key(0), images)

  def embed(variables, images):
    return module.apply(variables, images)

  kinds = kinds_of(
    profile_kinds, jax.named_call(embed, name='embedding'), variables, images
  )
  assert 'patch embedding' in kinds
  assert 'dense products' not in kinds


@pytest.mark.parametrize(
  'events, shares',
  [
    # Half-overlapping: the shared 5 units go half to each.
    ([('a', 0, 10), ('b', 5, 10)], {'a': 5 + 2.5, 'b': 2.5 + 5}),
    # Back to back, the same kind: nothing is shared.
    ([('a', 0, 4), ('a', 4, 4)], {'a': 8}),
    # Two operations of one kind beside one of another: 2/3 and 1/3.
    ([('a', 0, 9), ('a', 0, 9), ('b', 0, 9)], {'a': 6, 'b': 3}),
    # One inside another, then a gap, which belongs to no one.
    ([('a', 0, 8), ('b', 2, 4), ('b', 20, 1)], {'a': 6, 'b': 2 + 1}),
  ],
)
def test_time_is_split_among_operations_running_at_once(
  profile_kinds, events, shares
):
  assert profile_kinds.attribute(events) == pytest.approx(shares)
