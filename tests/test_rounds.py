"""Iterated RLHF (`configs/pipeline.py:rounds=N`): the plan it makes, and end to end on the quick config.

Round 1 of `quick,rounds=2` is the quick pipeline itself (same task files: quick's 128 training prompts hold
round 1's 48 and round 2's 24), so the slow tests copy round 1 from conftest's `quick_pipeline` and make round 2:
label_2
samples the round-1 policy on fresh prompts, rm_2 trains on both rounds' rankings, ppo_2 continues the
policy; killed in rm_2 and in ppo_2 and rerun, round 2 ends bit for bit where the uninterrupted run ends. With
`rounds_policy=grpo` and `dpo` (on the same label_2 and rm_2), round 2's policy step starts from round 1's policy
with SFT as its reference.
"""
import json
import shutil

import numpy as np
import pytest

from conftest import run_main

from jax_rlhf import variants

ROUND1 = ('pretrain', 'sft', 'label', 'rm', 'ppo')
CONFIG = 'configs/pipeline.py:quick,rounds=2'
OVERRIDES = ('--config.checkpoint.every=2',)


def plan(arg):
  from jax_rlhf.config import stage_config
  return stage_config('pipeline', arg)


def test_rounds_variant_makes_a_plan_of_rounds_that_composes_with_quick():
  from jax_rlhf import pipeline
  c = plan('quick,rounds=3')
  runs = {r.name: r for r, _ in pipeline.plan_of(c)}
  assert list(runs) == ['pretrain', 'sft', 'label', 'rm', 'ppo', 'label_2', 'rm_2', 'ppo_2', 'label_3', 'rm_3',
                        'ppo_3', 'eval']
  assert c.model.preset == 'tiny' and c.label.num_prompts == 48
  assert dict(runs['label_2'].inputs) == {'policy': 'ppo'} and dict(runs['label_3'].inputs) == {'policy': 'ppo_2'}
  assert [(runs[f'label_{r}'].overrides.label.prompt_offset, runs[f'label_{r}'].overrides.label.num_prompts)
          for r in (2, 3)] == [(48, 24), (72, 24)]  # half of round 1's 48 fresh prompts per later round
  assert c.task.n_prompts_train == 128  # quick's 128 already hold 48 + 2 x 24
  assert runs['rm_2'].overrides.rm.epochs == 1 and runs['rm_3'].overrides.rm.epochs == 1  # one pass over all so far
  assert dict(runs['rm_3'].inputs) == {'init': 'sft', 'rankings': ('label', 'label_2', 'label_3')}
  assert dict(runs['ppo_3'].inputs) == {'policy': 'ppo_2', 'reference': 'sft', 'reward': 'rm_3'}
  assert tuple(c.eval.rounds) == ('ppo:rm:label', 'ppo_2:rm_2:label_2', 'ppo_3:rm_3:label_3')
  assert tuple(c.eval.models) == ('sft',)
  last = {r.name: r for r in plan('rounds_rm=last,quick,rounds=3,round_prompts=20').plan}
  assert last['rm_2'].inputs.init == 'rm' and last['rm_3'].inputs.init == 'rm_2'
  assert [(last[f'label_{r}'].overrides.label.prompt_offset, last[f'label_{r}'].overrides.label.num_prompts)
          for r in (2, 3)] == [(48, 20), (68, 20)]
  for kind, role in (('grpo', ('reward', 'rm_2')), ('dpo', ('rankings', 'label_2')),
                     ('dpo_online', ('reward', 'rm_2'))):
    other = {r.name: r for r in plan(f'quick,rounds=2,rounds_policy={kind}').plan}
    assert dict(other[f'{kind}_2'].inputs) == {'policy': 'ppo', 'reference': 'sft', role[0]: role[1]}
    assert other[f'{kind}_2'].kind == kind.removesuffix('_online')
    # online DPO: compare's settings, its steps quick's 4 (the demo: 2 epochs x round 1's 4000 prompts // 32)
    assert other[f'{kind}_2'].overrides.to_dict() == ({'dpo': {**variants.DPO_ONLINE_DEMO, 'steps': 4}}
                                                      if kind == 'dpo_online' else {})
  assert plan('rounds=3,rounds_policy=dpo_online').plan[-2].overrides.dpo.steps == 2 * 4000 // 32
  assert [r.name for r in plan('rounds=1').plan] == [r.name for r in plan('').plan]
  assert plan('rounds=3').task.n_prompts_train == 8000  # the demo's 4000 prompts, then 2000 per later round


