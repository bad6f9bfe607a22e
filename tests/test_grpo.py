"""The GRPO family against independent float64 numpy loops written from the papers' equations, on fresh random
inputs: group / leave-one-out / REINFORCE++ advantages, the KL estimators, the loss-side beta controller."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures  # pylint: disable=g-bad-import-order
from padding import garbage_at_pads, right_padded_mask

from jax_rlhf import losses, rl

# ---------------------------------------------------------------------------------------------------------
# float64 references (plain loops)
# ---------------------------------------------------------------------------------------------------------


def ref_group_advantages(rewards, g, scale, eps):
  b = len(rewards)
  out = np.zeros(b)
  all_mean = sum(rewards) / b
  batch_std = math.sqrt(sum((r - all_mean) ** 2 for r in rewards) / max(b - 1, 1))
  for i in range(b):
    group = [rewards[j] for j in range(b) if j // g == i // g]
    mean = sum(group) / g
    std = math.sqrt(sum((r - mean) ** 2 for r in group) / max(g - 1, 1))
    a = rewards[i] - mean
    if scale == 'group':
      a /= std + eps
    elif scale == 'batch':
      a /= batch_std + eps
    out[i] = a
  return out


def ref_rloo(rewards, g):
  b = len(rewards)
  out = np.zeros(b)
  for i in range(b):
    others = [rewards[j] for j in range(b) if j // g == i // g and j != i]
    out[i] = rewards[i] - sum(others) / len(others)
  return out


def ref_kl(d, kind):
  """d = logp - ref_logp (float64 scalar)."""
  if kind == 'k1':
    return d
  if kind == 'k2':
    return 0.5 * d * d
  return math.exp(-d) - 1.0 + d


def ref_reinforce_pp(logp, ref_logp, score, mask, beta, group_size, kind, gamma, eps):
  b, n = logp.shape
  lengths = mask.sum(1).astype(int)
  rewards = np.zeros((b, n))
  for i in range(b):
    for t in range(lengths[i]):
      rewards[i, t] = -beta * ref_kl(float(logp[i, t]) - float(ref_logp[i, t]), kind)
    if lengths[i]:
      rewards[i, lengths[i] - 1] += score[i]
  ret = np.zeros((b, n))
  if group_size is None:
    for i in range(b):
      running = 0.0
      for t in reversed(range(lengths[i])):
        running = rewards[i, t] + gamma * running
        ret[i, t] = running
  else:
    totals = rewards.sum(1)
    for i in range(b):
      group = [totals[j] for j in range(b) if j // group_size == i // group_size]
      ret[i, :lengths[i]] = totals[i] - sum(group) / len(group)
  vals = [ret[i, t] for i in range(b) for t in range(lengths[i])]
  mean = sum(vals) / len(vals)
  var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
  adv = np.zeros((b, n))
  for i in range(b):
    for t in range(lengths[i]):
      adv[i, t] = (ret[i, t] - mean) / math.sqrt(var + eps)
  return adv


# ---------------------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('scale', ['group', 'batch', 'none'])
@pytest.mark.parametrize('b,g', [(12, 4), (6, 2), (8, 8)])
def test_group_advantages_equal_float64_loop(scale, b, g):
  rng = np.random.default_rng(b * 10 + g)
  rewards = rng.normal(size=b) * 2.0 + 0.5
  got = rl.group_advantages(rewards.astype(np.float32), g, scale=scale, eps=1e-4)
  assert got.shape == (b,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_group_advantages(list(rewards.astype(np.float32)), g, scale, 1e-4),
                             rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('scale', ['group', 'batch', 'none'])
def test_equal_rewards_in_a_group_give_advantage_zero(scale):
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=(4, 4))
  rewards[1] = 0.7  # group 1 all equal
  rewards[3] = -2.0  # group 3 all equal
  adv = np.asarray(rl.group_advantages(rewards.reshape(-1).astype(np.float32), 4, scale=scale))
  np.testing.assert_array_equal(adv.reshape(4, 4)[[1, 3]], 0.0)
  assert np.all(np.abs(adv.reshape(4, 4)[[0, 2]]) > 0)
  loo = np.asarray(rl.rloo_advantages(rewards.reshape(-1).astype(np.float32), 4)).reshape(4, 4)
  np.testing.assert_allclose(loo[[1, 3]], 0.0, atol=1e-6)


@pytest.mark.parametrize('b,g', [(12, 4), (6, 2), (9, 3)])
def test_rloo_equals_explicit_leave_one_out_loop(b, g):
  rng = np.random.default_rng(b + g)
  rewards = rng.normal(size=b).astype(np.float32)
  got = jax.jit(rl.rloo_advantages, static_argnums=1)(rewards, g)
  np.testing.assert_allclose(got, ref_rloo(list(rewards.astype(np.float64)), g), rtol=1e-5, atol=1e-6)


def test_estimators_reject_a_group_size_that_does_not_divide_the_batch():
  with pytest.raises(ValueError, match='divide'):
    rl.group_advantages(jnp.zeros(6), 4)
  with pytest.raises(ValueError, match='>= 2'):
    rl.rloo_advantages(jnp.zeros(6), 1)
  with pytest.raises(ValueError, match='scale'):
    rl.group_advantages(jnp.zeros(4), 2, scale='std')


@pytest.mark.parametrize('kind', ['k1', 'k2', 'k3'])
def test_kl_estimate_equals_float64_formula(kind):
  rng = np.random.default_rng({'k1': 1, 'k2': 2, 'k3': 3}[kind])
  logp = (rng.normal(size=(5, 7)) - 2.0).astype(np.float32)
  ref_logp = (logp + rng.normal(size=(5, 7)) * 0.5).astype(np.float32)
  mask = right_padded_mask(rng, 5, 7)
  got = jax.jit(rl.kl_estimate, static_argnums=2)(garbage_at_pads(rng, logp, mask), ref_logp, kind, mask)
  want = np.array([[ref_kl(float(logp[i, t]) - float(ref_logp[i, t]), kind) if mask[i, t] else 0.0
                    for t in range(7)] for i in range(5)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  unmasked = rl.kl_estimate(logp, ref_logp, kind)  # no mask: every entry
  want_all = np.vectorize(lambda d: ref_kl(d, kind))(logp.astype(np.float64) - ref_logp)
  np.testing.assert_allclose(unmasked, want_all, rtol=1e-5, atol=1e-6)
  if kind != 'k1':
    assert np.all(np.asarray(unmasked) >= 0)


def test_kl_shaped_rewards_uses_kl_estimate():
  rng = np.random.default_rng(4)
  logp, ref_logp = rng.normal(size=(2, 3, 6)).astype(np.float32)
  mask = right_padded_mask(rng, 3, 6)
  for kind in ('k1', 'k3'):
    _, kl = rl.kl_shaped_rewards(logp, ref_logp, np.zeros(3, np.float32), mask, 0.1, kind)
    np.testing.assert_array_equal(kl, rl.kl_estimate(logp, ref_logp, kind, mask=mask))


@pytest.mark.parametrize('group_size,gamma', [(None, 1.0), (None, 0.9), (3, 1.0)])
@pytest.mark.parametrize('kind', ['k1', 'k3'])
def test_reinforce_pp_equals_float64_loop(group_size, gamma, kind):
  rng = np.random.default_rng(7 + (group_size or 0) + int(gamma * 10))
  b, n = 6, 8
  logp = (rng.normal(size=(b, n)) - 1.0).astype(np.float32)
  ref_logp = (logp + 0.3 * rng.normal(size=(b, n))).astype(np.float32)
  mask = right_padded_mask(rng, b, n)
  mask[-1, :2] = True  # every row has a token (the shared helper leaves the last one empty)
  score = rng.normal(size=b).astype(np.float32)
  fn = jax.jit(rl.reinforce_pp_advantages, static_argnames=('group_size', 'kl_kind', 'gamma'))
  adv, kl = fn(garbage_at_pads(rng, logp, mask), ref_logp, score, mask, 0.05, group_size=group_size,
               kl_kind=kind, gamma=gamma)
  want = ref_reinforce_pp(logp, ref_logp, score, mask, 0.05, group_size, kind, gamma, 1e-8)
  np.testing.assert_allclose(adv, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(kl)[~mask], 0.0)
  np.testing.assert_allclose(np.asarray(adv)[mask].mean(), 0.0, atol=1e-5)  # whitened over the batch


# ---------------------------------------------------------------------------------------------------------
# Loss-side KL controller
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kl', [0.0, 0.05, 0.09, 0.11, 0.5])
def test_adaptive_loss_beta_update_follows_ziegler_rule(kl):
  beta, target, horizon, n = 0.04, 0.1, 1000.0, 16
  err = min(max(kl / target - 1.0, -0.2), 0.2)
  got = float(jax.jit(rl.adaptive_loss_beta_update)(beta, kl, n, target, horizon))
  assert got == pytest.approx(beta * (1.0 + err * n / horizon), rel=1e-6)
  assert (got > beta) == (kl > target) and (got < beta) == (kl < target)


# ---------------------------------------------------------------------------------------------------------
# The GRPO policy loss
# ---------------------------------------------------------------------------------------------------------


def ref_grpo_loss(logp, old_logp, adv, mask, clip_low, clip_high, aggregation, constant_len, ratio_level,
                  ref_logp, beta, kind):
  b, n = logp.shape
  lengths = mask.sum(1).astype(int)
  per_seq, tokens, total = [], 0, 0.0
  counts = dict(low=0, high=0, kl=0.0, ratio=0.0, approx=0.0)
  for i in range(b):
    d = [float(logp[i, t]) - float(old_logp[i, t]) for t in range(lengths[i])]
    seq_ratio = math.exp(sum(d) / len(d)) if d else 1.0
    s = 0.0
    for t in range(lengths[i]):
      a = float(adv[i]) if adv.ndim == 1 else float(adv[i, t])
      ratio = math.exp(d[t]) if ratio_level == 'token' else seq_ratio
      l = max(-a * ratio, -a * min(max(ratio, 1 - clip_low), 1 + clip_high))
      kl = ref_kl(float(logp[i, t]) - float(ref_logp[i, t]), kind) if ref_logp is not None else 0.0
      l += beta * kl
      s += l
      counts['low'] += ratio < 1 - clip_low and a < 0
      counts['high'] += ratio > 1 + clip_high and a > 0
      counts['kl'] += kl
      counts['ratio'] += ratio
      counts['approx'] += 0.5 * d[t] ** 2
    tokens += lengths[i]
    total += s
    if lengths[i]:
      per_seq.append(s / lengths[i])
  if aggregation == 'token':
    loss = total / tokens
  elif aggregation == 'sequence':
    loss = sum(per_seq) / len(per_seq)
  else:
    loss = total / (b * (constant_len or n))
  metrics = {'clipfrac_low': counts['low'] / tokens, 'clipfrac_high': counts['high'] / tokens,
             'clipfrac': (counts['low'] + counts['high']) / tokens, 'kl': counts['kl'] / tokens,
             'ratio_mean': counts['ratio'] / tokens, 'approx_kl': counts['approx'] / tokens}
  return loss, metrics


def _loss_inputs(seed, b=6, n=9, per_token_adv=False):
  rng = np.random.default_rng(seed)
  old_logp = (rng.normal(size=(b, n)) - 2.0).astype(np.float32)
  logp = (old_logp + 0.3 * rng.normal(size=(b, n))).astype(np.float32)
  ref_logp = (old_logp + 0.2 * rng.normal(size=(b, n))).astype(np.float32)
  mask = right_padded_mask(rng, b, n)  # row 0 full, the last row empty
  adv = rng.normal(size=(b, n) if per_token_adv else b).astype(np.float32)
  return rng, logp, old_logp, ref_logp, adv, mask


_grpo_loss = jax.jit(losses.grpo_policy_loss,
                     static_argnames=('aggregation', 'constant_len', 'ratio_level', 'kl_kind'))


@pytest.mark.parametrize('aggregation,constant_len', [('token', None), ('sequence', None), ('constant', None),
                                                      ('constant', 32)])
@pytest.mark.parametrize('ratio_level', ['token', 'sequence'])
def test_grpo_policy_loss_equals_float64_loop(aggregation, constant_len, ratio_level):
  rng, logp, old_logp, ref_logp, adv, mask = _loss_inputs(len(aggregation) + (constant_len or 0), b=16)
  clip_low, clip_high = (0.2, 0.28) if ratio_level == 'token' else (0.03, 0.04)  # DAPO / a GSPO-like pair
  loss, metrics = _grpo_loss(garbage_at_pads(rng, logp, mask), old_logp, adv, mask, clip_low=clip_low,
                             clip_high=clip_high, aggregation=aggregation, constant_len=constant_len,
                             ratio_level=ratio_level, ref_logp=ref_logp, beta=0.04, kl_kind='k3')
  want_loss, want_metrics = ref_grpo_loss(logp, old_logp, adv, mask, clip_low, clip_high, aggregation,
                                          constant_len, ratio_level, ref_logp, 0.04, 'k3')
  assert float(loss) == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
  for k, v in want_metrics.items():
    assert float(metrics[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
  assert want_metrics['clipfrac_low'] > 0 and want_metrics['clipfrac_high'] > 0  # both clips acted


@pytest.mark.parametrize('kind', ['k1', 'k2', 'k3'])
def test_grpo_policy_loss_per_token_advantages_and_each_kl(kind):
  rng, logp, old_logp, ref_logp, adv, mask = _loss_inputs(11, per_token_adv=True)
  loss, metrics = _grpo_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28, aggregation='token',
                             ref_logp=ref_logp, beta=0.1, kl_kind=kind)
  want_loss, want_metrics = ref_grpo_loss(logp, old_logp, adv, mask, 0.2, 0.28, 'token', None, 'token',
                                          ref_logp, 0.1, kind)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
  assert float(metrics['kl']) == pytest.approx(want_metrics['kl'], rel=1e-5, abs=1e-6)


def test_grpo_policy_loss_reduces_to_ppo_clipped_loss():
  _, logp, old_logp, _, adv, mask = _loss_inputs(12, per_token_adv=True)
  want, want_m = losses.clipped_policy_loss(logp, old_logp, adv, mask, clip=0.2)
  got, got_m = losses.grpo_policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.2)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_m['clipfrac'], want_m['clipfrac'], rtol=1e-6)
  assert float(got_m['kl']) == 0.0


def test_grpo_policy_loss_gradient_at_ratio_one_is_minus_advantage_weighted_score():
  """At the first minibatch (logp == old_logp) the clip is inactive: d loss / d logp_t = -A_i / sum |o|."""
  _, logp, _, _, adv, mask = _loss_inputs(13)
  grad = jax.grad(lambda lp: losses.grpo_policy_loss(lp, logp, adv, mask, clip_low=0.2, clip_high=0.28)[0])(logp)
  want = np.where(mask, -adv[:, None] / mask.sum(), 0.0)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)


def test_grpo_policy_loss_rejects_unknown_options():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match='aggregation'):
    losses.grpo_policy_loss(z, z, jnp.zeros(2), z, aggregation='mean')
  with pytest.raises(ValueError, match='ratio_level'):
    losses.grpo_policy_loss(z, z, jnp.zeros(2), z, ratio_level='seq')


# ---------------------------------------------------------------------------------------------------------
# Shared-prefill sampling: G rows per prompt from one prefill
# ---------------------------------------------------------------------------------------------------------

PAD, EOS = 1, 0


def _tiny_model(layout):
  """A tiny random model, parameters drawn in numpy (an eager nnx init compiles op by op)."""
  from flax import nnx
  from jax_rlhf.models import transformer as T
  from jax_rlhf.models.transformer_config import preset
  extra = {} if layout == 'gpt2' else dict(layout='llama', num_kv_heads=2, tie_embeddings=False, activation='silu')
  cfg = preset('tiny', vocab_size=128, pad_token_id=PAD, eos_token_id=EOS, **extra)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: T.Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(5)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    base = 1.0 if path[-1] == 'scale' else 0.0
    var.set_value(jnp.asarray(base + 0.3 * rng.standard_normal(var.get_value().shape), jnp.float32))
  return graphdef, nnx.from_flat_state(flat)


@pytest.mark.parametrize('layout', ['llama'])  # grouped-query cache and rotary positions (gpt2's: test_sampling)
def test_shared_prefill_equals_g_separate_prefills(layout):
  from jax_rlhf import sampling
  model = _tiny_model(layout)
  rng = np.random.default_rng(6)
  lengths, p, g = [5, 2, 7], 7, 4
  ids = np.full((3, p), PAD, np.int32)
  mask = np.zeros((3, p), np.int32)
  for i, n in enumerate(lengths):  # left-padded prompts of different lengths
    ids[i, p - n:] = rng.integers(2, 128, size=n)
    mask[i, p - n:] = 1
  kw = dict(max_new_tokens=10, temperature=1.0, eos_token_id=(EOS, 2, 3), pad_token_id=PAD)
  key = jax.random.key(7)
  shared = sampling.generate(model, ids, mask, key, num_samples=g, **kw)
  separate = sampling.generate(model, jnp.repeat(ids, g, axis=0), jnp.repeat(mask, g, axis=0), key, **kw)
  assert shared.tokens.shape == (3 * g, 10)
  np.testing.assert_array_equal(shared.tokens, separate.tokens)
  # Log-probs agree to rounding only: XLA's matmuls over a B-row and a (B*G)-row prefill round differently
  # (~4e-6 here), which moves the cached keys/values, not the draws.
  np.testing.assert_allclose(shared.logprobs, separate.logprobs, rtol=0, atol=2e-5)
  np.testing.assert_array_equal(shared.mask, separate.mask)
  assert int(shared.num_steps) == int(separate.num_steps)
  tokens = np.asarray(shared.tokens).reshape(3, g, 10)
  assert all(len({tuple(r) for r in tokens[i]}) > 1 for i in range(3))  # the G rows of a prompt differ


# ---------------------------------------------------------------------------------------------------------
# The GRPO step functions: dynamic sampling, and the update on 8 devices vs one
# ---------------------------------------------------------------------------------------------------------


def _grpo_config(**over):
  import ml_collections
  from jax_rlhf.config import base_config
  c = base_config()
  c.grpo.update({**dict(prompts_per_step=4, num_generations=4, max_new_tokens=6, num_iterations=2,
                        num_minibatches=2, clip_low=0.2, clip_high=0.28), **over})
  # eps 1e-3 as test_sharding: above the rounding noise of an 8-device gradient sum (see its comment)
  c.grpo.optimizer = ml_collections.ConfigDict(dict(lr=3e-3, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.0,
                                                    schedule='constant', end_lr_frac=0.1, warmup_steps=0,
                                                    grad_clip=1.0))
  return c


def test_drop_equal_groups_keeps_informative_groups_in_a_fixed_batch():
  from jax_rlhf.train import grpo
  gc = _grpo_config(drop_equal_groups=True, oversample=2, num_generations=2, prompts_per_step=3).grpo
  rewards = jnp.array([1., 1., 0., 1., 2., 2., 3., 3., 0., 5., 4., 4.])  # 6 groups of 2: groups 1 and 4 vary
  exp = {'seq': jnp.arange(12)[:, None], 'mask': jnp.ones((12, 3)), 'has_eos': jnp.ones(12, bool)}
  out, m = grpo.advantages(gc, exp, rewards, 0.0)
  np.testing.assert_array_equal(out['seq'][:, 0], [2, 3, 8, 9, 0, 1])  # the two varied groups, then group 0
  np.testing.assert_array_equal(out['mask'][:, 0], [1, 1, 1, 1, 0, 0])  # the all-equal filler is masked out
  assert float(m['frac_reward_zero_std']) == pytest.approx(4 / 6)
  np.testing.assert_allclose(out['advantages'][:4], ref_group_advantages([0., 1., 0., 5.], 2, 'group', 1e-4),
                             rtol=1e-6)


def test_overlong_mask_and_penalty():
  from jax_rlhf.train import grpo
  rewards = jnp.array([1., 2., 3., 4.])
  exp = {'seq': jnp.zeros((4, 1)), 'mask': jnp.ones((4, 3)), 'has_eos': jnp.array([True, False, True, True])}
  out, _ = grpo.advantages(_grpo_config(overlong='mask', num_generations=2).grpo, exp, rewards, 0.0)
  np.testing.assert_array_equal(out['mask'][:, 0], [1, 0, 1, 1])
  out, m = grpo.advantages(_grpo_config(overlong='penalty', overlong_penalty=-5.0, num_generations=2,
                                        estimator='dr_grpo').grpo, exp, rewards, 0.0)
  np.testing.assert_allclose(out['advantages'], [3.0, -3.0, -0.5, 0.5])
  assert float(m['reward']) == pytest.approx((1 - 5 + 3 + 4) / 4)


@pytest.mark.parametrize('estimator,where', [('grpo', 'loss'),
                                             pytest.param('reinforce_pp', 'reward', marks=pytest.mark.slow)])
def test_grpo_update_on_8_devices_equals_one_device(estimator, where):
  from flax import nnx
  from jax_rlhf import sharding as shd
  from jax_rlhf.models.heads import ScalarModel
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.models.transformer_config import preset
  from jax_rlhf.train import grpo
  c = _grpo_config(estimator=estimator, aggregation='sequence', max_new_tokens=4)
  c.grpo.kl.update(coef=0.04, where=where, estimator='k3')
  cfg = preset('tiny', vocab_size=128, pad_token_id=1, eos_token_id=0)
  prompts = np.random.default_rng(0).integers(2, 128, (4, 5)).astype(np.int32)
  batch = {'prompt': prompts, 'prompt_mask': np.ones_like(prompts)}
  out = {}
  for shape in [(1, 1, 1), (2, 2, 2)]:
    mesh = shd.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    trainer = grpo.GRPOTrainer(c, mesh, Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(0)),
                               ScalarModel(cfg, rngs=nnx.Rngs(1)), (0, 1))
    st = trainer.states
    if 'exp' not in out:  # one rollout (on one device) that both meshes update from
      exp, _ = trainer.experience(st, shd.put_batch(batch, mesh),
                                  jax.random.key(3), jnp.float32(0.04))
      out['exp'] = jax.device_get(exp)
      assert np.any(out['exp']['advantages'] != 0)
    st['policy'], um = trainer.update(st['policy'], shd.put_batch(out['exp'], mesh), jax.random.key(4),
                                      jnp.float32(0.04))
    if shape == (2, 2, 2):  # really sharded
      assert len(st['policy'].params['wte'].sharding.device_set) == 8
    out[shape] = (jax.device_get(um), jax.device_get(st['policy'].params))
  (m1, p1), (m8, p8) = out[(1, 1, 1)], out[(2, 2, 2)]
  assert float(m1['ratio_mean']) != 1.0 and float(m1['kl']) > 0  # the second pass saw a moved policy
  for k in ('loss', 'clipfrac', 'kl', 'entropy', 'grad_norm'):
    assert float(m8[k]) == pytest.approx(float(m1[k]), rel=1e-4, abs=1e-6), k
  moved = 0
  for a, b, init in zip(jax.tree.leaves(p1), jax.tree.leaves(p8),
                        jax.tree.leaves(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))):
    np.testing.assert_allclose(b, a, atol=2e-5)
    moved += int(np.any(np.abs(np.asarray(a) - np.asarray(init)) > 1e-4))
  assert moved > 0


def test_grpo_config_errors_are_one_line():
  from jax_rlhf.train import grpo
  grpo.check_config(_grpo_config().grpo)  # the defaults (with the test's sizes) pass
  for over, match in [(dict(estimator='ppo'), 'estimator'), (dict(num_generations=1), 'num_generations'),
                      (dict(overlong='cut'), 'overlong'), (dict(num_minibatches=3), 'divisible'),
                      (dict(drop_equal_groups=True, oversample=1), 'oversample'), (dict(reward_mix='sum'), 'reward_mix')]:
    with pytest.raises(ValueError, match=match):
      grpo.check_config(_grpo_config(**over).grpo)
  c = _grpo_config(estimator='reinforce_pp')
  c.grpo.kl.estimator = 'k2'
  with pytest.raises(ValueError, match='k1'):
    grpo.check_config(c.grpo)


# ---------------------------------------------------------------------------------------------------------
# the grpo stage (the reward functions themselves: tests/test_rewards.py)
# ---------------------------------------------------------------------------------------------------------


def _stage_config(**grpo):
  from jax_rlhf.config import stage_config
  c = stage_config('grpo', 'quick')
  c.grpo.update(grpo)
  c.checkpoint.every = 2
  return c


@pytest.mark.slow
def test_grpo_stage_with_verifier_and_rm_exports_and_resumes_bitwise(quick_pipeline, tmp_path, monkeypatch):
  """From the quick pipeline's SFT and RM: a grpo run with task:verify + rm:0.5 (host-scored) logs every iteration
  (each function's part, KL, beta, clip fractions, entropy, length, EOS fraction, frac_reward_zero_std) and exports
  weights that differ from SFT; a run preempted (SIGTERM) at iteration 2 and rerun exports bitwise the same."""
  from safetensors.numpy import load_file
  from jax_rlhf import metrics as metrics_lib
  from jax_rlhf.train import grpo
  src, proc = quick_pipeline
  assert proc.returncode == 0, proc.stderr[-3000:]
  w = tmp_path / 'W'
  fixtures.copy_runs(src, w)
  config = _stage_config(rewards=('task:verify', 'rm:0.5'))
  summary = grpo.run(config, str(w), 'grpo')
  assert summary['rewards'] == ['task:verify:1', 'rm:0.5'] and summary['iterations'] == 4
  rows = [r for r in metrics_lib.read_metrics(str(w / 'grpo' / 'metrics.jsonl')) if r['split'] == 'train']
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for key in ('reward', 'reward/rm', 'reward/task:verify/spoke', 'kl', 'beta', 'clipfrac_low', 'clipfrac_high',
              'entropy', 'response_length', 'eos_fraction', 'frac_reward_zero_std'):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[0]['beta'] == pytest.approx(0.04) and rows[0]['reward/rm/spoke'] == 1.0
  a = load_file(str(w / 'grpo' / 'hf' / 'model.safetensors'))
  sft = load_file(str(w / 'sft' / 'hf' / 'model.safetensors'))
  assert max(float(np.abs(a[k] - sft[k]).max()) for k in a) > 0

  fixtures.preempt_then_resume(lambda n: grpo.run(config, str(w), n), str(w), 'grpo_b', 2, monkeypatch)
  fixtures.assert_same_export(w / 'grpo', w / 'grpo_b')


@pytest.mark.slow
def test_a_user_reward_that_raises_ends_main_with_one_line_and_exit_2(quick_pipeline, tmp_path):
  """`python -m jax_rlhf.main` with grpo.rewards naming a user's function that raises: exit 2 and one line
  naming the function (no traceback). Only the policy is loaded (no RM among the rewards, no KL)."""
  from conftest import run_main
  src, proc = quick_pipeline
  assert proc.returncode == 0, proc.stderr[-3000:]
  w = tmp_path / 'W'
  fixtures.copy_runs(src, w, ('sft', 'data'))
  (tmp_path / 'myrewards.py').write_text('def boom(prompts, responses):\n  raise KeyError("no answer key")\n')
  got = run_main('configs/grpo.py:quick', w, "--config.grpo.rewards=('myrewards:boom',)", '--config.grpo.kl.coef=0',
                 env={'PYTHONPATH': str(tmp_path)}, timeout=600)
  assert got.returncode == 2, got.stderr[-3000:]
  err = [line for line in got.stderr.strip().splitlines() if line.strip()]
  assert err[-1] == "error: reward function myrewards.boom raised KeyError: 'no answer key'", err[-5:]
  assert 'Traceback' not in got.stderr


def test_exact_rates_per_subcategory_equal_a_hand_count():
  """The eval's per-subcategory exact-answer rates on instruct_world: reference answers are exact, random
  demonstration mistakes are not; each subcategory's rate is the hand count of exact answers in it."""
  from jax_rlhf import evaluate
  from jax_rlhf.tasks import instruct_world as iw
  task = iw.InstructWorldTask({})
  world = task.world
  recs = world.prompts(300, 'eval')
  rng = np.random.default_rng(5)
  right = rng.random(len(recs)) < 0.5
  prompts = [r['prompt'] for r in recs]
  responses = [world.reference_answer(p) if ok else world.demonstration(p, rng, error_rate=1.0)
               for p, ok in zip(prompts, right)]
  gold = np.array([task.gold_score(p, r) for p, r in zip(prompts, responses)])
  subs = [task.subcategory(p) for p in prompts]
  got = evaluate.exact_rates(prompts, responses, gold, subs, task)
  want = {s: float(np.mean([ok for ok, t in zip(right, subs) if t == s])) for s in set(subs)}
  assert got == pytest.approx(want, abs=1e-12)
  assert {'reverse', 'sort', 'uppercase', 'known', 'unknown', 'unsafe'} <= set(got)
  from jax_rlhf import report
  header, rows = report.fmt_subcategory_table({'models': {'sft': {'per_subcategory': got}, 'x': {}}})
  assert header == ['subcategory (exact answers)', 'sft']
  assert rows == [[s, f'{got[s]:.3f}'] for s in sorted(got)]


def test_bad_grpo_stage_settings_are_one_line(tmp_path):
  """A bad reward spec, estimator, an unloadable user function, task:verify without a task, a missing input run:
  each a UserError before any model is loaded."""
  from jax_rlhf.train import common, grpo
  for over, words in (({'rewards': ('verify',)}, 'unknown reward'), ({'estimator': 'ppo'}, 'estimator'),
                      ({'rewards': ('no_such_module_14:f',)}, 'cannot load reward function no_such_module_14:f'),
                      ({'rewards': ('rm:0',)}, 'weight > 0')):
    with pytest.raises(common.UserError, match=words):
      grpo.run(_stage_config(**over), str(tmp_path), 'grpo')
  c = _stage_config(rewards=('task:verify',))
  c.task.name = ''
  with pytest.raises(common.UserError, match='task.name is empty'):
    grpo.run(c, str(tmp_path), 'grpo')
  with pytest.raises(common.UserError, match='sft'):  # no policy run yet
    grpo.run(_stage_config(rewards=('task:verify',)), str(tmp_path), 'grpo')


@pytest.mark.slow
def test_host_scored_step_equals_the_in_graph_step_on_the_same_rewards():
  """The host-scored path (jit rollout -> host rewards -> jit advantages -> update), fed the RM's own scores,
  gives the same metrics and the same updated policy as the one-jit in-graph path under the same key."""
  from flax import nnx
  from jax_rlhf import sharding as shd
  from jax_rlhf.models.heads import ScalarModel
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.models.transformer_config import preset
  from jax_rlhf.train import grpo
  c = _grpo_config(max_new_tokens=4, num_iterations=1, num_minibatches=1)
  cfg = preset('tiny', vocab_size=128, pad_token_id=1, eos_token_id=0)
  prompts = np.random.default_rng(1).integers(2, 128, (4, 5)).astype(np.int32)
  batch = {'prompt': prompts, 'prompt_mask': np.ones_like(prompts)}
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  out = {}
  for path in ('graph', 'host'):
    trainer = grpo.GRPOTrainer(c, mesh, Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(0)),
                               ScalarModel(cfg, rngs=nnx.Rngs(1)), (0, 1))

    def host(exp):
      return shd.to_host(exp['rm_score']), {'reward/rm': float(np.mean(shd.to_host(exp['rm_score'])))}

    m = trainer.step(shd.put_batch(batch, mesh), jax.random.key(7), 0.04, None if path == 'graph' else host)
    out[path] = (jax.device_get(m), jax.device_get(trainer.states['policy'].params))
  (mg, pg), (mh, ph) = out['graph'], out['host']
  assert mh['reward/rm'] == pytest.approx(float(mg['rm_score']), rel=1e-6)
  for k in ('reward', 'loss', 'kl', 'entropy', 'grad_norm'):
    assert float(mh[k]) == pytest.approx(float(mg[k]), rel=1e-5, abs=1e-7), k
  for a, b in zip(jax.tree.leaves(pg), jax.tree.leaves(ph)):
    np.testing.assert_allclose(b, a, atol=1e-6)


