"""Sharding rules, mesh construction, and the LM train step on an 8-device mesh vs one device."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jax_rlhf import sharding as shd
from jax_rlhf.models.heads import ScalarModel
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset
from jax_rlhf.train import lm
from jax_rlhf.train import state as st

LLAMA = dict(layout='llama', num_kv_heads=2, tie_embeddings=False, activation='silu')
# eps 1e-3, not 1e-8: Adam divides by sqrt(v) + eps, so with eps 1e-8 a weight whose gradient is ~1e-9 moves by
# ~lr/10 in a direction set by rounding, and the 8-device and 1-device sums round differently (an untied llama
# head failed by 1.2e-4 on an AVX-512 Xeon and passed on an AVX2 EPYC). With eps above the rounding noise the
# parameters compare at 2e-5 and typical weights (gradients ~1e-3 after clipping) still take Adam-sized steps.
OPT = ml_collections.ConfigDict(dict(lr=3e-3, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.01, schedule='cosine',
                                     end_lr_frac=0.1, warmup_steps=1, grad_clip=1.0))


def _mesh(shape):
  return shd.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])


@pytest.mark.parametrize('layout', [{}, LLAMA])
def test_every_parameter_matches_a_rule(layout):
  cfg = preset('tiny', **layout)
  for model in (Transformer(cfg, rngs=nnx.Rngs(0)), ScalarModel(cfg, rngs=nnx.Rngs(0))):
    state = nnx.state(model)
    assert shd.unmatched_axes(state) == set()
    params = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert all(p.get_metadata().get('out_sharding') is not None for p in params)


def test_unknown_logical_axis_is_a_clear_error():
  with pytest.raises(KeyError, match="'expert' has no sharding rule"):
    shd.logical_to_spec(('expert',), (4,), _mesh((2, 2, 2)))


def test_rules_shard_big_dims_and_replicate_indivisible_ones():
  mesh = _mesh((2, 2, 2))
  assert shd.logical_to_spec(('vocab', 'embed'), (512, 64), mesh) == jax.sharding.PartitionSpec('model', 'fsdp')
  assert shd.logical_to_spec(('vocab', 'embed'), (511, 63), mesh) == jax.sharding.PartitionSpec(None, None)


def test_mesh_shape_errors_and_fill():
  assert dict(shd.make_mesh((-1, 2, 1)).shape) == {'data': 4, 'fsdp': 2, 'model': 1}
  with pytest.raises(ValueError, match='needs 16 devices'):
    shd.make_mesh((4, 2, 2))


@pytest.mark.parametrize('layout', [{}, LLAMA])
def test_forward_and_lm_step_on_8_devices_equal_one_device(layout):
  cfg = preset('tiny', **layout)
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, cfg.vocab_size, (8, 16)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[:3, 12:] = 0  # right-padded rows
  batch = {'tokens': tokens, 'attention_mask': mask, 'loss_mask': mask}
  tx = st.make_optimizer(OPT, 10)
  out = {}
  # (shape, activations pinned by the context mesh as in every stage: sharding.mesh_jit; lm.jit_lm_step pins)
  for shape, pinned in [((1, 1, 1), True), ((2, 2, 2), False), ((2, 2, 2), True), ((1, 8, 1), True)]:
    mesh = _mesh(shape)
    graphdef, state, shardings = st.create_state(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), tx, mesh)
    fwd = lambda s, b: nnx.merge(graphdef, s.params, s.rest)(b['tokens'], b['attention_mask'])  # noqa: E731
    logits = np.asarray((shd.mesh_jit(mesh, fwd) if pinned else jax.jit(fwd))(state, shd.put_batch(batch, mesh)))
    step = lm.jit_lm_step(graphdef, tx, shardings, mesh)
    if not pinned:
      step = step.jitted  # the same jit without the context mesh
    losses = []
    for _ in range(3):
      state, metrics = step(state, shd.put_batch(batch, mesh), jax.random.key(1))
      losses.append(float(metrics['loss']))
    if shape == (2, 2, 2):  # really sharded
      wte = state.params['wte']
      assert len(wte.sharding.device_set) == 8 and wte.sharding.spec == jax.sharding.PartitionSpec('model', 'fsdp')
    out[shape, pinned] = (logits, losses, jax.tree.map(np.asarray, state.params))
  l1, s1, p1 = out[(1, 1, 1), True]
  assert s1[-1] < s1[0]  # it learns
  for key in [((2, 2, 2), False), ((2, 2, 2), True), ((1, 8, 1), True)]:
    l8, s8, p8 = out[key]
    np.testing.assert_allclose(l8, l1, atol=1e-5)
    np.testing.assert_allclose(s8, s1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
      np.testing.assert_allclose(b, a, atol=2e-5)


def test_constrain_is_the_identity_outside_a_mesh_and_for_indivisible_batches():
  x = jax.numpy.ones((6, 4))
  fn = jax.jit(lambda x: shd.constrain(x, ('batch', None)))
  assert 'sharding_constraint' not in str(jax.make_jaxpr(fn)(x))  # no context mesh
  mesh = _mesh((2, 4, 1))
  with shd.activation_mesh(mesh):
    assert 'sharding_constraint' not in str(jax.make_jaxpr(fn)(x))  # 6 rows over 8 devices: left alone
    assert 'sharding_constraint' in str(jax.make_jaxpr(fn)(jax.numpy.ones((8, 4))))
    out = fn(jax.device_put(jax.numpy.ones((8, 4)), shd.replicated(mesh)))
  assert out.sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))


@pytest.mark.parametrize('scan', [False, True])
def test_pinned_activations_cut_the_fsdp_steps_temporaries(scan):
  """ZeRO-3 over 8 devices: with the residual stream pinned to the batch axes, each device keeps its own rows
  (the weights are gathered), so the compiled LM step's temporaries shrink (unpinned, the partitioner keeps
  activations whole per device; Llama-3-8B PPO on 64 devices needed 1.48 TiB, README)."""
  cfg = preset('tiny', scan_layers=scan)
  tx = st.make_optimizer(OPT, 10)
  mesh = _mesh((1, 8, 1))
  graphdef, state, shardings = st.create_state(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), tx, mesh)
  tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (16, 33)).astype(np.int32)
  batch = shd.put_batch({'tokens': tokens, 'attention_mask': np.ones_like(tokens), 'loss_mask': np.ones_like(tokens)},
                        mesh)
  temp = {}
  for pinned in (False, True):
    step = lm.jit_lm_step(graphdef, tx, shardings, mesh)
    step = step if pinned else step.jitted
    temp[pinned] = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes
  assert temp[True] < 0.75 * temp[False], temp


def test_lm_loss_masks_prompt_tokens():
  """Changing a token that is neither a target nor before a target must not change the loss."""
  cfg = preset('tiny')
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  tokens = rng.integers(2, cfg.vocab_size, (2, 10)).astype(np.int32)
  att = np.ones_like(tokens)
  loss_mask = np.zeros_like(tokens)
  loss_mask[:, 4:7] = 1  # targets are tokens 4..6, predicted from tokens < 7
  base, n = lm.lm_loss(model, {'tokens': tokens, 'attention_mask': att, 'loss_mask': loss_mask})
  assert int(n) == 6
  changed = tokens.copy()
  changed[:, 8] = (changed[:, 8] + 1) % cfg.vocab_size  # after the last target: no influence
  again, _ = lm.lm_loss(model, {'tokens': changed, 'attention_mask': att, 'loss_mask': loss_mask})
  np.testing.assert_allclose(float(again), float(base), rtol=1e-6)
  # and an independent reference: float64 log-softmax at the target positions
  logits = np.asarray(model(tokens[:, :-1], att[:, :-1]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  ref = -np.mean([logp[b, t - 1, tokens[b, t]] for b in range(2) for t in range(4, 7)])
  np.testing.assert_allclose(float(base), ref, rtol=1e-5)
