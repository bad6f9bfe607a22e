"""The host reward functions of jax_rlhf/rewards.py: spec parsing, the weight-normalised and first-speaker mixes
against hand loops on fresh random scores, task:verify on instruct_world, loading a user's function, and
HostRewards' decode -> score -> mix on a rollout's token rows."""

import math

import numpy as np
import pytest

from jax_rlhf import rewards


def test_parse_rewards_reads_weights_and_refuses_bad_specs():
  assert rewards.parse_rewards(('rm',)) == [('rm', 1.0)]
  assert rewards.parse_rewards(('task:verify', 'rm:0.5', 'my.mod:fn:2')) == [
      ('task:verify', 1.0), ('rm', 0.5), ('my.mod:fn', 2.0)]
  assert rewards.parse_rewards('my.mod:fn') == [('my.mod:fn', 1.0)]
  for bad, words in ((('rm:0',), 'weight > 0'), (('rm:-1',), 'weight > 0'), (('rm', 'rm:2'), 'twice'),
                     (('verify',), 'unknown reward'), ((), 'empty'), (('mod:',), 'unknown reward')):
    with pytest.raises(ValueError, match=words):
      rewards.parse_rewards(bad)


def test_mix_rewards_is_the_weight_normalised_mean_of_the_functions_that_spoke():
  """Against a hand loop on fresh random scores, NaN (verify's None) where a function says nothing."""
  rng = np.random.default_rng(14)
  r = 11
  rm = rng.normal(size=r)
  verify = rng.integers(0, 2, size=r).astype(float)
  verify[rng.random(r) < 0.5] = np.nan
  user = rng.normal(size=r)
  user[[2, 5]] = np.nan
  verify[[2, 5]] = np.nan
  weights = {'rm': 0.5, 'task:verify': 2.0, 'u:f': 1.5}
  got = rewards.mix_rewards({'rm': rm, 'task:verify': verify, 'u:f': user}, weights)
  for i in range(r):
    num = den = 0.0
    for name, s in (('rm', rm), ('task:verify', verify), ('u:f', user)):
      if not math.isnan(s[i]):
        num += weights[name] * s[i]
        den += weights[name]
    assert got[i] == pytest.approx(num / den, abs=1e-12)
  # verify alone: where it cannot check, the reward is 0; the RM alone passes through; weights only scale mixes
  only = rewards.mix_rewards({'task:verify': verify}, {'task:verify': 3.0})
  np.testing.assert_array_equal(only, np.nan_to_num(verify))
  np.testing.assert_allclose(rewards.mix_rewards({'rm': rm}, {'rm': 7.0}), rm, rtol=1e-12)
  both = rewards.mix_rewards({'rm': rm, 'task:verify': verify}, {'rm': 1.0, 'task:verify': 1.0})
  np.testing.assert_allclose(both, np.where(np.isnan(verify), rm, (rm + np.nan_to_num(verify)) / 2), rtol=1e-12)
  # first: the first listed function that spoke decides alone (weight times its score), against a hand loop
  got = rewards.mix_rewards({'task:verify': verify, 'u:f': user, 'rm': rm}, weights, 'first')
  for i in range(r):
    first = next(((name, s[i]) for name, s in (('task:verify', verify), ('u:f', user), ('rm', rm))
                  if not math.isnan(s[i])), None)
    assert got[i] == pytest.approx(0.0 if first is None else weights[first[0]] * first[1], abs=1e-12)
  np.testing.assert_array_equal(rewards.mix_rewards({'task:verify': verify, 'rm': rm}, {'task:verify': 1.0, 'rm': 1.0},
                                                 'first'), np.where(np.isnan(verify), rm, verify))
  with pytest.raises(ValueError, match='reward_mix'):
    rewards.mix_rewards({'rm': rm}, {'rm': 1.0}, 'max')


def _world_prompts():
  """A reverse prompt (the verifier checks it) and a known-creature question (it cannot) of instruct_world."""
  from jax_rlhf.tasks import instruct_world as iw
  task = iw.InstructWorldTask({})
  recs = task.world.prompts(400, 'train')
  helpful = next(r['prompt'] for r in recs if task.subcategory(r['prompt']) == 'reverse')
  honest = next(r['prompt'] for r in recs if task.subcategory(r['prompt']) == 'known')
  return task, helpful, honest


def test_verify_fn_is_one_zero_or_nan_where_the_task_cannot_check():
  task, helpful, honest = _world_prompts()
  right = task.world.reference_answer(helpful)
  got = rewards.verify_fn(task)([helpful, helpful, honest], [right, right + ' x', task.world.reference_answer(honest)])
  assert got[:2] == [1.0, 0.0] and math.isnan(got[2])


