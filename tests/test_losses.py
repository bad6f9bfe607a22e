"""losses.py against independent float64 numpy references written as plain Python loops."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from padding import garbage_at_pads, right_padded_mask

from jax_rlhf import losses

SHAPES = [(1, 1), (3, 7), (6, 16)]

# The reference comparisons run jitted (one compile per shape, hyperparameters traced), which is much cheaper
# than op-by-op eager dispatch; test_jit_compiled_losses_equal_eager checks that the two agree.
token_cross_entropy = jax.jit(losses.token_cross_entropy)
ranking_loss = jax.jit(losses.ranking_loss)
clipped_policy_loss = jax.jit(losses.clipped_policy_loss)
clipped_value_loss = jax.jit(losses.clipped_value_loss)


def log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------------------


def ref_token_cross_entropy(logits, targets, mask):
  total, count = 0.0, 0
  for idx in np.ndindex(*targets.shape):
    if not mask[idx]:
      continue
    z = [float(v) for v in logits[idx]]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    total += lse - z[targets[idx]]
    count += 1
  return total / max(count, 1), count


def ref_ranking_loss(rewards, rankings, margin, centering_coef):
  """rewards: list of lists (k_b rewards); rankings: list of lists of indices best first."""
  losses_, accs, margins = [], [], []
  for r, order in zip(rewards, rankings):
    pair_losses, pair_acc, pair_margin = [], [], []
    for i, j in itertools.combinations(range(len(order)), 2):  # rank i is better than rank j
      r_w, r_l = r[order[i]], r[order[j]]
      pair_losses.append(-log_sigmoid(r_w - r_l - margin) + centering_coef * (r_w + r_l) ** 2)
      pair_acc.append(1.0 if r_w > r_l else 0.0)
      pair_margin.append(r_w - r_l)
    if pair_losses:
      losses_.append(sum(pair_losses) / len(pair_losses))
      accs.append(sum(pair_acc) / len(pair_acc))
      margins.append(sum(pair_margin) / len(pair_margin))
  n = max(len(losses_), 1)
  return sum(losses_) / n, sum(accs) / n, sum(margins) / n


def ref_clipped_policy_loss(logp, old_logp, adv, mask, clip):
  loss, clipped_count, kl, ratio_sum, n = 0.0, 0, 0.0, 0.0, 0
  for idx in np.ndindex(*logp.shape):
    if not mask[idx]:
      continue
    ratio = math.exp(logp[idx] - old_logp[idx])
    a = adv[idx]
    term_unclipped = -a * ratio
    term_clipped = -a * min(max(ratio, 1 - clip), 1 + clip)
    loss += max(term_unclipped, term_clipped)
    clipped_count += term_clipped > term_unclipped
    kl += 0.5 * (logp[idx] - old_logp[idx]) ** 2
    ratio_sum += ratio
    n += 1
  n = max(n, 1)
  return loss / n, clipped_count / n, kl / n, ratio_sum / n


def ref_clipped_value_loss(values, old_values, returns, mask, clip):
  loss, clipped_count, err_sum, n = 0.0, 0, 0.0, 0
  for idx in np.ndindex(*values.shape):
    if not mask[idx]:
      continue
    v, old, ret = values[idx], old_values[idx], returns[idx]
    v_clip = old + min(max(v - old, -clip), clip)
    err, err_clip = (v - ret) ** 2, (v_clip - ret) ** 2
    loss += max(err, err_clip)
    clipped_count += err_clip > err
    err_sum += err
    n += 1
  n = max(n, 1)
  return 0.5 * loss / n, clipped_count / n, err_sum / n


# ---------------------------------------------------------------------------------------------------------
# Token cross-entropy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES)
def test_token_cross_entropy_equals_float64_loop(shape):
  rng = np.random.default_rng(shape[1])
  v = 11
  logits = rng.normal(size=shape + (v,)) * 3
  targets = rng.integers(0, v, size=shape)
  mask = right_padded_mask(rng, *shape)
  loss, n_tokens = token_cross_entropy(jnp.asarray(logits, jnp.float32), targets, mask)
  want_loss, want_n = ref_token_cross_entropy(logits, targets, mask)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  assert int(n_tokens) == want_n
  assert loss.dtype == jnp.float32


def test_token_cross_entropy_is_float32_for_bf16_logits_and_zero_without_tokens():
  logits = jnp.zeros((2, 3, 4), jnp.bfloat16)
  loss, _ = token_cross_entropy(logits, jnp.zeros((2, 3), int), jnp.ones((2, 3)))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, math.log(4), rtol=1e-6)
  loss, n = token_cross_entropy(logits, jnp.zeros((2, 3), int), jnp.zeros((2, 3), bool))
  assert float(loss) == 0.0 and int(n) == 0


# ---------------------------------------------------------------------------------------------------------
# Ranking loss
# ---------------------------------------------------------------------------------------------------------


def random_ranking_batch(rng, b, kmax, ks=None):
  """Padded arrays + ragged lists: rewards [B, Kmax], ranking [B, Kmax], valid [B, Kmax]."""
  ks = list(ks) if ks is not None else list(rng.integers(0, kmax + 1, size=b))
  rewards = rng.normal(size=(b, kmax)) * 1e3  # padded entries: junk
  ranking = rng.integers(-5, kmax + 5, size=(b, kmax))  # padded entries: junk, even out of range
  valid = np.zeros((b, kmax), bool)
  ragged_rewards, ragged_rankings = [], []
  for i, k in enumerate(ks):
    r = rng.normal(size=k)
    order = list(rng.permutation(k))
    rewards[i, :k] = r
    ranking[i, :k] = order
    valid[i, :k] = True
    ragged_rewards.append(list(r))
    ragged_rankings.append(order)
  return rewards, ranking, valid, ragged_rewards, ragged_rankings


@pytest.mark.parametrize('margin,centering_coef', [(0.0, 0.0), (0.5, 0.0), (0.0, 0.01), (0.3, 0.1)])
@pytest.mark.parametrize('b,kmax,ks', [(1, 2, [2]), (4, 9, [9, 4, 2, 0]), (6, 5, None)])
def test_ranking_loss_equals_float64_loop_over_prompts_and_pairs(b, kmax, ks, margin, centering_coef):
  rng = np.random.default_rng(b * 100 + kmax + int(10 * margin))
  rewards, ranking, valid, ragged_r, ragged_o = random_ranking_batch(rng, b, kmax, ks)
  loss, metrics = ranking_loss(rewards, ranking, valid, margin=margin, centering_coef=centering_coef)
  want_loss, want_acc, want_margin = ref_ranking_loss(ragged_r, ragged_o, margin, centering_coef)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['accuracy'], want_acc, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['margin_mean'], want_margin, rtol=1e-5, atol=1e-6)
  assert int(metrics['num_pairs']) == sum(len(o) * (len(o) - 1) // 2 for o in ragged_o)


def test_ranking_loss_with_k2_equals_chosen_rejected_log_sigmoid():
  rng = np.random.default_rng(7)
  chosen, rejected = rng.normal(size=5), rng.normal(size=5)
  # responses stored in either order; the ranking says which is chosen
  swap = rng.random(5) < 0.5
  rewards = np.where(swap[:, None], np.stack([rejected, chosen], 1), np.stack([chosen, rejected], 1))
  ranking = np.where(swap[:, None], [[1, 0]], [[0, 1]])
  loss, metrics = ranking_loss(rewards, ranking, np.ones((5, 2), bool))
  want = np.mean([-log_sigmoid(c - r) for c, r in zip(chosen, rejected)])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], np.mean(chosen > rejected), rtol=1e-6)


def test_ranking_loss_counts_each_prompt_once_not_each_pair():
  # prompt 0: K=4 (6 pairs), all correctly ordered by a wide gap; prompt 1: K=2, wrong order
  rewards = np.array([[30.0, 20.0, 10.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
  ranking = np.array([[0, 1, 2, 3], [0, 1, 0, 0]])
  valid = np.array([[True] * 4, [True, True, False, False]])
  loss, metrics = ranking_loss(rewards, ranking, valid)
  np.testing.assert_allclose(metrics['accuracy'], 0.5, rtol=1e-6)  # (1 + 0) / 2, not 6/7
  np.testing.assert_allclose(loss, 0.5 * (-log_sigmoid(-1.0)), rtol=1e-4)


def test_ranking_loss_without_pairs_is_zero_not_nan():
  loss, metrics = ranking_loss(jnp.full((2, 3), jnp.nan), jnp.zeros((2, 3), int),
                                      jnp.array([[True, False, False], [False, False, False]]))
  assert float(loss) == 0.0 and float(metrics['accuracy']) == 0.0 and int(metrics['num_pairs']) == 0


# ---------------------------------------------------------------------------------------------------------
# PPO clipped losses
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('clip', [0.2, 0.05])
@pytest.mark.parametrize('shape', SHAPES)
def test_clipped_policy_loss_equals_float64_loop(shape, clip):
  rng = np.random.default_rng(shape[1] + int(100 * clip))
  old_logp = -rng.random(shape) * 3
  logp = old_logp + rng.normal(size=shape) * 0.3  # ratios spread across both sides of the clip range
  adv = rng.normal(size=shape)
  mask = right_padded_mask(rng, *shape)
  loss, metrics = clipped_policy_loss(garbage_at_pads(rng, logp, mask), old_logp,
                                      garbage_at_pads(rng, adv, mask), mask, clip=clip)
  want_loss, want_clipfrac, want_kl, want_ratio = ref_clipped_policy_loss(logp, old_logp, adv, mask, clip)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['clipfrac'], want_clipfrac, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['approx_kl'], want_kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['ratio_mean'], want_ratio, rtol=1e-5, atol=1e-6)


def test_ratio_is_one_and_clipfrac_zero_when_logp_equals_old_logp():
  rng = np.random.default_rng(11)
  logp = jnp.asarray(-rng.random((4, 8)) * 5, jnp.float32)
  adv = rng.normal(size=(4, 8))
  mask = right_padded_mask(rng, 4, 8)
  loss, metrics = clipped_policy_loss(logp, logp, adv, mask)
  assert float(metrics['ratio_mean']) == 1.0
  assert float(metrics['clipfrac']) == 0.0
  assert float(metrics['approx_kl']) == 0.0
  np.testing.assert_allclose(loss, -adv[mask].mean(), rtol=1e-5)
  # and the gradient is the plain policy gradient -A / n on valid tokens
  grad = jax.grad(lambda lp: clipped_policy_loss(lp, logp, adv, mask)[0])(logp)
  np.testing.assert_allclose(grad, np.where(mask, -adv / mask.sum(), 0.0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('shape', SHAPES)
def test_clipped_value_loss_equals_float64_loop(shape):
  rng = np.random.default_rng(shape[1] + 1)
  old_values = rng.normal(size=shape)
  values = old_values + rng.normal(size=shape) * 0.3
  returns = rng.normal(size=shape)
  mask = right_padded_mask(rng, *shape)
  loss, metrics = clipped_value_loss(garbage_at_pads(rng, values, mask), old_values,
                                     garbage_at_pads(rng, returns, mask), mask, clip=0.2)
  want_loss, want_clipfrac, want_err = ref_clipped_value_loss(values, old_values, returns, mask, 0.2)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['vf_clipfrac'], want_clipfrac, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['value_error'], want_err, rtol=1e-5, atol=1e-6)


def test_clipped_losses_of_all_pad_batch_are_zero_not_nan():
  x = jnp.full((2, 3), jnp.nan)
  mask = jnp.zeros((2, 3))
  loss, metrics = clipped_policy_loss(x, x, x, mask)
  assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
  loss, metrics = clipped_value_loss(x, x, x, mask)
  assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())


# ---------------------------------------------------------------------------------------------------------
# jit
# ---------------------------------------------------------------------------------------------------------


def test_jit_compiled_losses_equal_eager():
  rng = np.random.default_rng(12)
  shape = (3, 5)
  logits = rng.normal(size=shape + (7,))
  targets = rng.integers(0, 7, size=shape)
  mask = right_padded_mask(rng, *shape)
  logp, old_logp, adv = -rng.random(shape), -rng.random(shape), rng.normal(size=shape)
  values, old_values, returns = rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape)
  rewards, ranking, valid, _, _ = random_ranking_batch(rng, 4, 6, [6, 3, 2, 0])

  def everything(logits, targets, mask, logp, old_logp, adv, values, old_values, returns, rewards, ranking,
                 valid):
    return (losses.token_cross_entropy(logits, targets, mask),
            losses.ranking_loss(rewards, ranking, valid, margin=0.1, centering_coef=0.01),
            losses.clipped_policy_loss(logp, old_logp, adv, mask),
            losses.clipped_value_loss(values, old_values, returns, mask))

  args = (logits, targets, mask, logp, old_logp, adv, values, old_values, returns, rewards, ranking, valid)
  eager = jax.tree_util.tree_leaves(everything(*args))
  jitted = jax.tree_util.tree_leaves(jax.jit(everything)(*args))
  for e, j in zip(eager, jitted):
    np.testing.assert_allclose(j, e, rtol=1e-6, atol=1e-6)
