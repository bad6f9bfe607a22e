"""rl.py against independent float64 numpy references written as plain Python loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from padding import garbage_at_pads, right_padded_mask

from jax_rlhf import rl
from jax_rlhf.models import scoring

SHAPES = [(1, 1), (3, 7), (6, 16)]

# The reference comparisons run jitted (one compile per shape, numeric hyperparameters traced), which is much
# cheaper than op-by-op eager dispatch; test_jit_compiled_rl_functions_equal_eager checks that the two agree.
masked_whiten = jax.jit(rl.masked_whiten, static_argnames=('shift_mean',))
gae = jax.jit(rl.gae)
kl_shaped_rewards = jax.jit(rl.kl_shaped_rewards, static_argnames=('estimator',))


# ---------------------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------------------


def ref_gae(rewards, values, mask, gamma, lam):
  b, n = rewards.shape
  adv = np.zeros((b, n))
  ret = np.zeros((b, n))
  for i in range(b):
    length = int(mask[i].sum())
    last_gae = 0.0
    for t in reversed(range(length)):
      next_value = values[i, t + 1] if t + 1 < length else 0.0
      delta = rewards[i, t] + gamma * next_value - values[i, t]
      last_gae = delta + gamma * lam * last_gae
      adv[i, t] = last_gae
      ret[i, t] = last_gae + values[i, t]
  return adv, ret


def ref_valid_entries(x, mask):
  return [float(x[idx]) for idx in np.ndindex(*x.shape) if mask[idx]]


def ref_whiten(x, mask, shift_mean, eps):
  vals = ref_valid_entries(x, mask)
  mean = sum(vals) / len(vals)
  var = sum((v - mean) ** 2 for v in vals) / len(vals)
  out = np.zeros(x.shape)
  for idx in np.ndindex(*x.shape):
    if mask[idx]:
      out[idx] = (x[idx] - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
  return out


def ref_kl_shaped_rewards(logp, ref_logp, score, mask, beta, estimator):
  b, n = logp.shape
  rewards = np.zeros((b, n))
  kl = np.zeros((b, n))
  for i in range(b):
    last = None
    for t in range(n):
      if not mask[i, t]:
        continue
      last = t
      d = ref_logp[i, t] - logp[i, t]
      kl[i, t] = -d if estimator == 'k1' else (math.exp(d) - 1.0) - d
      rewards[i, t] = -beta * kl[i, t]
    if last is not None:
      rewards[i, last] += score[i]
  return rewards, kl


def ref_log_softmax_row(z):
  m = max(z)
  lse = m + math.log(sum(math.exp(v - m) for v in z))
  return [v - lse for v in z]


# ---------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES + [(2, 3, 5)])
def test_masked_mean_sum_var_equal_float64_loop(shape):
  rng = np.random.default_rng(sum(shape))
  x = rng.normal(size=shape)
  mask = rng.random(shape) < 0.6
  mask.flat[0] = True
  x_in = garbage_at_pads(rng, x, mask)
  vals = ref_valid_entries(x, mask)
  mean = sum(vals) / len(vals)
  var = sum((v - mean) ** 2 for v in vals) / len(vals)
  np.testing.assert_allclose(rl.masked_sum(x_in, mask), sum(vals), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rl.masked_mean(x_in, mask), mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rl.masked_var(x_in, mask), var, rtol=1e-5, atol=1e-6)
  if len(vals) > 1:
    unbiased = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    np.testing.assert_allclose(rl.masked_var(x_in, mask, unbiased=True), unbiased, rtol=1e-5, atol=1e-6)
  # float masks give the same answers as bool masks
  np.testing.assert_allclose(rl.masked_mean(x_in, mask.astype(np.float32)), mean, rtol=1e-5, atol=1e-6)


def test_masked_mean_along_axis_equals_per_row_loop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 9))
  mask = right_padded_mask(rng, 5, 9)
  got = rl.masked_mean(garbage_at_pads(rng, x, mask), mask, axis=1)
  want = [sum(ref_valid_entries(x[i], mask[i])) / max(int(mask[i].sum()), 1) for i in range(5)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_masked_reductions_of_all_pad_input_are_zero_not_nan():
  x = jnp.full((2, 3), jnp.nan)
  mask = jnp.zeros((2, 3), bool)
  for value in (rl.masked_sum(x, mask), rl.masked_mean(x, mask), rl.masked_var(x, mask),
                rl.masked_var(x, mask, unbiased=True)):
    assert float(value) == 0.0
  np.testing.assert_array_equal(rl.masked_whiten(x, mask), np.zeros((2, 3)))


@pytest.mark.parametrize('shift_mean', [True, False])
@pytest.mark.parametrize('shape', SHAPES[1:])
def test_masked_whiten_equals_float64_loop(shape, shift_mean):
  rng = np.random.default_rng(shape[0] * 10 + shift_mean)
  x = rng.normal(loc=3.0, scale=2.0, size=shape)
  mask = right_padded_mask(rng, *shape)
  got = masked_whiten(garbage_at_pads(rng, x, mask), mask, shift_mean=shift_mean)
  np.testing.assert_allclose(got, ref_whiten(x, mask, shift_mean, 1e-8), rtol=1e-4, atol=1e-5)
  if shift_mean:  # mean 0, biased variance 1 over the valid entries
    vals = np.asarray(got)[mask]
    np.testing.assert_allclose(vals.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(vals.var(), 1.0, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('gamma,lam', [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
@pytest.mark.parametrize('shape', SHAPES)
def test_gae_equals_float64_loop(shape, gamma, lam):
  rng = np.random.default_rng(shape[1] + int(100 * lam))
  rewards = rng.normal(size=shape)
  values = rng.normal(size=shape)
  mask = right_padded_mask(rng, *shape)
  adv, ret = gae(garbage_at_pads(rng, rewards, mask), garbage_at_pads(rng, values, mask), mask,
                 gamma=gamma, lam=lam)
  want_adv, want_ret = ref_gae(rewards, values, mask, gamma, lam)
  assert adv.shape == ret.shape == shape
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_with_lambda_one_gamma_one_gives_reward_to_go_minus_value():
  rng = np.random.default_rng(1)
  rewards, values = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
  mask = np.ones((2, 6), bool)
  adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
  reward_to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(ret, reward_to_go, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adv, reward_to_go - values, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# KL-shaped rewards
# ---------------------------------------------------------------------------------------------------------


def test_last_real_index_is_last_valid_position():
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 0]], bool)
  np.testing.assert_array_equal(scoring.last_real_index(mask), [2, 4, 0, 3])
  np.testing.assert_array_equal(scoring.last_real_index(mask.astype(np.float32)), [2, 4, 0, 3])


@pytest.mark.parametrize('estimator', ['k1', 'k3'])
@pytest.mark.parametrize('shape', SHAPES)
def test_kl_shaped_rewards_equal_float64_loop(shape, estimator):
  rng = np.random.default_rng(shape[1] + (estimator == 'k3'))
  logp = -rng.random(shape) * 3
  ref_logp = -rng.random(shape) * 3
  score = rng.normal(size=shape[0])
  mask = right_padded_mask(rng, *shape)
  beta = 0.05
  rewards, kl = kl_shaped_rewards(garbage_at_pads(rng, logp, mask), ref_logp, score, mask, beta,
                                  estimator=estimator)
  want_rewards, want_kl = ref_kl_shaped_rewards(logp, ref_logp, score, mask, beta, estimator)
  np.testing.assert_allclose(rewards, want_rewards, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kl, want_kl, rtol=1e-5, atol=1e-6)
  if estimator == 'k3':
    assert np.all(np.asarray(kl) >= 0)


def test_kl_shaped_rewards_score_sits_on_eos_and_empty_rows_get_none():
  mask = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
  zeros = np.zeros((3, 3), np.float32)
  rewards, kl = rl.kl_shaped_rewards(zeros, zeros, np.array([2.0, 5.0, -1.0]), mask, beta=0.1)
  np.testing.assert_array_equal(rewards, [[0, 2, 0], [0, 0, 0], [0, 0, -1]])
  np.testing.assert_array_equal(kl, np.zeros((3, 3)))


def test_kl_shaped_rewards_rejects_unknown_estimator():
  with pytest.raises(ValueError, match='k2'):
    rl.kl_shaped_rewards(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros(1), jnp.ones((1, 2)), 0.1, 'k2')


# ---------------------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------------------


def test_fixed_kl_update_keeps_beta():
  assert rl.fixed_kl_update(0.05, 123.0, 512) == 0.05


def test_adaptive_kl_update_moves_beta_toward_target_and_is_clipped():
  beta, target, horizon, n = 0.15, 6.0, 10000, 512
  # KL above target -> beta grows; below -> shrinks; at target -> unchanged
  assert float(rl.adaptive_kl_update(beta, 6.6, n, target, horizon)) > beta
  assert float(rl.adaptive_kl_update(beta, 5.4, n, target, horizon)) < beta
  np.testing.assert_allclose(rl.adaptive_kl_update(beta, 6.0, n, target, horizon), beta, rtol=1e-6)
  # within the clip: exact Ziegler formula
  np.testing.assert_allclose(rl.adaptive_kl_update(beta, 6.6, n, target, horizon),
                             beta * (1 + 0.1 * n / horizon), rtol=1e-6)
  # far from the target: the step is clipped at +-20% * n / horizon
  np.testing.assert_allclose(rl.adaptive_kl_update(beta, 600.0, n, target, horizon),
                             beta * (1 + 0.2 * n / horizon), rtol=1e-6)
  np.testing.assert_allclose(rl.adaptive_kl_update(beta, 0.0, n, target, horizon),
                             beta * (1 - 0.2 * n / horizon), rtol=1e-6)


def test_adaptive_kl_update_compounds_the_clipped_step_each_batch():
  beta = 0.15
  for _ in range(50):  # KL stays far above target: each batch multiplies beta by the clipped factor
    beta = rl.adaptive_kl_update(beta, 12.0, 512, 6.0, 10000)
  np.testing.assert_allclose(beta, 0.15 * (1 + 0.2 * 512 / 10000) ** 50, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Log-probs and entropy
# ---------------------------------------------------------------------------------------------------------


def test_logprobs_and_entropy_from_logits_equal_float64_loop():
  rng = np.random.default_rng(3)
  b, t, v = 2, 3, 5
  logits = rng.normal(size=(b, t, v)) * 4
  tokens = rng.integers(0, v, size=(b, t))
  got_logp = rl.logprobs_from_logits(logits.astype(np.float32), tokens)
  got_ent = rl.entropy_from_logits(jnp.asarray(logits, jnp.bfloat16))
  assert got_logp.dtype == jnp.float32 and got_ent.dtype == jnp.float32
  for i in range(b):
    for j in range(t):
      ls = ref_log_softmax_row(list(logits[i, j]))
      np.testing.assert_allclose(got_logp[i, j], ls[tokens[i, j]], rtol=1e-5, atol=1e-5)
      entropy = -sum(math.exp(l) * l for l in ls)
      np.testing.assert_allclose(got_ent[i, j], entropy, rtol=0.05, atol=0.05)  # bf16 input
  np.testing.assert_allclose(rl.entropy_from_logits(logits.astype(np.float32))[0, 0],
                             -sum(math.exp(l) * l for l in ref_log_softmax_row(list(logits[0, 0]))),
                             rtol=1e-5, atol=1e-5)


def test_entropy_ignores_banned_tokens_with_minus_inf_logits():
  logits = jnp.array([[[0.0, 0.0, -jnp.inf, -jnp.inf]]])
  np.testing.assert_allclose(rl.entropy_from_logits(logits), [[math.log(2)]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# jit
# ---------------------------------------------------------------------------------------------------------


def test_jit_compiled_rl_functions_equal_eager():
  rng = np.random.default_rng(4)
  shape = (4, 6)
  rewards, values = rng.normal(size=shape), rng.normal(size=shape)
  logp, ref_logp = -rng.random(shape), -rng.random(shape)
  score = rng.normal(size=4)
  mask = right_padded_mask(rng, *shape)

  def everything(rewards, values, logp, ref_logp, score, mask, beta):
    shaped, kl = rl.kl_shaped_rewards(logp, ref_logp, score, mask, beta, estimator='k3')
    adv, ret = rl.gae(shaped + rewards, values, mask)
    return (shaped, kl, adv, ret, rl.masked_whiten(adv, mask), rl.masked_whiten(rewards, mask, shift_mean=False),
            rl.masked_var(values, mask, unbiased=True), scoring.last_real_index(mask),
            rl.adaptive_kl_update(beta, rl.masked_mean(kl, mask), 4, 6.0, 10000))

  args = (rewards, values, logp, ref_logp, score, mask, 0.05)
  eager = everything(*args)
  jitted = jax.jit(everything)(*args)
  for e, j in zip(eager, jitted):
    np.testing.assert_allclose(j, e, rtol=1e-6, atol=1e-6)