def test_host_scored_steps_with_dynamic_sampling_on_8_devices_equal_one_device():
  """Two host-scored steps with DAPO's dynamic sampling (8 groups sampled, the 4 informative kept: a gathered
  row selection) chain on a (2, 2, 2) mesh, each step's experience batch-sharded as the update takes it, and
  give one device's metrics and policy."""
  from flax import nnx
  from jax_rlhf import sharding as shd
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.models.transformer_config import preset
  from jax_rlhf.train import grpo
  c = _grpo_config(max_new_tokens=4, drop_equal_groups=True, oversample=2)
  cfg = preset('tiny', vocab_size=128, pad_token_id=1, eos_token_id=0)
  prompts = np.random.default_rng(2).integers(2, 128, (8, 5)).astype(np.int32)
  batch = {'prompt': prompts, 'prompt_mask': np.ones_like(prompts)}
  rows = np.arange(32)
  rewards = np.where((rows // 4) % 2 == 0, 0.5, (rows % 4) / 4.0)  # the even groups all equal: dropped

  def host(exp):
    return rewards, {}

  out = {}
  for shape in [(1, 1, 1), (2, 2, 2)]:
    mesh = shd.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    trainer = grpo.GRPOTrainer(c, mesh, Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(0)),
                               None, (0, 1))
    ms = [jax.device_get(trainer.step(shd.put_batch(batch, mesh), jax.random.key(k), 0.04, host)) for k in (5, 6)]
    out[shape] = (ms, jax.device_get(trainer.states['policy'].params))
  (m1, p1), (m8, p8) = out[(1, 1, 1)], out[(2, 2, 2)]
  for a, b in zip(m1, m8):
    assert float(a['frac_reward_zero_std']) == 0.5 and float(a['kept_fraction']) == 1.0
    for k in ('loss', 'kl', 'entropy', 'grad_norm'):
      assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-4, abs=1e-6), k
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(b, a, atol=2e-5)


