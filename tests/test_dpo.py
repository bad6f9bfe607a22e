"""The DPO family: losses.py's DPO losses against float64 Python loops written from the papers' equations, on
fresh random inputs each run."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures  # pylint: disable=g-bad-import-order

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
      out[f'listwise/{beta}'] = jax.grad(
          lambda a: losses.listwise_dpo_loss(a, rv, ranking, valid, beta=beta)[0])(pv_nan)
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


def test_rpo_nll_is_the_mean_token_nll_of_each_chosen_response():
  """Iterative RPO's NLL term (Pang et al. 2024, eq. 1) against a float64 loop: -log pi(y_w|x)/|y_w| of each
  prompt's rank-1 response, averaged over the prompts that have a pair; the stage's loss adds alpha x it."""
  import ml_collections
  from jax_rlhf.train import dpo
  rng = np.random.default_rng()
  b, kmax = 7, 4
  pv, rv = random_logps(rng, (b, kmax))
  ranking, valid = random_rankings(rng, b, kmax)
  valid[-1, 1:] = False  # one response: no pair, no NLL
  lens = rng.integers(1, 20, (b, kmax)).astype(np.float64)
  want = np.mean([-pv[i, ranking[i, 0]] / lens[i, ranking[i, 0]] for i in range(b - 1)])
  loss, m = jax.jit(losses.rpo_nll_loss)(with_nan_at_unranked(pv, ranking, valid), lens, ranking, valid)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(m['rpo/nll']) == float(loss)
  batch = {'ranking': ranking, 'valid': valid, 'lengths': lens}
  cfg = ml_collections.ConfigDict(dict(beta=0.2, loss_type='sigmoid', label_smoothing=0.0, mode='best_vs_worst',
                                       rpo_alpha=0.0))
  plain, _ = dpo.preference_loss(pv, rv, batch, cfg)
  cfg.rpo_alpha = 0.7
  total, tm = dpo.preference_loss(pv, rv, batch, cfg)
  np.testing.assert_allclose(float(total), float(plain) + 0.7 * want, rtol=1e-5)
  assert 'rpo/nll' in tm


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


# ---------------------------------------------------------------------------------------------------------
# the train step (train/dpo.py) and the summed log-probs (models/scoring.py)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tok():
  from transformers import AutoTokenizer
  from jax_rlhf.tasks import instruct_world
  return AutoTokenizer.from_pretrained(instruct_world.tokenizer_path())


def tiny_lm(tok, seed=0):
  from flax import nnx
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.models.transformer_config import preset
  cfg = preset('tiny', vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.eos_token_id)
  return Transformer(cfg, rngs=nnx.Rngs(seed))


def preference_records():
  rng = np.random.default_rng(1)
  items = ['c a t', 't a c', 'a c t', 'i cannot help with that.', "i don't know", '3', 'x y z w v']
  prompts = ['reverse: c a t\n', 'count: a b c\n', 'first: x y\n', 'what colour is the zorb?\n']
  recs = []
  for i, k in enumerate([2, 4, 3, 4, 2, 3, 4, 4]):
    recs.append({'prompt': prompts[i % 4] * (1 + i % 2), 'ranking': [int(j) for j in rng.permutation(k)],
                 'responses': [items[j] for j in rng.choice(len(items), k, replace=False)]})
  return recs


def test_preference_arrays_hold_left_padded_prompt_then_right_padded_response(tok):
  from jax_rlhf.data import batches
  from jax_rlhf.train import dpo
  recs = preference_records()
  arr, _ = dpo.preference_arrays(tok, recs, 12, 6, 4)
  assert arr['tokens'].shape == (8, 4, 18)
  for i, rec in enumerate(recs):
    p = batches.encode(tok, [rec['prompt']])[0][-12:]
    for j, r in enumerate(batches.encode(tok, rec['responses'])):
      r = (r + [tok.eos_token_id])[:6]
      row, m = arr['tokens'][i, j], arr['attention_mask'][i, j]
      assert row[12 - len(p):12].tolist() == p and not m[:12 - len(p)].any() and m[12 - len(p):12].all()
      assert row[12:12 + len(r)].tolist() == r and m[12:12 + len(r)].all() and not m[12 + len(r):].any()
      assert arr['lengths'][i, j] == len(r)
    assert arr['valid'][i].sum() == len(rec['responses']) and not arr['attention_mask'][i, len(rec['responses']):].any()


def test_sequence_logps_ignore_pads_left_and_right(tok):
  """scoring.sequence_logps of (prompt, response) pairs is the same with few or many left pads before the prompt
  and right pads after the response, and equals a float64 sum of log-softmax over the response tokens of an
  unpadded forward of each row alone."""
  from jax_rlhf.models import scoring
  from jax_rlhf.train import dpo
  model = tiny_lm(tok)
  recs = preference_records()[:4]
  logps = []
  for p_len, r_len in ((14, 7), (19, 12)):  # nothing is cut: the longest prompt has 14 tokens, response + EOS 7
    arr, _ = dpo.preference_arrays(tok, recs, p_len, r_len, 4)
    b, k, length = arr['tokens'].shape
    f = jax.jit(lambda t, a: scoring.sequence_logps(model, t, a, p_len))
    logps.append(np.asarray(f(arr['tokens'].reshape(b * k, length), arr['attention_mask'].reshape(b * k, length))))
  np.testing.assert_allclose(logps[0], logps[1], rtol=1e-5, atol=1e-4)
  arr, _ = dpo.preference_arrays(tok, recs, 14, 7, 4)
  flat_t, flat_m = arr['tokens'].reshape(16, 21), arr['attention_mask'].reshape(16, 21)
  for row in (1, 3, 5, 13):  # a few rows (each an eager forward of its own length): one pad row, 3 real
    real = flat_m[row] > 0
    if not real.any():
      assert logps[0][row] == 0.0
      continue
    ids = flat_t[row][real]
    n_resp = int(flat_m[row, 14:].sum())
    logits = np.asarray(model(jnp.asarray(ids[None, :-1])), np.float64)[0]  # [T-1, V]
    lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    tok_logp = logits[np.arange(len(ids) - 1), ids[1:]] - lse  # log p(ids[t+1] | ids[:t+1])
    np.testing.assert_allclose(logps[0][row], tok_logp[-n_resp:].sum(), rtol=1e-5, atol=1e-4)


def dpo_setup(tok, mode, loss_type='sigmoid'):
  import ml_collections
  from jax_rlhf.train import state as state_lib
  from jax_rlhf.train import dpo
  cfg = ml_collections.ConfigDict(dict(beta=0.1, loss_type=loss_type, label_smoothing=0.0, mode=mode))
  opt = ml_collections.ConfigDict(dict(lr=1e-3, schedule='constant', end_lr_frac=1.0, warmup_steps=0, b1=0.9,
                                       b2=0.999, eps=1e-3, weight_decay=0.0, grad_clip=1.0))
  tx = state_lib.make_optimizer(opt, 10)
  arr, _ = dpo.preference_arrays(tok, preference_records(), 12, 6, 4)
  return cfg, tx, arr


def host_state(model, tx):
  from jax_rlhf.train import state as state_lib
  graphdef, params, rest = state_lib.split_model(model)
  return graphdef, state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                                        opt_state=None if tx is None else tx.init(params))


@pytest.mark.parametrize('mode,compacted,precomputed', [('pairwise', True, False), ('listwise', False, True)])
def test_dpo_step_on_8_devices_equals_the_step_on_one(tok, mode, compacted, precomputed):
  """The sharded step (batch over 8 devices, params placed by the rules), on a compacted batch or with
  precomputed reference log-probs, gives the loss and the weights of the padded one-device step (reference in it),
  with the reference a different model, so that the rewards are not 0. With the reference equal to the policy
  (step 0 of a run, dropout off) every reward is 0: the pairwise loss is log 2, the listwise one the mean of
  sum_k log(k_b - k + 1)."""
  from jax_rlhf import sharding as shd
  from jax_rlhf.train import dpo
  from jax_rlhf.train import state as state_lib
  cfg, tx, arr = dpo_setup(tok, mode)
  graphdef, state = host_state(tiny_lm(tok, 0), tx)
  _, ref = host_state(tiny_lm(tok, 1), None)
  one_step = jax.jit(lambda s, r, b: dpo.dpo_train_step(graphdef, tx, cfg, 12, s, r, b))
  one, m1 = one_step(state, ref, jax.tree.map(jnp.asarray, arr))
  # step 0 of a real run: policy = reference (dropout off) gives every reward 0 and, for pairs, loss log 2
  _, same = host_state(tiny_lm(tok, 0), None)
  m0 = one_step(state, same, jax.tree.map(jnp.asarray, arr))[1]
  ks = arr['valid'].sum(1)
  want = math.log(2) if mode != 'listwise' else np.mean([sum(math.log(k - i) for i in range(k - 1)) for k in ks])
  np.testing.assert_allclose(float(m0['loss']), want, rtol=1e-6)
  assert float(m0['rewards/margins']) == 0.0 and float(m0['rewards/chosen']) == 0.0
  mesh = shd.make_mesh({'data': 8, 'fsdp': 1, 'model': 1})
  graphdef, placed, shardings = state_lib.place_state(tiny_lm(tok, 0), tx, mesh)
  _, ref8, ref_sh = state_lib.place_state(tiny_lm(tok, 1), None, mesh)
  fed = dict(arr)
  if precomputed:
    fed['ref_logps'] = dpo.precompute_ref(graphdef, ref8, arr, 12, 8, mesh, ref_sh)
    assert fed['ref_logps'].shape == (8, 4) and (fed['ref_logps'][~arr['valid']] == 0).all()
    assert (fed['ref_logps'][arr['valid']] < 0).all()
  if compacted:
    assert dpo.compact(fed, 24) is None  # 26 real responses: 24 rows refuse, 32 fit
    fed = dpo.compact(fed, 32)
    assert fed['row_tokens'].shape == (32, 18) and 'lengths' in fed
  step = dpo.jit_train_step(graphdef, tx, cfg, 12, shardings, None if precomputed else ref_sh, mesh)
  eight, m8 = step(placed, None if precomputed else ref8, shd.put_batch(fed, mesh))
  np.testing.assert_allclose(float(m8['loss']), float(m1['loss']), rtol=1e-5)
  assert abs(float(m1['rewards/margins'])) > 0
  for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# the dpo stage
# ---------------------------------------------------------------------------------------------------------


def stage_config(**dpo):
  from jax_rlhf.config import stage_config as base
  c = base('rm', 'quick')
  c.dpo.update(steps=4, batch_size=8, **dpo)
  c.checkpoint.every = 2
  c.log_every = 2
  return c


def test_bad_dpo_config_and_missing_rankings_are_one_clear_line(tmp_path):
  from jax_rlhf.train import common, dpo
  for bad, match in (({'mode': 'listwise', 'loss_type': 'hinge'}, 'listwise'), ({'loss_type': 'kto'}, 'loss_type'),
                     ({'mode': 'all'}, 'mode'), ({'loss_type': 'ipo', 'label_smoothing': 0.1}, 'label_smoothing')):
    with pytest.raises(common.UserError, match=match):
      dpo.run(stage_config(**bad), str(tmp_path), 'dpo')
  with pytest.raises(common.UserError, match='sft'):  # no policy run yet
    dpo.run(stage_config(), str(tmp_path), 'dpo')


@pytest.mark.slow
def test_dpo_stage_from_the_quick_pipeline_resumes_bitwise_and_exports(quick_pipeline, tmp_path, monkeypatch):
  """From the quick pipeline's SFT and its labelled rankings (W/label/rankings.jsonl): a pairwise DPO run logs
  loss log 2 at step 1 (policy = reference), evaluates, exports an HF folder that differs from SFT; a run
  preempted (SIGTERM) at step 2 and rerun resumes from its checkpoint and exports bitwise the same weights."""
  import shutil
  from safetensors.numpy import load_file
  from jax_rlhf import metrics as metrics_lib
  from jax_rlhf.train import dpo
  src, proc = quick_pipeline
  assert proc.returncode == 0, proc.stderr[-3000:]
  w = tmp_path / 'W'
  shutil.copytree(src / 'sft', w / 'sft', ignore=shutil.ignore_patterns('checkpoints', 'tb'))
  (w / 'labels').mkdir(parents=True)
  shutil.copy(src / 'label' / 'rankings.jsonl', w / 'labels' / 'rankings.jsonl')
  config = stage_config(eval_every=2)
  config.log_every = 1
  summary = dpo.run(config, str(w), 'dpo', {'rankings': 'labels'})
  assert summary['steps'] == 4 and 'eval_loss' in summary and 'eval_rewards/accuracies' in summary
  rows = metrics_lib.read_metrics(str(w / 'dpo' / 'metrics.jsonl'))
  train = [r for r in rows if r['split'] == 'train']
  assert [r['step'] for r in train] == [1, 2, 3, 4] and all(np.isfinite(r['loss']) for r in train)
  assert abs(train[0]['loss'] - math.log(2)) < 1e-6 and train[0]['rewards/margins'] == 0.0
  assert [r['step'] for r in rows if r['split'] == 'eval'] == [2, 4]
  a = load_file(str(w / 'dpo' / 'hf' / 'model.safetensors'))
  sft = load_file(str(w / 'sft' / 'hf' / 'model.safetensors'))
  assert max(float(np.abs(a[k] - sft[k]).max()) for k in a) > 0

  fixtures.preempt_then_resume(lambda n: dpo.run(config, str(w), n, {'rankings': 'labels'}), str(w), 'dpo_b', 2,
                               monkeypatch)
  fixtures.assert_same_export(w / 'dpo', w / 'dpo_b')


# ---------------------------------------------------------------------------------------------------------
# online DPO (train/dpo.py: sample_round, judge_with_task, online_train_step)
# ---------------------------------------------------------------------------------------------------------


EVERY, N_SAMPLES = 2, 4


@pytest.fixture(scope='module')
def online_round(tok):
  """One round of the stage's jitted `sample_round` on 8 devices: tiny policy (seed 0), reference (seed 1) and RM
  (seed 2), EVERY x 8 prompts, N_SAMPLES samples each. Returns a namespace of everything the tests read."""
  import types
  from flax import nnx
  from jax_rlhf import sharding as shd
  from jax_rlhf.data import batches
  from jax_rlhf.models.heads import ScalarModel
  from jax_rlhf.train import dpo_online
  from jax_rlhf.train import state as state_lib
  mesh = shd.make_mesh({'data': 8, 'fsdp': 1, 'model': 1})
  _, tx, _ = dpo_setup(tok, 'pairwise')
  g, frozen, sh = {}, {}, {}
  g['policy'], policy, policy_sh = state_lib.place_state(tiny_lm(tok, 0), tx, mesh)
  g['reference'], frozen['reference'], sh['reference'] = state_lib.place_state(tiny_lm(tok, 1), None, mesh)
  g['reward'], frozen['reward'], sh['reward'] = state_lib.place_state(
      ScalarModel(tiny_lm(tok).config, rngs=nnx.Rngs(2)), None, mesh)
  settings = dpo_online.online_settings(types.SimpleNamespace(online_samples=N_SAMPLES, online_temperature=1.0), tok, 6)
  pool_sh = shd.NamedSharding(mesh, shd.P(None, shd.BATCH_AXES))
  rep = shd.replicated(mesh)
  sample = jax.jit(lambda p, fz, b, k: dpo_online.sample_round(g, settings, EVERY, {'policy': p, **fz}, b, k),
                   in_shardings=(policy_sh, sh, shd.batch_sharding(mesh), rep), out_shardings=(pool_sh, pool_sh, rep))
  prompts = ['reverse: c a t\n', 'count: a b c\n', 'first: x y\n', 'what colour is the zorb?\n', 'sort: b a\n',
             'uppercase: q r\n', 'last: m n o\n', 'who is tam?\n'] * EVERY
  arrays, _ = batches.prompts(tok, [{'prompt': p} for p in prompts], 12)
  batch = shd.put_batch({k: arrays[k] for k in ('prompt', 'prompt_mask')}, mesh)
  pool, scores, metrics = sample(policy, frozen, batch, jax.random.key(7))
  return types.SimpleNamespace(mesh=mesh, g=g, policy=policy, policy_sh=policy_sh, frozen=frozen, tx=tx,
                               pool_sh=pool_sh, prompts=prompts, pool=pool, scores=scores, metrics=metrics,
                               batch=arrays, tok=tok)


def rollout_merge(graphdef, state):
  from jax_rlhf.train import rollout
  return rollout.merge(graphdef, state)


@pytest.mark.parametrize('pairs', ['best_vs_worst', 'all'])
def test_online_pairs_are_the_rm_ranking_of_fresh_samples(online_round, pairs):
  """A round on 8 devices: each prompt's n samples are ranked by the RM's scores exactly as a numpy argsort of
  an independent RM forward ranks them; the reference log-probs are the reference's; the step's loss is DPO on
  the pairs numpy picks from that ranking (best vs worst, or every C(n,2) pair), with the policy's log-probs of
  the same rows."""
  import types
  from jax_rlhf import sharding as shd
  from jax_rlhf.models import scoring
  from jax_rlhf.train import dpo_online
  r, n = online_round, N_SAMPLES
  assert r.pool['tokens'].shape == (EVERY, 8, n, 18) and r.pool['ranking'].shape == (EVERY, 8, n)
  host = {k: shd.to_host(v) for k, v in r.pool.items()}
  seq, att = host['tokens'].reshape(-1, 18), host['attention_mask'].reshape(-1, 18)
  models = {k: rollout_merge(r.g[k], r.frozen[k]) for k in ('reward', 'reference')}
  models['policy'] = rollout_merge(r.g['policy'], r.policy)
  forward = jax.jit(lambda s, a: (scoring.reward_at_last(models['reward'], s, a),
                                  scoring.sequence_logps(models['reference'], s, a, 12),
                                  scoring.sequence_logps(models['policy'], s, a, 12)))
  want_scores, want_ref, pol = (np.asarray(x).reshape(EVERY, 8, n) for x in forward(seq, att))
  np.testing.assert_allclose(shd.to_host(r.scores), want_scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(host['ranking'], np.argsort(-want_scores, axis=-1, kind='stable'))
  np.testing.assert_allclose(host['ref_logps'], want_ref, rtol=1e-5, atol=1e-4)
  assert host['valid'].all() and float(r.metrics['online/identical_fraction']) == 0.0  # T = 1: distinct samples
  assert (host['lengths'] == host['attention_mask'][..., 12:].sum(-1)).all()
  # the step on the round's second batch (j = 1) against numpy's pairs
  cfg = types.SimpleNamespace(mode=dpo_online.PAIRS[pairs], beta=0.3, loss_type='sigmoid', label_smoothing=0.0)
  step = jax.jit(lambda s, p, j: dpo_online.online_train_step(r.g['policy'], r.tx, cfg, 12, s, p, j),
                 in_shardings=(r.policy_sh, r.pool_sh, shd.replicated(r.mesh)))
  _, m = step(r.policy, r.pool, jnp.int32(1))
  scores, ref, pol = want_scores[1], want_ref[1], pol[1]
  order = np.argsort(-scores, axis=-1, kind='stable')
  rows = np.arange(8)
  if pairs == 'best_vs_worst':
    best, worst = scores.argmax(-1), scores.argmin(-1)
    want, _ = dpo_loss(pol[rows, best], pol[rows, worst], ref[rows, best], ref[rows, worst], beta=0.3)
    assert int(m['num_pairs']) == 8
  else:
    want, _ = ref_ranking_pairs(pol, ref, order, np.ones((8, n), bool), 0.3, 'sigmoid', 0.0, np.ones((8, n)))
    assert int(m['num_pairs']) == 8 * n * (n - 1) // 2
  np.testing.assert_allclose(float(m['loss']), float(want), rtol=2e-5, atol=2e-5)


def test_prompt_whose_samples_are_all_the_same_has_no_pair():
  from jax_rlhf.train import dpo_online
  rng = np.random.default_rng()
  resp = rng.integers(0, 50, (2, 3, 4, 6))  # [E, B, n, N]
  resp[0, 1] = resp[0, 1, 2]  # all four the same
  resp[1, 2, :3] = resp[1, 2, 3]  # three the same, one differs at the last slot
  resp[1, 2, 3, -1] += 1
  valid, same = (np.array(x) for x in dpo_online.pair_valid(jnp.asarray(resp)))
  assert same.tolist() == [[False, True, False], [False, False, False]]
  assert valid[0, 1].tolist() == [True, False, False, False]
  # best vs worst gathers rank 1 and rank k_b of each prompt; the prompt without a pair keeps none
  batch = {'tokens': resp[0], 'attention_mask': resp[0] % 2, 'ref_logps': rng.normal(size=(3, 4)),
           'lengths': rng.integers(1, 6, (3, 4)), 'valid': valid[0],
           'ranking': np.stack([rng.permutation(4) for _ in range(3)])}
  two = jax.tree.map(np.asarray, dpo_online.best_and_worst(jax.tree.map(jnp.asarray, batch)))
  assert two['valid'].tolist() == [[True, True], [True, False], [True, True]]
  assert (two['ranking'] == [0, 1]).all()
  for i, k in enumerate((4, 1, 4)):
    pick = [batch['ranking'][i, 0], batch['ranking'][i, k - 1]]
    for key in ('tokens', 'attention_mask', 'ref_logps', 'lengths'):
      np.testing.assert_array_equal(two[key][i], np.asarray(batch[key][i])[pick].astype(two[key].dtype), err_msg=key)
  valid[0, 1] = True
  assert valid.all()


def test_gap_filter_skips_near_ties_and_oversampling_refills(online_round):
  """dpo.online_min_gap: a prompt whose best - worst RM score gap is under it has no pair (rank 1 only);
  dpo.online_oversample: a round of 2 x 8 sampled prompts keeps 8, those with a pair first in sampling order, as
  numpy picks them from the same samples (same key) unselected."""
  from jax_rlhf import sharding as shd
  from jax_rlhf.train import dpo_online
  import types
  r, n = online_round, N_SAMPLES
  settings = dpo_online.online_settings(types.SimpleNamespace(online_samples=n, online_temperature=1.0), r.tok, 6)
  gap = (shd.to_host(r.scores).max(-1) - shd.to_host(r.scores).min(-1)).reshape(-1)  # [16] of the fixture's round
  min_gap = float(np.sort(gap)[9])  # 9 prompts under it, 7 over
  batch = shd.put_batch({k: r.batch[k] for k in ('prompt', 'prompt_mask')}, r.mesh)

  def sample(every, oversample):
    fn = jax.jit(lambda p, fz, b, k: dpo_online.sample_round(r.g, settings, every, {'policy': p, **fz}, b, k,
                                                       min_gap=min_gap, oversample=oversample),
                 out_shardings=(r.pool_sh, r.pool_sh, shd.replicated(r.mesh)))
    return fn(r.policy, r.frozen, batch, jax.random.key(7))

  pool, scores, m = sample(EVERY, 1)
  valid = shd.to_host(pool['valid']).reshape(-1, n)
  np.testing.assert_allclose(shd.to_host(scores).reshape(-1, n), shd.to_host(r.scores).reshape(-1, n), rtol=1e-6)
  assert valid[:, 0].all() and (valid[:, 1:] == (gap >= min_gap)[:, None]).all()
  assert float(m['online/near_tie_fraction']) == pytest.approx(9 / 16)
  assert float(m['online/no_pair_fraction']) == pytest.approx(9 / 16)
  np.testing.assert_allclose(float(m['online/pair_score_gap']), gap[gap >= min_gap].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m['online/score_distinct']), shd.to_host(r.scores).mean(), rtol=1e-5, atol=1e-6)
  assert float(m['online/score_identical']) == 0.0  # no prompt with identical samples at T = 1 here
  one, _, m2 = sample(1, 2)  # 16 sampled, 8 kept: the 7 with a pair, then the first without
  assert one['tokens'].shape == (1, 8, n, 18)
  keep = np.argsort(~(gap >= min_gap), kind='stable')[:8]
  for k in ('tokens', 'ref_logps', 'ranking', 'valid', 'lengths'):
    np.testing.assert_array_equal(shd.to_host(one[k])[0], shd.to_host(pool[k]).reshape(16, *pool[k].shape[2:])[keep],
                                  err_msg=k)
  assert float(m2['online/no_pair_fraction']) == pytest.approx(1 / 8)


def test_task_judge_ranks_decoded_samples_one_label_per_prompt(tok, online_round):
  """judge_with_task decodes every sample of a round (EOS and pads dropped), asks the task's labeler for one
  ranking per prompt, in row order, and lays the rankings out as the pool; labels_used counts every prompt of
  every round started so far."""
  from jax_rlhf import sampling
  from jax_rlhf import sharding as shd
  from jax_rlhf.train import dpo_online
  r, n = online_round, N_SAMPLES
  calls = []

  class LengthTask:  # longest text first; records each call (one label)
    def rank(self, prompt, responses, rng):
      calls.append((prompt, list(responses)))
      return sorted(range(len(responses)), key=lambda i: (-len(responses[i]), i))

  ranking = dpo_online.judge_with_task(LengthTask(), r.pool, r.prompts, tok, 12, r.mesh, np.random.default_rng(0))
  assert ranking.sharding.spec == shd.P(None, shd.BATCH_AXES) and ranking.shape == (EVERY, 8, n)
  assert len(calls) == EVERY * 8 == dpo_online.labels_used(1, EVERY, EVERY * 8)
  tokens = shd.to_host(r.pool['tokens'])[..., 12:].reshape(-1, n, 6)
  real = shd.to_host(r.pool['attention_mask'])[..., 12:].reshape(-1, n, 6) > 0
  got = shd.to_host(ranking).reshape(-1, n)
  assert any(len(set(texts)) > 1 for _, texts in calls)
  for i, (prompt, texts) in enumerate(calls):
    assert prompt == r.prompts[i]
    assert texts == sampling.decode_responses(tok, tokens[i], real[i] & (tokens[i] != tok.eos_token_id))
    assert got[i].tolist() == sorted(range(n), key=lambda k: (-len(texts[k]), k))
  assert [dpo_online.labels_used(s, 2, 16) for s in range(6)] == [0, 16, 16, 32, 32, 48]
  assert [dpo_online.labels_used(s, 1, 8) for s in range(1, 4)] == [8, 16, 24]


def test_bad_online_settings_are_one_clear_line(tmp_path):
  from jax_rlhf.train import common, dpo
  for bad, match in (({'online_samples': 1}, 'online_samples'), ({'online_every': 0}, 'online_every'),
                     ({'online_judge': 'gpt4'}, 'online_judge'), ({'online_pairs': 'random'}, 'online_pairs'),
                     ({'online_temperature': 0.0}, 'online_temperature'), ({'mode': 'listwise'}, 'online_pairs'),
                     ({'rpo_alpha': -0.5}, 'rpo_alpha'), ({'online_min_gap': -0.1}, 'online_min_gap'),
                     ({'online_oversample': 0}, 'online_oversample'),
                     ({'online_judge': 'task', 'online_min_gap': 0.5}, 'online_judge=rm')):
    with pytest.raises(common.UserError, match=match) as e:
      dpo.run(stage_config(online=True, **bad), str(tmp_path), 'dpo_online')
    assert '\n' not in str(e.value)
  config = stage_config(online=True, online_judge='task')
  config.task.name = ''
  with pytest.raises(common.UserError, match='task.name'):
    dpo.run(config, str(tmp_path), 'dpo_online')
  with pytest.raises(common.UserError, match='sft'):  # no policy run yet
    dpo.run(stage_config(online=True), str(tmp_path), 'dpo_online')


@pytest.mark.slow
def test_online_dpo_stage_resumes_bitwise_inside_a_round(quick_pipeline, tmp_path, monkeypatch):
  """Online DPO from the quick pipeline's SFT, judged by the task's labeler (host path), rounds of 2 steps: the
  metrics count the labels (8 prompts per step, a round's 16 at its first step); a run preempted (SIGTERM) at
  step 3, inside its second round, resumes from the checkpoint that holds the round's samples and exports bitwise
  the weights of the uninterrupted run. Then the RM judge (in the sampling jit) runs a round and exports."""
  import shutil
  from safetensors.numpy import load_file
  from jax_rlhf import metrics as metrics_lib
  from jax_rlhf.train import dpo
  src, proc = quick_pipeline
  assert proc.returncode == 0, proc.stderr[-3000:]
  w = tmp_path / 'W'
  for run in ('sft', 'rm'):
    shutil.copytree(src / run, w / run, ignore=shutil.ignore_patterns('checkpoints', 'tb'))
  shutil.copytree(src / 'data', w / 'data')
  config = stage_config(online=True, online_judge='task', online_every=2, online_pairs='all')
  config.log_every = 1
  config.checkpoint.every = 100  # only the preemption's checkpoint, inside a round
  summary = dpo.run(config, str(w), 'online')
  assert summary['labels_used'] == 32 and summary['steps'] == 4
  train = [r for r in metrics_lib.read_metrics(str(w / 'online' / 'metrics.jsonl')) if r['split'] == 'train']
  assert [r['labels_used'] for r in train] == [16, 16, 32, 32]
  assert all(r['num_pairs'] > 0 and np.isfinite(r['loss']) for r in train)
  a = load_file(str(w / 'online' / 'hf' / 'model.safetensors'))
  sft = load_file(str(w / 'sft' / 'hf' / 'model.safetensors'))
  assert max(float(np.abs(a[k] - sft[k]).max()) for k in a) > 0

  fixtures.preempt_then_resume(lambda n: dpo.run(config, str(w), n), str(w), 'online_b', 3, monkeypatch)
  fixtures.assert_same_export(w / 'online', w / 'online_b')

  config = stage_config(online=True, online_every=2)
  config.dpo.steps = 2
  summary = dpo.run(config, str(w), 'online_rm')
  assert summary['judge'] == 'rm' and summary['inputs']['reward'] == 'rm' and summary['labels_used'] == 0
  train = [r for r in metrics_lib.read_metrics(str(w / 'online_rm' / 'metrics.jsonl')) if r['split'] == 'train']
  assert train[-1]['online/score_best'] > train[-1]['online/score_worst'] and train[-1]['num_pairs'] == 8
