"""The DPO family: losses.py's DPO losses against float64 Python loops written from the papers' equations, on
fresh random inputs each run."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_rlhf import losses

LOSS_TYPES = ('sigmoid', 'ipo', 'ipo_norm', 'hinge', 'robust')
METRICS = ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies', 'logps/chosen',
           'logps/rejected')

dpo_loss = jax.jit(losses.dpo_loss, static_argnames=('loss_type', 'beta', 'label_smoothing'))
ranking_dpo_loss = jax.jit(losses.ranking_dpo_loss, static_argnames=('loss_type', 'beta', 'label_smoothing'))
best_vs_worst_dpo_loss = jax.jit(losses.best_vs_worst_dpo_loss,
                                 static_argnames=('loss_type', 'beta', 'label_smoothing'))
listwise_dpo_loss = jax.jit(losses.listwise_dpo_loss, static_argnames=('beta',))


def log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------------------
# float64 references, one pair / one ranking at a time
# ---------------------------------------------------------------------------------------------------------


def ref_pair(pw, pl, rw, rl, beta, loss_type, eps, len_w=1, len_l=1):
  """(loss, metrics) of one pair from the equations in issue 13 / the papers (Python floats)."""
  s_w, s_l = pw - rw, pl - rl
  d = s_w - s_l
  if loss_type == 'sigmoid':  # DPO eq. 7; cDPO
    loss = -(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)
  elif loss_type == 'ipo':  # Azar et al. eq. 17 on summed log-ratios
    loss = (d - 1 / (2 * beta)) ** 2
  elif loss_type == 'ipo_norm':  # the same on per-token log-ratios
    loss = (s_w / len_w - s_l / len_l - 1 / (2 * beta)) ** 2
  elif loss_type == 'hinge':  # SLiC-HF with the reference
    loss = max(0.0, 1 - beta * d)
  else:  # robust DPO
    loss = (-(1 - eps) * log_sigmoid(beta * d) + eps * log_sigmoid(-beta * d)) / (1 - 2 * eps)
  m = {'rewards/chosen': beta * s_w, 'rewards/rejected': beta * s_l, 'rewards/margins': beta * d,
       'rewards/accuracies': float(s_w > s_l), 'logps/chosen': pw, 'logps/rejected': pl}
  return loss, m


def random_logps(rng, shape):
  """Summed log-probs of ~10-token responses: negative, tens of nats; the reference near the policy."""
  policy = -rng.uniform(5.0, 40.0, shape)
  return policy, policy + rng.normal(0.0, 3.0, shape)


def random_rankings(rng, b, kmax):
  ks = rng.integers(2, kmax + 1, b)
  ks[0] = kmax
  ranking = np.zeros((b, kmax), np.int32)
  valid = np.zeros((b, kmax), bool)
  for i, k in enumerate(ks):
    # the k real responses sit in random slots of the K padded ones (slots named by the ranking)
    ranking[i, :k] = rng.permutation(kmax)[:k]
    valid[i, :k] = True
  return ranking, valid


def with_nan_at_unranked(x, ranking, valid):
  """Responses no ranking position names hold NaN: they must never reach a loss."""
  x = x.copy()
  for i in range(len(x)):
    named = set(ranking[i][valid[i]].tolist())
    for j in range(x.shape[1]):
      if j not in named:
        x[i, j] = np.nan
  return x


def check(loss, metrics, ref_loss, ref_metrics, rtol=2e-5, atol=2e-5):
  np.testing.assert_allclose(float(loss), ref_loss, rtol=rtol, atol=atol)
  for name in METRICS:
    np.testing.assert_allclose(float(metrics[name]), ref_metrics[name], rtol=rtol, atol=atol, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
@pytest.mark.parametrize('beta', [0.1, 0.5])
def test_dpo_loss_equals_float64_loop(loss_type, beta):
  rng = np.random.default_rng()
  b = 13
  pw, rw = random_logps(rng, b)
  pl, rl = random_logps(rng, b)
  len_w, len_l = rng.integers(1, 30, b), rng.integers(1, 30, b)
  loss, m = dpo_loss(pw, pl, rw, rl, beta=beta, loss_type=loss_type, chosen_lengths=len_w, rejected_lengths=len_l)
  refs = [ref_pair(*x, beta, loss_type, 0.0, lw, ll) for *x, lw, ll in zip(pw, pl, rw, rl, len_w, len_l)]
  check(loss, m, np.mean([r[0] for r in refs]), {k: np.mean([r[1][k] for r in refs]) for k in METRICS})


@pytest.mark.parametrize('loss_type', ['sigmoid', 'robust'])
@pytest.mark.parametrize('eps', [0.1, 0.3])
def test_label_smoothing_equals_float64_loop(loss_type, eps):
  rng = np.random.default_rng()
  pw, rw = random_logps(rng, 9)
  pl, rl = random_logps(rng, 9)
  loss, m = dpo_loss(pw, pl, rw, rl, beta=0.2, loss_type=loss_type, label_smoothing=eps)
  refs = [ref_pair(*x, 0.2, loss_type, eps) for x in zip(pw, pl, rw, rl)]
  check(loss, m, np.mean([r[0] for r in refs]), {k: np.mean([r[1][k] for r in refs]) for k in METRICS})
  plain, _ = dpo_loss(pw, pl, rw, rl, beta=0.2, loss_type=loss_type)
  assert abs(float(loss) - float(plain)) > 1e-4  # epsilon changes the loss


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards():
  rng = np.random.default_rng()
  p = -rng.uniform(5, 40, (2, 11))
  loss, m = dpo_loss(p[0], p[1], p[0], p[1])
  np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-6)
  for name in ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies'):
    assert float(m[name]) == 0.0, name
  pv = rng.uniform(-30, -5, (3, 4))  # also for rankings: every pair, and Plackett-Luce (which is not log 2)
  ranking, valid = random_rankings(rng, 3, 4)
  np.testing.assert_allclose(float(ranking_dpo_loss(pv, pv, ranking, valid)[0]), math.log(2.0), rtol=1e-6)
  ks = valid.sum(1)
  pl_ref = np.mean([sum(math.log(k - i) for i in range(k - 1)) for k in ks])  # -sum log 1/(k-i): uniform choice
  np.testing.assert_allclose(float(listwise_dpo_loss(pv, pv, ranking, valid)[0]), pl_ref, rtol=1e-6)


def test_gradients_are_finite_for_every_loss():
  """Every loss's gradient wrt the policy's log-probs is finite, with NaN in the unranked padding slots and at
  a large beta (one jitted function for all of them: eager grads compile op by op)."""
  rng = np.random.default_rng()
  pw, rw = random_logps(rng, 5)
  pl, rl = random_logps(rng, 5)
  pv, rv = random_logps(rng, (4, 5))
  ranking, valid = random_rankings(rng, 4, 5)
  pv_nan = with_nan_at_unranked(pv, ranking, valid)
  lens, lens2 = jnp.full((5,), 7.0), jnp.full((4, 5), 3.0)

  @jax.jit
  def all_grads(pw, pl, pv_nan):
    out = {}
    for loss_type in LOSS_TYPES:
      eps = 0.1 if loss_type in ('sigmoid', 'robust') else 0.0
      out[f'pair/{loss_type}'] = jax.grad(lambda a, b: losses.dpo_loss(
          a, b, rw, rl, loss_type=loss_type, label_smoothing=eps, chosen_lengths=lens, rejected_lengths=lens)[0],
          (0, 1))(pw, pl)
      for fn in (losses.ranking_dpo_loss, losses.best_vs_worst_dpo_loss):
        out[f'{fn.__name__}/{loss_type}'] = jax.grad(lambda a: fn(
            a, rv, ranking, valid, loss_type=loss_type, label_smoothing=eps, lengths=lens2)[0])(pv_nan)
    for beta in (0.1, 50.0):
      out[f'listwise/{beta}'] = jax.grad(lambda a: losses.listwise_dpo_loss(a, rv, ranking, valid, beta=beta)[0])(pv_nan)
    return out

  grads = all_grads(pw, pl, pv_nan)
  assert len(grads) == 3 * len(LOSS_TYPES) + 2
  for name, g in grads.items():
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g)), name
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(g)), name


def test_bad_options_are_refused():
  x = jnp.zeros(3)
  with pytest.raises(ValueError, match='loss_type'):
    losses.dpo_loss(x, x, x, x, loss_type='orpo')
  with pytest.raises(ValueError, match='label_smoothing'):
    losses.dpo_loss(x, x, x, x, loss_type='ipo', label_smoothing=0.1)
  with pytest.raises(ValueError, match='label_smoothing'):
    losses.dpo_loss(x, x, x, x, loss_type='robust', label_smoothing=0.5)
  with pytest.raises(ValueError, match='lengths'):
    losses.dpo_loss(x, x, x, x, loss_type='ipo_norm')


# ---------------------------------------------------------------------------------------------------------
# rankings
# ---------------------------------------------------------------------------------------------------------


def ref_ranking_pairs(pv, rv, ranking, valid, beta, loss_type, eps, lens):
  """Explicit average over each prompt's C(k,2) pairs, then over prompts."""
  per_prompt, per_metrics = [], []
  for i in range(len(pv)):
    order = [int(j) for j, v in zip(ranking[i], valid[i]) if v]
    pairs = [ref_pair(pv[i, a], pv[i, c], rv[i, a], rv[i, c], beta, loss_type, eps, lens[i, a], lens[i, c])
             for a, c in itertools.combinations(order, 2)]
    per_prompt.append(np.mean([p[0] for p in pairs]))
    per_metrics.append({k: np.mean([p[1][k] for p in pairs]) for k in METRICS})
  return np.mean(per_prompt), {k: np.mean([m[k] for m in per_metrics]) for k in METRICS}


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_ranking_dpo_loss_is_the_average_over_all_pairs_of_each_prompt(loss_type):
  rng = np.random.default_rng()
  b, kmax = 6, 5
  pv, rv = random_logps(rng, (b, kmax))
  ranking, valid = random_rankings(rng, b, kmax)
  lens = rng.integers(1, 20, (b, kmax)).astype(np.float64)
  eps = 0.2 if loss_type in ('sigmoid', 'robust') else 0.0
  loss, m = ranking_dpo_loss(with_nan_at_unranked(pv, ranking, valid), rv, ranking, valid, beta=0.3,
                             loss_type=loss_type, label_smoothing=eps, lengths=lens)
  check(loss, m, *ref_ranking_pairs(pv, rv, ranking, valid, 0.3, loss_type, eps, lens))
  assert int(m['num_pairs']) == sum(k * (k - 1) // 2 for k in valid.sum(1))


@pytest.mark.parametrize('loss_type', ['sigmoid', 'ipo', 'hinge'])
def test_best_vs_worst_is_dpo_on_rank_1_against_rank_k(loss_type):
  rng = np.random.default_rng()
  b, kmax = 7, 4
  pv, rv = random_logps(rng, (b, kmax))
  ranking, valid = random_rankings(rng, b, kmax)
  valid[-1, 1:] = False  # a prompt with one response has no pair and is left out
  loss, m = best_vs_worst_dpo_loss(with_nan_at_unranked(pv, ranking, valid), rv, ranking, valid, beta=0.2,
                                   loss_type=loss_type)
  refs = []
  for i in range(b - 1):
    best, worst = ranking[i, 0], ranking[i, valid[i].sum() - 1]
    refs.append(ref_pair(pv[i, best], pv[i, worst], rv[i, best], rv[i, worst], 0.2, loss_type, 0.0))
  check(loss, m, np.mean([r[0] for r in refs]), {k: np.mean([r[1][k] for r in refs]) for k in METRICS})
  assert int(m['num_pairs']) == b - 1


def ref_plackett_luce(pv, rv, ranking, valid, beta):
  """DPO appendix A.3: -sum_{k<K_b} log(exp(beta s_(k)) / sum_{j>=k} exp(beta s_(j))), mean over prompts."""
  out = []
  for i in range(len(pv)):
    u = [beta * (pv[i, j] - rv[i, j]) for j, v in zip(ranking[i], valid[i]) if v]
    total = 0.0
    for k in range(len(u) - 1):
      m = max(u[k:])
      total -= u[k] - (m + math.log(sum(math.exp(x - m) for x in u[k:])))
    out.append(total)
  return np.mean(out)


@pytest.mark.parametrize('beta', [0.1, 1.0])
def test_listwise_dpo_loss_equals_float64_plackett_luce_with_padding(beta):
  rng = np.random.default_rng()
  b, kmax = 8, 6
  pv, rv = random_logps(rng, (b, kmax))
  ranking, valid = random_rankings(rng, b, kmax)  # K_b from 2 to 6, padded to 6
  loss, m = listwise_dpo_loss(with_nan_at_unranked(pv, ranking, valid), rv, ranking, valid, beta=beta)
  np.testing.assert_allclose(float(loss), ref_plackett_luce(pv, rv, ranking, valid, beta), rtol=2e-5)
  check(loss, m, float(loss), ref_ranking_pairs(pv, rv, ranking, valid, beta, 'sigmoid', 0.0, np.ones((b, kmax)))[1])


def test_listwise_with_two_responses_equals_sigmoid_dpo():
  rng = np.random.default_rng()
  b = 10
  pv, rv = random_logps(rng, (b, 2))
  ranking = np.stack([rng.permutation(2) for _ in range(b)]).astype(np.int32)
  valid = np.ones((b, 2), bool)
  loss, _ = listwise_dpo_loss(pv, rv, ranking, valid, beta=0.1)
  w, l = ranking[:, 0], ranking[:, 1]
  rows = np.arange(b)
  dpo, _ = dpo_loss(pv[rows, w], pv[rows, l], rv[rows, w], rv[rows, l], beta=0.1)
  np.testing.assert_allclose(float(loss), float(dpo), rtol=1e-6)
  np.testing.assert_allclose(float(ranking_dpo_loss(pv, rv, ranking, valid, beta=0.1)[0]), float(dpo), rtol=1e-6)