def test_grpo_rollout_is_the_shared_rollout_less_what_it_does_not_read():
  """grpo.rollout is rollout.rollout: with one update per rollout and no KL it skips the policy and reference
  forwards and, without an RM, scores 0; the tokens are those of the full rollout under the same key.
  rollout.host_responses / group_rows give the texts and the group-major prompt of each row."""
  from flax import nnx
  from jax_rlhf import sharding as shd
  from jax_rlhf.models.heads import ScalarModel
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.models.transformer_config import preset
  from jax_rlhf.train import grpo, rollout
  from jax_rlhf.train import state as state_lib
  cfg = preset('tiny', vocab_size=64, pad_token_id=1, eos_token_id=0)
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  graphdefs, states = {}, {}
  for name, model in (('policy', Transformer(cfg, rngs=nnx.Rngs(0))), ('reference', Transformer(cfg, rngs=nnx.Rngs(1))),
                      ('reward', ScalarModel(cfg, rngs=nnx.Rngs(2)))):
    graphdefs[name], states[name], _ = state_lib.place_state(model, None, mesh)
  prompts = np.random.default_rng(2).integers(2, 64, (2, 4)).astype(np.int32)
  batch = {'prompt': jnp.asarray(prompts), 'prompt_mask': jnp.ones((2, 4), jnp.int32)}
  lean = _grpo_config(num_iterations=1, num_minibatches=1, prompts_per_step=2, num_generations=3).grpo
  lean.kl.coef = 0.0
  settings = grpo.settings(lean, 0, 1)
  key = jax.random.key(9)
  full = jax.jit(lambda st: rollout.rollout(graphdefs, st, batch, key, settings))(states)
  exp, m = jax.jit(lambda st: grpo.rollout(graphdefs, lean, settings, st, batch, key))(
      {'policy': states['policy'], 'reference': None, 'reward': None})
  assert set(exp) == {'seq', 'att', 'tokens', 'mask', 'has_eos', 'rm_score'}  # no policy, reference forward
  np.testing.assert_array_equal(exp['tokens'], full['tokens'])
  np.testing.assert_array_equal(exp['seq'], full['seq'])
  np.testing.assert_array_equal(exp['rm_score'], np.zeros(6))
  # a KL in the reward needs both forwards; with the RM the scores are the shared rollout's
  moving = _grpo_config(num_iterations=1, num_minibatches=1, prompts_per_step=2, num_generations=3).grpo
  moving.kl.update(coef=0.04, where='reward', estimator='k1')
  exp, _ = jax.jit(lambda st: grpo.rollout(graphdefs, moving, settings, st, batch, key))(states)
  for mine, shared in (('old_logp', 'logp'), ('ref_logp', 'ref_logp'), ('rm_score', 'scores')):
    np.testing.assert_array_equal(exp[mine], full[shared])
  texts = rollout.host_responses(full, lambda t, mk: [' '.join(str(x) for x, k in zip(r, mr) if k)
                                                      for r, mr in zip(t, mk)], 0)
  tokens, mask = np.asarray(full['tokens']), np.asarray(full['mask']) > 0
  assert texts == [' '.join(str(x) for x, k in zip(r, mr) if k and x != 0) for r, mr in zip(tokens, mask)]
  assert rollout.group_rows(['a', 'b'], 3, 6) == ['a', 'a', 'a', 'b', 'b', 'b']
  with pytest.raises(ValueError, match='2 prompt texts for 3 prompt rows'):
    rollout.group_rows(['a', 'b'], 3, 9)