def test_bad_rounds_variants_and_plans_are_one_clear_line():
  from jax_rlhf import pipeline
  from jax_rlhf.variants import plan_run
  for arg, match in (('rounds=0', 'at least one'), ('rounds=x', 'unknown config variant'),
                     ('rounds_rm=last', 'go with rounds=N'), ('rounds=2,rounds_rm=first', 'unknown config variant')):
    with pytest.raises(ValueError, match=match):
      plan(arg)
  c = plan('quick')
  c.plan = (*c.plan[:4], plan_run('rm_2', 'rm', {'init': 'sft', 'rankings': ('label', 'label_9')}))
  with pytest.raises(pipeline.PlanError, match="'label_9' is no earlier run"):
    pipeline.check_plan(c.plan)
  c.plan = (*c.plan[:4], plan_run('ppo_2', 'ppo', {'policy': ('sft', 'rm')}))
  with pytest.raises(pipeline.PlanError, match='must be one run name'):
    pipeline.check_plan(c.plan)


def test_a_label_run_past_the_training_prompts_is_one_clear_line(tmp_path):
  from jax_rlhf.train import checkpoint, common, label
  c = plan('quick')
  c.label.prompt_offset = 100  # 100 + 48 > quick's 128 training prompts
  (tmp_path / 'sft').mkdir()
  checkpoint.mark_done(str(tmp_path / 'sft'), {'stage': 'sft'})
  with pytest.raises(common.UserError, match='needs 148 training prompts; there are 128'):
    label.run(c, str(tmp_path), 'label_2', {'policy': 'sft'})


# ---------------------------------------------------------------------------------------------------------
# end to end (slow): round 2 on conftest's quick pipeline
# ---------------------------------------------------------------------------------------------------------

def round1_copy(src, w):
  for r in ROUND1:
    shutil.copytree(src / r, w / r, ignore=shutil.ignore_patterns('checkpoints', 'tb'))


def explain(proc):
  return f'exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}'


@pytest.fixture(scope='module')
def round2(quick_pipeline, tmp_path_factory):
  src, proc = quick_pipeline
  assert proc.returncode == 0, explain(proc)
  w = tmp_path_factory.mktemp('rounds') / 'W'
  round1_copy(src, w)
  proc = run_main(CONFIG, w, *OVERRIDES)
  assert proc.returncode == 0, explain(proc)
  return w, proc


