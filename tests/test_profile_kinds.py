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