def test_gold_fn_is_the_labelers_own_score_everywhere():
  """task:gold speaks on every response, verifiable or not, with the labeler's exact score (the oracle)."""
  task, helpful, honest = _world_prompts()
  right, known = task.world.reference_answer(helpful), task.world.reference_answer(honest)
  prompts, texts = [helpful, helpful, honest, honest], [right, right + ' x', known, "i don't know"]
  got = rewards.gold_fn(task)(prompts, texts)
  assert got == [task.gold_score(p, t) for p, t in zip(prompts, texts)]
  assert got[0] == 1.0 and got[2] == 1.0 and 0.0 <= got[1] < 1.0 and 0.0 < got[3] < 1.0
  assert rewards.parse_rewards(('task:gold',)) == [('task:gold', 1.0)]


def test_host_functions_load_task_verify_and_a_users_function_or_say_why_in_one_line(tmp_path, monkeypatch):
  from jax_rlhf.config import stage_config
  from jax_rlhf.train import common
  (tmp_path / 'my_rewards_14.py').write_text('def length(prompts, responses):\n  return [len(r) for r in responses]\n'
                                             'not_a_function = 3\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  c = stage_config('grpo', 'quick')
  fns = rewards.host_functions(c, ['rm', 'task:verify', 'task:gold', 'my_rewards_14:length'])
  assert sorted(fns) == ['my_rewards_14:length', 'task:gold', 'task:verify']  # rm is scored in the graph
  assert fns['my_rewards_14:length'](['p', 'p'], ['ab', 'abc']) == [2, 3]
  for spec, words in (('no_such_module_14:f', 'cannot load reward function no_such_module_14:f: ModuleNotFoundError'),
                      ('my_rewards_14:missing', 'cannot load reward function my_rewards_14:missing: AttributeError'),
                      ('my_rewards_14:not_a_function', 'my_rewards_14:not_a_function is not callable')):
    with pytest.raises(common.UserError, match=words):
      rewards.host_functions(c, [spec])
  c.task.name = ''
  for name in ('task:verify', 'task:gold'):
    with pytest.raises(common.UserError, match=f'{name} needs an embedded task'):
      rewards.host_functions(c, [name])


def test_host_rewards_decode_score_and_mix_a_rollouts_rows():
  """Token rows (right-padded, EOS then pads) decode to the texts; task:verify decides where it can check, the
  RM's in-graph score elsewhere ('first'), and the mean mix weighs a user's function in; per-function metrics."""
  from jax_rlhf.config import stage_config
  from jax_rlhf.data import batches
  from jax_rlhf.train import common
  task, helpful, honest = _world_prompts()
  tok = common.load_tokenizer(stage_config('grpo', 'quick'))
  texts = [task.world.reference_answer(helpful), 'a b c', task.world.reference_answer(honest), "i don't know"]
  prompts = [helpful, helpful, honest, honest]
  ids = [x + [tok.eos_token_id] for x in batches.encode(tok, texts)]
  n = max(map(len, ids)) + 2
  tokens = np.full((4, n), tok.pad_token_id, np.int32)
  mask = np.zeros((4, n), np.float32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)], mask[i, :len(x)] = x, 1
  rm = np.random.default_rng(7).normal(size=4).astype(np.float32)
  exp = {'tokens': tokens, 'mask': mask, 'rm_score': rm}
  fns = {'task:verify': rewards.verify_fn(task), 'u:f': lambda p, r: [float(len(x)) for x in r]}

  got, m = rewards.HostRewards([('task:verify', 1.0), ('rm', 1.0)], fns, tok, tok.eos_token_id, 'first')(exp, prompts)
  np.testing.assert_allclose(got, [1.0, 0.0, rm[2], rm[3]], rtol=1e-6)
  assert m['reward/task:verify/spoke'] == 0.5 and m['reward/task:verify'] == 0.5 and m['reward/rm/spoke'] == 1.0

  got, _ = rewards.HostRewards([('rm', 2.0), ('u:f', 1.0)], fns, tok, tok.eos_token_id, 'mean')(exp, prompts)
  np.testing.assert_allclose(got, [(2.0 * r + len(t)) / 3.0 for r, t in zip(rm.astype(np.float64), texts)], rtol=1e-6)

  short = {'u:f': lambda p, r: [0.0]}
  with pytest.raises(common.UserError, match='returned 1 scores for 4 responses'):
    rewards.HostRewards([('u:f', 1.0)], short, tok, tok.eos_token_id)(exp, prompts)
