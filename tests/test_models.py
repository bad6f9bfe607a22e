"""The model's custom VJPs (`matmuls.dense`, `matmuls.tied_logits`) give autodiff's gradients: alone, and
through a whole LM loss on both layouts (the same loss with the VJPs swapped for plain jnp functions)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_rlhf.models import layers, matmuls, transformer_config
from jax_rlhf.models import transformer as T
from jax_rlhf.train import lm


def test_dense_vjp_matches_autodiff():
  rng = np.random.default_rng(1)
  x, w, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(2, 3, 5), (5, 7), (2, 3, 7)])

  @jax.jit
  def both(x, w, g):
    y, vjp = jax.vjp(matmuls.dense, x, w)
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
  cfg = transformer_config.preset('tiny', **kw)
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
  monkeypatch.setattr(layers, 'dense', lambda x, w: jnp.dot(x, w))  # as `project` reads it
  monkeypatch.setattr(T, 'tied_logits', _plain_tied_logits)
  loss_ref, ref = grads()
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  flat_got, flat_ref = jax.tree.leaves(got), jax.tree.leaves(ref)
  assert len(flat_got) == len(flat_ref) > 10
  for a, b in zip(flat_got, flat_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Rematerialisation and scanned layers: the plain model's loss and gradients, on both layouts
# ----------------------------------------------------------------------------------------------------

def _small(layout, **kw):
  base = dict(vocab_size=96, max_len=32, num_layers=3, dropout_rate=0.1)
  if layout == 'llama':
    base.update(layout='llama', num_kv_heads=2, tie_embeddings=False, activation='silu', qk_norm=True)
  return transformer_config.preset('tiny', **{**base, **kw})


def _batch(rng):
  tokens = jnp.asarray(rng.integers(0, 96, size=(3, 17)), jnp.int32)
  mask = jnp.asarray(np.arange(17)[None, :] < np.array([[17], [12], [9]]), jnp.int32)
  return {'tokens': tokens, 'attention_mask': mask, 'loss_mask': mask}


def _split(cfg, seed=0):
  """(graphdef, params) of `cfg` with N(0, 0.1) parameters drawn in numpy for the per-layer layout (an eager nnx
  init compiles op by op), stacked when cfg.scan_layers: the same values in both layouts."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: T.Transformer(cfg, rngs=nnx.Rngs(0))))
  _, plain = nnx.split(nnx.eval_shape(lambda: T.Transformer(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  values = {p: 0.1 * rng.standard_normal(v.shape).astype(np.float32) for p, v in nnx.to_flat_state(plain)}
  if cfg.scan_layers:
    values = T.stack_blocks(values, cfg.num_layers)
  flat = nnx.to_flat_state(abstract)
  for p, v in flat:
    assert v.shape == values[p].shape, p
    v.set_value(jnp.asarray(values[p]))
  return graphdef, nnx.from_flat_state(flat)


def _flat(tree):
  return {p: np.asarray(v.get_value() if hasattr(v, 'get_value') else v) for p, v in nnx.to_flat_state(tree)}


# Every remat policy in each layout, with and without scan, split over the two layouts to keep compiles few.
_VARIANTS = {'gpt2': [('full', False), ('dots_saveable', True)],
             'llama': [('dots_saveable', False), ('none', True), ('full', True)]}


@pytest.mark.parametrize('layout', ['gpt2', 'llama'])
def test_remat_and_scan_give_the_plain_loss_and_grads(layout):
  batch = _batch(np.random.default_rng(0))
  key = jax.random.key(5)  # dropout on: the per-layer keys must be the same in every variant
  results = {}
  for remat, scan in [('none', False)] + _VARIANTS[layout]:
    cfg = _small(layout, remat=remat, scan_layers=scan)
    graphdef, params = _split(cfg)
    loss_fn = lambda p, graphdef=graphdef: lm.lm_loss(nnx.merge(graphdef, p), batch, key)[0]
    jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn))(params))
    assert ('checkpoint' in jaxpr or 'remat' in jaxpr) == (remat != 'none')
    assert (' scan[' in jaxpr or 'scan' in jaxpr.split('custom_vjp')[0]) == scan
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    flat_params, flat_grads = _flat(params), _flat(grads)
    if scan:
      assert flat_params[('blocks', 'attn', 'q')].shape[0] == cfg.num_layers
      flat_params, flat_grads = T.unstack_blocks(flat_params), T.unstack_blocks(flat_grads)
    results[remat, scan] = float(loss), flat_params, flat_grads
  ref_loss, ref_params, ref_grads = results['none', False]
  for variant, (loss, flat_params, flat_grads) in results.items():
    assert sorted(flat_grads) == sorted(ref_grads), variant
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=str(variant))
    for p in ref_grads:
      np.testing.assert_array_equal(flat_params[p], ref_params[p])
      np.testing.assert_allclose(flat_grads[p], ref_grads[p], rtol=1e-5, atol=1e-5, err_msg=f'{variant} {p}')