def read_rankings(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_round_2_labels_samples_of_round_1s_policy_on_fresh_prompts(round2):
  """label_2's prompts are the 24 training prompts after round 1's 48, its responses are the round-1 policy's
  samples (sampling that policy again with label_2's config gives them; SFT's samples differ), rm_2 trains on
  both rounds' rankings, and the eval compares round1 and round2 with the per-round measures."""
  from jax_rlhf import pipeline
  from jax_rlhf.train import common, label
  w, proc = round2
  assert '[ppo] already complete' in proc.stdout and '[label_2] done' in proc.stdout
  with open(w / 'label_2' / 'DONE') as f:
    done = json.load(f)
  assert done['policy'] == 'ppo' and done['prompt_offset'] == 48 and done['rankings'] == 24
  config = plan('quick,rounds=2')
  rc = dict((r.name, rc) for r, rc in pipeline.plan_of(config))['label_2']
  prompts = common.read(rc, common.task_files(rc, str(w))['prompts_train'], 'prompt')
  got = read_rankings(w / 'label_2' / 'rankings.jsonl')
  first = read_rankings(w / 'label' / 'rankings.jsonl')
  assert [r['prompt'] for r in got] == [p['prompt'] for p in prompts[48:72]]
  assert [r['prompt'] for r in first] == [p['prompt'] for p in prompts[:48]]
  judge = lambda ps, gs, rng: [{'ranking': list(range(len(g)))} for g in gs]  # noqa: E731
  again = label.label_rankings(rc, str(w), str(w / 'ppo'), judge)
  assert [r['responses'] for r in again] == [r['responses'] for r in got]
  from_sft = label.label_rankings(rc, str(w), str(w / 'sft'), judge)
  assert [r['responses'] for r in from_sft] != [r['responses'] for r in got]

  with open(w / 'rm_2' / 'DONE') as f:
    rm2 = json.load(f)
  assert rm2['rankings_from'] == ['label', 'label_2'] and rm2['init'] == 'sft'
  assert rm2['train_rankings'] == (48 - 4) + (24 - 2)  # each run holds out its first 10%
  with open(w / 'ppo_2' / 'DONE') as f:
    assert json.load(f)['stage'] == 'ppo'
  with open(w / 'eval' / 'results.json') as f:
    res = json.load(f)
  assert list(res['models']) == ['sft', 'round1', 'round2']
  assert res['models']['round1']['run'] == 'ppo' and res['models']['round2']['run'] == 'ppo_2'
  r1, r2 = res['rounds']
  assert (r1['sampled_from'], r2['sampled_from']) == ('sft', 'ppo')
  assert r1['labels_used']['prompts'] == 48 and r2['labels_used']['prompts'] == 72
  assert r2['labels_used']['pairs'] == r1['labels_used']['pairs'] + done['pairs']
  assert 'rm_agreement_old' not in r1 and 'rm_agreement_old' in r2
  for key in ('rm_agreement_new', 'rm_agreement_old'):  # nan where no two samples differ in gold (tiny models)
    assert (0 <= r2[key] <= 1) if r2['agreement_pairs'] else np.isnan(r2[key])
  for r, m in ((r1, 'round1'), (r2, 'round2')):
    assert r['win_rate_vs_sft'] == res['models'][m]['win_rate_vs_sft']
  # round 2 against round 1 head to head on the eval's own samples: the per-prompt gold of both, ties half
  samples = [json.loads(line) for line in (w / 'eval' / 'samples.jsonl').read_text().splitlines()]
  g2, g1 = (np.array([s[m]['gold'] for s in samples]) for m in ('round2', 'round1'))
  assert 'win_rate_vs_previous' not in r1
  assert r2['win_rate_vs_previous'] == pytest.approx(np.mean((g2 > g1) + 0.5 * (g2 == g1)), abs=1e-12)
  lo, hi = r2['win_rate_vs_previous_ci95']
  assert lo <= r2['win_rate_vs_previous'] <= hi
  report = (w / 'eval' / 'report.md').read_text()
  assert 'Rounds of iterated RLHF' in report and (w / 'eval' / 'plots' / 'rounds.png').exists()


@pytest.mark.slow
def test_round_2_killed_in_its_rm_and_its_ppo_resumes_bitwise(round2, tmp_path):
  from safetensors.numpy import load_file
  """SIGKILL at step 3 of rm_2 and of ppo_2 (checkpoints every 2 steps): rerunning the same command after
  each kill ends with the uninterrupted run's rankings, weights and per-round measures, bit for bit."""
  ref, _ = round2
  w = tmp_path / 'W'
  round1_copy(ref, w)
  spec = 'rm_2:3:kill,ppo_2:3:kill'
  kills = 0
  for _ in range(3):
    proc = run_main(CONFIG, w, *OVERRIDES, env={'JAX_RLHF_FAULT': spec})
    if proc.returncode == -9:
      kills += 1
      continue
    assert proc.returncode == 0, explain(proc)
    break
  assert kills == 2 and (w / 'rm_2' / '.fault-3-kill').exists() and (w / 'ppo_2' / '.fault-3-kill').exists()
  assert (w / 'label_2' / 'rankings.jsonl').read_bytes() == (ref / 'label_2' / 'rankings.jsonl').read_bytes()
  for run in ('rm_2', 'ppo_2'):
    a, b = load_file(str(ref / run / 'hf' / 'model.safetensors')), load_file(str(w / run / 'hf' / 'model.safetensors'))
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f'{run} {k}')
  with open(ref / 'eval' / 'results.json') as f, open(w / 'eval' / 'results.json') as g:
    assert json.dumps(json.load(f)['rounds']) == json.dumps(json.load(g)['rounds'])  # NaN != NaN


def test_gold_agreement_counts_pairs_with_different_gold_in_gold_order():
  from jax_rlhf.evaluate import gold_agreement
  gold = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
  scores = np.array([[2.0, 1.0, 3.0], [0.0, 1.0, 2.0]])
  # prompt 0: pairs (0,1) right, (0,2) wrong, (1,2) same gold; prompt 1: no pair differs in gold
  assert gold_agreement(scores, gold) == (0.5, 2)
  assert gold_agreement(np.zeros((2, 3)), gold) == (0.0, 2)  # ties are wrong, as in the RM's accuracy
  agreement, pairs = gold_agreement(scores[1:], gold[1:])
  assert pairs == 0 and np.isnan(agreement)


def loaded(model):
  import jax
  from flax import nnx
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def same_weights(model, hf_dir, config, scalar=False):
  """Whether `model` holds bitwise the weights of the HF folder `hf_dir` (an LM, or with `scalar` an RM)."""
  from jax_rlhf.models import hf
  from jax_rlhf.train import common
  load = hf.load_scalar_model if scalar else hf.load_pretrained
  want, got = loaded(load(str(hf_dir), **common.model_kw(config))), loaded(model)
  return len(got) == len(want) and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(got, want))


