"""The model's custom VJPs (`transformer.dense`, `transformer.tied_logits`) give autodiff's gradients: alone, and
through a whole LM loss on both layouts (the same loss with the VJPs swapped for plain jnp functions)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_rlhf.models import transformer as T
from jax_rlhf.train import lm


def test_dense_vjp_matches_autodiff():
  rng = np.random.default_rng(1)
  x, w, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(2, 3, 5), (5, 7), (2, 3, 7)])

  @jax.jit
  def both(x, w, g):
    y, vjp = jax.vjp(T.dense, x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: jnp.einsum('btk,km->btm', x, w), x, w)
    return (y, *vjp(g)), (y_ref, *vjp_ref(g))

  for got, ref in zip(*both(x, w, g)):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  # bf16 compute keeps its dtypes
  bf = lambda a: a.astype(jnp.bfloat16)
  _, dx, dw = jax.jit(both)(bf(x), bf(w), bf(g))[0]
  assert dx.dtype == dw.dtype == jnp.bfloat16


def _plain_tied_logits(h, wte):
  return jnp.einsum('...d,vd->...v', h, wte, preferred_element_type=jnp.float32)


@pytest.mark.parametrize('layout', ['gpt2', 'llama'])
def test_lm_loss_grads_equal_plain_autodiff(layout, monkeypatch):
  kw = dict(vocab_size=96, max_len=32, num_layers=1)
  if layout == 'llama':
    kw.update(layout='llama', num_kv_heads=2, tie_embeddings=False, activation='silu')
  cfg = T.preset('tiny', **kw)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: T.Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)  # parameters drawn in numpy: an eager nnx init compiles op by op
  params = jax.tree.map(lambda v: jnp.asarray(0.1 * rng.standard_normal(v.shape), jnp.float32), params)
  tokens = jnp.asarray(rng.integers(0, 96, size=(3, 17)), jnp.int32)
  mask = jnp.asarray(np.arange(17)[None, :] < np.array([[17], [12], [9]]), jnp.int32)
  batch = {'tokens': tokens, 'attention_mask': mask, 'loss_mask': mask}

  loss_fn = lambda p: lm.lm_loss(nnx.merge(graphdef, p), batch)[0]
  grads = lambda: jax.jit(jax.value_and_grad(loss_fn))(params)
  assert str(jax.make_jaxpr(loss_fn)(params)).count('custom_vjp_call') == {'gpt2': 6 + 1, 'llama': 7}[layout]  # q k v o + MLP (+ the tied head)
  loss, got = grads()
  monkeypatch.setattr(T, 'dense', lambda x, w: jnp.dot(x, w))
  monkeypatch.setattr(T, 'tied_logits', _plain_tied_logits)
  loss_ref, ref = grads()
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  flat_got, flat_ref = jax.tree.leaves(got), jax.tree.leaves(ref)
  assert len(flat_got) == len(flat_ref) > 10
  for a, b in zip(flat_got, flat_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