def test_compare_plan_grpo_runs_use_the_demo_settings_and_pass_the_config_check():
  """configs/pipeline.py:compare: grpo, grpo_verifier and rloo from SFT and the RM, each with the overlong penalty
  and PPO's KL in the reward; the verifier decides alone where it can check; each run's config passes check_config."""
  from jax_rlhf import pipeline
  from jax_rlhf.config import stage_config
  from jax_rlhf.train import grpo
  c = stage_config('pipeline', 'compare')
  runs = {r.name: pipeline.run_config(c, r).grpo for r in c.plan if r.kind == 'grpo'}
  assert sorted(runs) == ['grpo', 'grpo_verifier', 'rloo']
  for name, gc in runs.items():
    grpo.check_config(gc)
    assert (gc.overlong, gc.kl.coef, gc.kl.where, gc.kl.estimator) == ('penalty', 0.2, 'reward', 'k1'), name
  assert tuple(runs['grpo_verifier'].rewards) == ('task:verify', 'rm') and runs['grpo_verifier'].reward_mix == 'first'
  assert runs['rloo'].estimator == 'rloo' and tuple(runs['grpo'].rewards) == ('rm',)
  assert runs['grpo'].scale_rewards == 'batch' and runs['grpo_verifier'].scale_rewards == 'group'
  assert runs['grpo_verifier'].drop_equal_groups and not runs['grpo'].drop_equal_groups
  assert {'grpo', 'grpo_verifier', 'rloo'} <= set(c.eval.models)
