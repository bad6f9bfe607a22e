"""train/rm.py: the train step's loss against a float64 loop over prompts and pairs, the normalisation's
contract (demonstrations score mean 0; optional gain to std 1), and decoding sampled responses."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_rlhf import sampling
from jax_rlhf.config import stage_config
from jax_rlhf.data import batches, records
from jax_rlhf.models.heads import ScalarModel
from jax_rlhf.models.transformer_config import preset
from jax_rlhf.tasks import instruct_world
from jax_rlhf.train import common, rm
from jax_rlhf.train import state as state_lib


@pytest.fixture(scope='module')
def tok():
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(instruct_world.tokenizer_path())


def scalar_model(tok, seed=0):
  cfg = preset('tiny', vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.eos_token_id)
  return ScalarModel(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def per_token(model, tokens, mask):
  return model(tokens, mask)  # [B, T]


def last_real_scores(model, tokens, mask):
  """The head's output at each row's last real token, picked by a Python loop: float64 [B]."""
  out = np.asarray(per_token(model, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)
  return np.array([out[i, max(t for t in range(tokens.shape[1]) if mask[i, t])] for i in range(len(tokens))])


def ranking_records():
  rng = np.random.default_rng(0)
  recs = []
  for i, k in enumerate([2, 4, 3, 4]):
    items = ['c a t', 't a c', 'a c t', 'i cannot help with that.', "i don't know", '3']
    responses = [items[j] for j in rng.choice(len(items), k, replace=False)]
    recs.append({'prompt': ['reverse: c a t\n', 'count: a b c\n', 'first: x y\n', 'what colour is the zorb?\n'][i],
                 'responses': responses, 'ranking': [int(j) for j in rng.permutation(k)]})
  return recs


@pytest.mark.parametrize('compacted', [False, True])
def test_rm_train_step_loss_is_the_mean_over_prompts_of_the_mean_over_pairs(tok, compacted):
  """loss = mean_b 1/C(k_b,2) sum_{i<j} [-log sigmoid(r_(i) - r_(j) - margin) + c (r_(i) + r_(j))^2],
  with r from the model's per-response scores, recomputed with itertools.combinations in float64; the same
  when the batch is compacted to its real responses (batches.compact)."""
  recs = ranking_records()
  arr, _ = batches.rankings(tok, recs, 12, 6, 4)
  config = stage_config('rm', 'quick')
  config.rm.update(margin=0.3, centering_coef=0.01)
  config.rm.optimizer.warmup_steps = 0  # so that the one step moves the weights
  model = scalar_model(tok)
  tx = state_lib.make_optimizer(config.rm.optimizer, 10)
  graphdef, params, rest = state_lib.split_model(model)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params))
  step = jax.jit(lambda s, b: rm.rm_train_step(graphdef, tx, config.rm, s, b))
  fed = arr
  if compacted:
    fed = batches.compact(arr, 14)  # 13 real responses + 1 empty row
    assert fed['row_tokens'].shape == (14, 18) and (fed['row_index'] >= 16).sum() == 4 - 3
  new_state, m = step(state, jax.tree.map(jnp.asarray, fed))

  b, k, length = arr['tokens'].shape
  flat_mask = arr['attention_mask'].reshape(b * k, length)
  scores = np.zeros(b * k)
  real = flat_mask.any(1)
  scores[real] = last_real_scores(model, arr['tokens'].reshape(b * k, length)[real], flat_mask[real])
  scores = scores.reshape(b, k)
  losses, accs = [], []
  for i, rec in enumerate(recs):
    r = [scores[i, j] for j in rec['ranking']]  # best first
    pair_losses, wins = [], []
    for hi, lo in itertools.combinations(range(len(r)), 2):
      d = r[hi] - r[lo]
      pair_losses.append(math.log1p(math.exp(-(d - 0.3))) + 0.01 * (r[hi] + r[lo]) ** 2)
      wins.append(float(d > 0))
    losses.append(sum(pair_losses) / len(pair_losses))
    accs.append(sum(wins) / len(wins))
  np.testing.assert_allclose(float(m['loss']), np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(float(m['accuracy']), np.mean(accs), atol=1e-6)
  assert int(new_state.step) == 1
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params))]
  assert max(moved) > 0


def test_compact_keeps_every_real_response_and_falls_back_when_over_budget():
  valid = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], bool)
  tokens = np.arange(9 * 2, dtype=np.int32).reshape(3, 3, 2) + 1
  batch = {'tokens': tokens, 'attention_mask': np.ones_like(tokens), 'ranking': np.zeros((3, 3), np.int32),
           'valid': valid}
  out = batches.compact(batch, 8, offset=9)
  np.testing.assert_array_equal(out['row_index'][:6], np.array([0, 1, 3, 4, 5, 6]) + 9)
  np.testing.assert_array_equal(out['row_tokens'][:6], tokens.reshape(9, 2)[[0, 1, 3, 4, 5, 6]])
  assert not out['row_mask'][6:].any() and (out['row_index'][6:] > 9 + 9).all()
  assert batches.compact(batch, 5) is None
  # budget: mean + 4 std of a batch's real responses, rounded up to the devices
  assert batches.compact_rows(valid, 3, 4) == 12 and batches.compact_rows(np.ones((5, 3), bool), 2, 4) == 8


def test_compacted_rm_step_on_8_devices_equals_the_padded_step_on_one(tok):
  from jax_rlhf import sharding as shd
  recs = ranking_records() * 2
  arr, _ = batches.rankings(tok, recs, 12, 6, 4)
  config = stage_config('rm', 'quick')
  model = scalar_model(tok)
  tx = state_lib.make_optimizer(config.rm.optimizer, 10)
  graphdef, params, rest = state_lib.split_model(model)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params))
  one, m1 = jax.jit(lambda s, b: rm.rm_train_step(graphdef, tx, config.rm, s, b))(state, jax.tree.map(jnp.asarray, arr))
  mesh = shd.make_mesh({'data': 8, 'fsdp': 1, 'model': 1})
  graphdef, placed, shardings = state_lib.place_state(scalar_model(tok), tx, mesh)
  step = jax.jit(lambda s, b: rm.rm_train_step(graphdef, tx, config.rm, s, b),
                 in_shardings=(shardings, shd.batch_sharding(mesh)))
  eight, m8 = step(placed, shd.put_batch(batches.compact(arr, 32), mesh))
  np.testing.assert_allclose(float(m8['loss']), float(m1['loss']), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize('gain', [False, True])
def test_normalise_gives_demonstrations_mean_score_zero(tok, tmp_path, gain):
  config = stage_config('rm', 'quick')
  config.rm.normalize_gain = gain
  model = scalar_model(tok, seed=3)
  model.head.bias[...] = jnp.asarray(0.7)  # an offset the normalisation has to remove
  d = config.data
  files = common.task_files(config, str(tmp_path))
  recs = ranking_records() * 3
  train_arrays, _ = batches.rankings(tok, recs, d.max_prompt_len, d.max_response_len, 4)
  out = rm.normalise(model, config, str(tmp_path), tok, train_arrays)

  demos, _ = records.read_jsonl(files['sft_train'], 'demonstration')
  arr, _ = batches.demonstrations(tok, demos[:512], d.max_prompt_len, d.max_response_len)
  s = last_real_scores(model, arr['tokens'], arr['attention_mask'])
  assert abs(s.mean()) < 1e-4, s.mean()
  assert out['norm_bias'] == pytest.approx(float(model.head.norm_bias[...]))
  if gain:
    valid = train_arrays['valid']
    ranked = last_real_scores(model, train_arrays['tokens'][valid], train_arrays['attention_mask'][valid])
    np.testing.assert_allclose(ranked.std(), 1.0, rtol=1e-4)
  else:
    assert out['norm_gain'] == 1.0


def test_decode_responses_drops_eos_and_pad(tok):
  eos, pad = tok.eos_token_id, tok.pad_token_id
  texts = ['t a c', "i don't know", '7']
  rows = [tok(t, add_special_tokens=False)['input_ids'] for t in texts]
  n = max(map(len, rows)) + 3
  tokens = np.full((3, n), pad, np.int32)
  mask = np.zeros((3, n), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = 1
    if i < 2:  # rows 0 and 1 end with EOS (a real, masked-in token); row 2 was cut without one
      tokens[i, len(r)] = eos
      mask[i, len(r)] = 1
  tokens[0, -1] = rows[1][0]  # junk after the end, outside the mask
  assert sampling.decode_responses(tok, tokens, mask) == texts
