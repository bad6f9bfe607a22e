"""train/rollout.py on tiny random models: group-major rows, host reward functions and their failures, and the
host path against the in-graph RM."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_rlhf import sharding as shd
from jax_rlhf.data import batches
from jax_rlhf.models import scoring
from jax_rlhf.models.heads import ScalarModel
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset
from jax_rlhf.train import common, rollout
from jax_rlhf.train import state as state_lib

EOS, PAD = 0, 1
VOCAB = 16
B, P, N, G = 3, 6, 5, 4
CFG = preset('tiny', vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS)
SETTINGS = rollout.Settings(max_new_tokens=N, temperature=1.0, top_k=0, top_p=1.0, eos_id=EOS, pad_id=PAD,
                            group_size=G)


@pytest.fixture(scope='module')
def setup():
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  models = {'policy': Transformer(CFG, rngs=nnx.Rngs(0)), 'reference': Transformer(CFG, rngs=nnx.Rngs(1)),
            'reward': ScalarModel(CFG, rngs=nnx.Rngs(2))}
  graphdefs, states, shardings = {}, {}, {}
  for name, model in models.items():
    graphdefs[name], states[name], shardings[name] = state_lib.place_state(model, None, mesh)
  rng = np.random.default_rng(0)
  rows = [list(rng.integers(2, VOCAB, size=int(rng.integers(1, P + 1)))) for _ in range(B)]
  prompt, prompt_mask = batches.pad_left(rows, P, PAD)
  batch = shd.put_batch({'prompt': prompt, 'prompt_mask': prompt_mask}, mesh)
  in_graph = jax.jit(lambda st, b, k: rollout.rollout(graphdefs, st, b, k, SETTINGS))(states, batch, jax.random.key(4))
  return {'mesh': mesh, 'models': models, 'graphdefs': graphdefs, 'states': states, 'shardings': shardings,
          'rows': rows, 'batch': batch, 'in_graph': jax.tree.map(np.asarray, in_graph)}


def text(ids) -> str:
  return ' '.join(str(int(t)) for t in ids)


def decode(tokens, mask):
  """The test's tokenizer: ids -> their numbers, space-separated (the mask given excludes the EOS)."""
  return [text(t for t, m in zip(row, mrow) if m) for row, mrow in zip(tokens, mask)]


def rm_reward_fn(reward_model, prompts, responses):
  """The RM as a host reward function: re-encode the texts into the rollout's layout and score them."""
  seq = np.full((len(prompts), P + N), PAD, np.int32)
  att = np.zeros_like(seq)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    p_ids, r_ids = [int(t) for t in p.split()], [int(t) for t in r.split()]
    if len(r_ids) < N:  # shorter than N slots: the response stopped at its EOS
      r_ids.append(EOS)
    seq[i, P - len(p_ids):P], att[i, P - len(p_ids):P] = p_ids, 1
    seq[i, P:P + len(r_ids)], att[i, P:P + len(r_ids)] = r_ids, 1
  return list(np.asarray(jax.jit(scoring.reward_at_last)(reward_model, seq, att)))


def test_group_rows_are_group_major(setup):
  ro = setup['in_graph']
  assert ro['seq'].shape == (B * G, P + N) and ro['tokens'].shape == (B * G, N) and ro['scores'].shape == (B * G,)
  prompt = np.asarray(setup['batch']['prompt'])
  for i in range(B * G):
    np.testing.assert_array_equal(ro['seq'][i, :P], prompt[i // G])  # row i belongs to prompt i // G
  # the G samples of a prompt are drawn independently: not all the same
  assert any(len({tuple(ro['tokens'][b * G + j]) for j in range(G)}) > 1 for b in range(B))
  np.testing.assert_array_equal(ro['mask'], ro['att'][:, P:])
  has_eos = [(EOS in [t for t, m in zip(row, mrow) if m]) for row, mrow in zip(ro['tokens'], ro['mask'])]
  np.testing.assert_array_equal(ro['has_eos'], has_eos)
  # scores: the RM at each row's last real token; log-probs: the policy's / reference's teacher-forced ones
  models = setup['models']
  np.testing.assert_allclose(ro['scores'], np.asarray(models['reward'].score(jnp.asarray(ro['seq']),
                                                                               jnp.asarray(ro['att']))), atol=1e-6)
  for key, name in (('logp', 'policy'), ('ref_logp', 'reference')):
    want, _ = scoring.response_logprobs(models[name], ro['seq'], ro['att'], P, 1.0)
    np.testing.assert_allclose(np.where(ro['mask'] > 0, ro[key], 0), np.where(ro['mask'] > 0, want, 0), atol=1e-5)


def test_host_scores_equal_in_graph_rm_scores(setup):
  host = rollout.HostScoredRollout({k: setup['graphdefs'][k] for k in ('policy', 'reference')}, SETTINGS,
                                   functools.partial(rm_reward_fn, setup['models']['reward']), decode, setup['mesh'],
                                   {k: setup['shardings'][k] for k in ('policy', 'reference')})
  states = {k: setup['states'][k] for k in ('policy', 'reference')}
  ro = host(states, setup['batch'], [text(r) for r in setup['rows']], jax.random.key(4))
  ref = setup['in_graph']
  np.testing.assert_array_equal(np.asarray(ro['tokens']), ref['tokens'])  # the same samples
  np.testing.assert_allclose(np.asarray(ro['scores']), ref['scores'], atol=1e-6, rtol=0)
  assert ro['scores'].sharding.spec == shd.batch_sharding(setup['mesh']).spec


def broken_raises(prompts, responses):
  raise KeyError('no verifier\nfor this prompt')


def broken_short(prompts, responses):
  return [1.0] * (len(responses) - 1)


def broken_nan(prompts, responses):
  return [0.0] * (len(responses) - 1) + [float('nan')]


def broken_type(prompts, responses):
  return None


@pytest.mark.parametrize('fn,words', [(broken_raises, 'raised KeyError'), (broken_short, 'returned 3 scores for 4'),
                                      (broken_nan, 'returned nan for response 3'),
                                      (broken_type, 'must return one float per response')])
def test_a_broken_reward_function_is_one_line_naming_it(fn, words):
  with pytest.raises(common.UserError) as e:
    rollout.call_reward_fn(fn, ['p'] * 4, ['r'] * 4)
  message = str(e.value)
  assert '\n' not in message and fn.__name__ in message and words in message, message
  # a partial names the function it wraps
  with pytest.raises(common.UserError, match=fn.__name__):
    rollout.call_reward_fn(functools.partial(fn), ['p'] * 4, ['r'] * 4)


def test_a_broken_reward_function_stops_a_host_rollout(setup):
  host = rollout.HostScoredRollout({k: setup['graphdefs'][k] for k in ('policy', 'reference')}, SETTINGS,
                                   broken_nan, decode, setup['mesh'],
                                   {k: setup['shardings'][k] for k in ('policy', 'reference')})
  states = {k: setup['states'][k] for k in ('policy', 'reference')}
  with pytest.raises(common.UserError, match=r'reward function .*broken_nan returned nan'):
    host(states, setup['batch'], [text(r) for r in setup['rows']], jax.random.key(4))