def test_scanned_sampler_and_sharding():
  """The KV-cached sampler runs on the stacked layout (stacked cache) and gives the plain model's tokens and
  log-probs; the sharding rules place the 'layers' axis unsharded."""
  from jax_rlhf import sampling, sharding  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  ids = rng.integers(3, 96, size=(2, 6)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :2] = 0
  outs, groups = [], []
  for scan in (False, True):
    model = nnx.merge(*_split(_small('llama', scan_layers=scan, dropout_rate=0.0, remat='full')))
    outs.append(jax.device_get(sampling.generate(model, ids, mask, jax.random.key(0), max_new_tokens=5,
                                                 temperature=1.0, eos_token_id=0, pad_token_id=1)))
    # G samples per prompt share the prompt's prefill: the cache is repeated along its batch axis (GRPO)
    groups.append(jax.device_get(sampling.generate(model, ids, mask, jax.random.key(0), max_new_tokens=5,
                                                   temperature=1.0, eos_token_id=0, pad_token_id=1, num_samples=3)))
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
  assert len(np.unique(outs[0].tokens)) > 3
  assert groups[0].tokens.shape == (6, 5)
  np.testing.assert_array_equal(groups[0].tokens, groups[1].tokens)
  np.testing.assert_allclose(groups[0].logprobs, groups[1].logprobs, atol=1e-5)
  # The nnx init draws the same values in both layouts (Block by Block, then stacked).
  cfg = _small('gpt2', num_layers=2, vocab_size=32, embed_dim=16, max_len=8)
  plain = _flat(nnx.state(T.Transformer(cfg, rngs=nnx.Rngs(3))))
  scanned = _flat(nnx.state(T.Transformer(cfg.replace(scan_layers=True), rngs=nnx.Rngs(3))))
  assert sorted(T.unstack_blocks(scanned)) == sorted(plain)
  for p, x in T.stack_blocks(plain, 2).items():
    np.testing.assert_array_equal(scanned[p], x)
  cache = T.init_cache(model.config, 2, 11)
  assert cache['k'].shape == (3, 2, 2, 16, 11) and cache['v'].shape == (3, 2, 2, 11, 16)

  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4, 'model': 1})
  state = nnx.state(nnx.eval_shape(lambda: T.Transformer(_small('llama', scan_layers=True, embed_dim=64),
                                                         rngs=nnx.Rngs(0))))
  assert not sharding.unmatched_axes(state)
  specs = sharding.shardings_of(state, mesh)
  assert specs['blocks']['attn']['q'].get_value().spec == jax.sharding.PartitionSpec(None, 'fsdp', None, None)
  assert specs['blocks']['mlp']['down'].get_value().spec == jax.sharding.PartitionSpec(None, None, 'fsdp')
  with pytest.raises(ValueError, match='remat'):
    _small('gpt2', remat='some')


def test_config_model_remat_and_scan_reach_every_stages_models(tmp_path):
  """`model.remat` / `model.scan_layers` in the config tree: the random init, HF loads (LM, scalar body, scalar
  model) and PPO's four models all get them; a bad remat is one clear line."""
  from jax_rlhf.config import stage_config
  from jax_rlhf.models import hf
  from jax_rlhf.models.heads import ScalarModel
  from jax_rlhf.train import common, ppo
  c = stage_config('ppo', 'quick')
  c.model.update(remat='full', scan_layers=True)
  assert common.model_kw(c) == dict(dtype='float32', param_dtype='float32', remat='full', scan_layers=True)
  cfg = _small('llama')
  for run, model in (('sft', T.Transformer(cfg, rngs=nnx.Rngs(0))), ('rm', ScalarModel(cfg, rngs=nnx.Rngs(1)))):
    hf.save_pretrained(model, tmp_path / run / 'hf')
    (tmp_path / run / 'DONE').write_text('')
  lm_model = common.load_lm(str(tmp_path / 'sft' / 'hf'), c)
  models = ppo.load_models(c, str(tmp_path))
  for m in [lm_model, *models.values()]:
    mc = m.config
    assert (mc.remat, mc.scan_layers) == ('full', True)
  assert models['policy'].blocks.attn.q[...].shape[0] == cfg.num_layers  # stacked on the 'layers' axis
  c.model.remat = 'sometimes'
  with pytest.raises(common.UserError, match='config.model.remat must be one of none, full, dots_saveable'):
    common.load_lm(str(tmp_path / 'sft' / 'hf'), c)