class Loaded(Exception):
  """Raised by a spy once the stage under test has loaded its models (nothing is trained or written)."""


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['grpo', 'dpo', 'dpo_online'])
def test_rounds_policy_grpo_and_dpo_continue_round_1s_policy_with_sft_as_reference(round2, kind, tmp_path,
                                                                                    monkeypatch):
  """`quick,rounds=2,rounds_policy=grpo|dpo|dpo_online` end to end (round 1 and round 2's label_2 and rm_2, the
  same runs in every policy's plan, copied from the PPO rounds run): the policy step of round 2 loads round 1's
  policy (ppo) as the model it trains and SFT as its frozen reference (GRPO and online DPO: rm_2 as the reward
  or judge; DPO: label_2's rankings of ppo's samples), trains it, and the eval compares it as round2."""
  from jax_rlhf import pipeline
  from jax_rlhf.models import hf
  from jax_rlhf.train import dpo, grpo
  ref, _ = round2
  w = tmp_path / 'W'
  round1_copy(ref, w)
  runs = dict((r.name, (r, rc)) for r, rc in pipeline.plan_of(plan(f'quick,rounds=2,rounds_policy={kind}')))
  ppo_runs = dict((r.name, (r, rc)) for r, rc in pipeline.plan_of(plan('quick,rounds=2')))
  for name in ('label_2', 'rm_2'):  # the run and its config, less the plan and the eval's list of rounds
    assert runs[name][0].to_dict() == ppo_runs[name][0].to_dict()
    a, b = (dict(x[name][1].to_dict(), plan=None, eval=None) for x in (runs, ppo_runs))
    assert a == b and runs['eval'][1].eval.rounds != ppo_runs['eval'][1].eval.rounds
    shutil.copytree(ref / name, w / name, ignore=shutil.ignore_patterns('checkpoints', 'tb'))
  proc = run_main(f'configs/pipeline.py:quick,rounds=2,rounds_policy={kind}', w, *OVERRIDES)
  assert proc.returncode == 0, explain(proc)
  assert '[label_2] already complete' in proc.stdout and f'[{kind}_2] done' in proc.stdout
  run, rc = runs[f'{kind}_2']
  want = {'policy': 'ppo', 'reference': 'sft', **({'rankings': 'label_2'} if kind == 'dpo' else {'reward': 'rm_2'})}
  assert dict(run.inputs) == want
  with open(w / f'{kind}_2' / 'DONE') as f:
    done = json.load(f)
  assert {k: done['inputs'][k] for k in want} == want and done.get('online', False) is (kind == 'dpo_online')
  with open(w / 'eval' / 'results.json') as f:
    res = json.load(f)
  assert list(res['models']) == ['sft', 'round1', 'round2'] and res['models']['round2']['run'] == f'{kind}_2'
  assert [r['sampled_from'] for r in res['rounds']] == ['sft', 'ppo']
  from jax_rlhf.train import common
  trained = hf.load_pretrained(str(w / f'{kind}_2' / 'hf'), **common.model_kw(rc))
  assert not same_weights(trained, w / 'ppo' / 'hf', rc)  # it trained

  # what the stage loads, spied in this process on the same workdir and plan: it stops before training
  seen = {}
  if kind == 'grpo':
    def trainer(config, mesh, policy, ref_model, reward, ids):
      seen.update(policy=policy, reference=ref_model, reward=reward)
      raise Loaded
    monkeypatch.setattr(grpo, 'GRPOTrainer', trainer)
  elif kind == 'dpo':
    real_load, real_read = dpo.load_policy_and_reference, dpo.read_rankings

    def read(config, workdir, run_name, tok, info):
      seen['rankings'] = run_name
      return real_read(config, workdir, run_name, tok, info)

    def load(*args, **kw):
      seen['policy'], seen['reference'] = real_load(*args, **kw)
      raise Loaded
    monkeypatch.setattr(dpo, 'read_rankings', read)
    monkeypatch.setattr(dpo, 'load_policy_and_reference', load)
  else:  # online: policy and reference, then the RM judge, which stops it
    real_load, real_rm = dpo.load_policy_and_reference, hf.load_scalar_model

    def load(*args, **kw):
      seen['policy'], seen['reference'] = real_load(*args, **kw)
      return seen['policy'], seen['reference']

    def judge(path, **kw):
      seen['reward'] = real_rm(path, **kw)
      raise Loaded
    monkeypatch.setattr(dpo, 'load_policy_and_reference', load)
    monkeypatch.setattr(hf, 'load_scalar_model', judge)
  with pytest.raises(Loaded):
    (grpo if kind == 'grpo' else dpo).run(rc, str(w), run.name, dict(run.inputs))
  monkeypatch.undo()  # the spies off: same_weights loads the HF folders itself
  assert not same_weights(seen['policy'], w / 'sft' / 'hf', rc)  # round 1's policy is not SFT: the check can fail
  assert same_weights(seen['policy'], w / 'ppo' / 'hf', rc)
  assert same_weights(seen['reference'], w / 'sft' / 'hf', rc)
  if kind == 'dpo':
    assert seen['rankings'] == 'label_2'
  else:
    assert same_weights(seen['reward'], w / 'rm_2' / 'hf', rc, scalar=True)

