"""Surviving faults: non-finite updates are skipped and counted (and stop a run that keeps producing them,
keeping its last good checkpoint), PPO skips minibatches whose ratio ran away, and a quick pipeline killed at
random steps of every stage (SIGKILL, SIGKILL during a checkpoint save, SIGTERM) and restarted ends bitwise
where the uninterrupted run (conftest's `quick_pipeline`) does.
"""
import json
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import QUICK, run_main
from test_ppo import EOS, PAD, host, make_config, make_models, make_prompts

from jax_rlhf import sharding as shd
from jax_rlhf.train import ppo
from jax_rlhf.train import state as state_lib

STAGES = ('pretrain', 'sft', 'rm', 'ppo')
WALL_CLOCK = {'time', 'tokens/s', 'episodes/s', 'label_seconds'}


def explain(proc):
  return f'exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}'


# ---------------------------------------------------------------------------------------------------- guards

@pytest.fixture(scope='module')
def trainer_and_experience():
  config = make_config()
  config.ppo.num_minibatches = 1  # every update sees the whole batch, so a NaN anywhere reaches each one
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  trainer = ppo.PPOTrainer(config, mesh, make_models(), (EOS, PAD))
  exp, _ = trainer.experience(trainer.states, shd.put_batch(make_prompts(), mesh), jax.random.key(1),
                              jnp.float32(0.1))
  return config, mesh, trainer, host(exp)


def test_nan_in_a_batch_skips_the_update_and_counts_it(trainer_and_experience):
  config, _, trainer, exp = trainer_and_experience
  st = trainer.states
  policy_before, value_before = host(st['policy'].params), host(st['value'].params)
  bad = dict(exp)
  bad['advantages'] = exp['advantages'].copy()
  bad['advantages'][0, 0] = np.nan  # one poisoned token: every policy gradient is NaN
  trained, m = trainer.update(trainer.trained(), bad, None, jax.random.key(0))
  policy, value = trained['policy'], trained['value']
  epochs = config.ppo.ppo_epochs
  assert float(m['nonfinite_skipped']) == epochs  # one skip per update (the value's are finite)
  in_row, total = (int(x) for x in state_lib.nonfinite_counts(policy))
  assert (in_row, total) == (epochs, epochs)
  jax.tree.map(np.testing.assert_array_equal, host(policy.params), policy_before)  # untouched, bitwise
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), host(value.params), value_before))
  assert any(changed)  # the value model's gradients were finite: its update went through
  # a clean batch: applied again; the run of skips ends, the total stays
  trained, m = trainer.update({'policy': policy, 'value': value}, exp, None, jax.random.key(0))
  policy, value = trained['policy'], trained['value']
  assert (int(state_lib.nonfinite_counts(policy)[0]), float(m['nonfinite_skipped'])) == (0, epochs)
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), host(policy.params),
                                          policy_before)))
  trainer.states['policy'], trainer.states['value'] = policy, value


def test_ratio_threshold_skips_the_minibatch_as_trl_does(trainer_and_experience):
  """ratio_mean is exactly 1 on the first minibatch: a threshold below 1 skips it, and so (nothing having
  changed) every later one; the default threshold (10) skips none."""
  config, mesh, trainer, exp = trainer_and_experience
  low = make_config()
  low.ppo.num_minibatches = 1
  low.ppo.ratio_threshold = 0.5
  strict = ppo.PPOTrainer(low, mesh, make_models(), (EOS, PAD))
  st = strict.states
  before = host((st['policy'].params, st['value'].params))
  trained, m = strict.update(strict.trained(), exp, None, jax.random.key(0))
  policy, value = trained['policy'], trained['value']
  assert float(m['ratio_skipped']) == low.ppo.ppo_epochs
  jax.tree.map(np.testing.assert_array_equal, host((policy.params, value.params)), before)
  trained, m = trainer.update(trainer.trained(), exp, None, jax.random.key(0))
  policy, value = trained['policy'], trained['value']
  assert float(m['ratio_skipped']) == 0.0
  trainer.states['policy'], trainer.states['value'] = policy, value


@pytest.mark.slow
def test_nonfinite_updates_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(quick_pipeline, tmp_path):
  """lr = 1e30: step 1 is finite but leaves weights that overflow, so every later step is NaN. With a limit of 3
  in a row the run stops at step 4 with one line, exit 1, and only step 1's checkpoint on disk."""
  ref, proc = quick_pipeline
  assert proc.returncode == 0, explain(proc)
  w = tmp_path / 'W'
  for d in ('data', 'pretrain'):
    shutil.copytree(ref / d, w / d, symlinks=True)
  proc = run_main('configs/sft.py:quick', w, '--config.sft.optimizer.lr=1e30', '--config.sft.optimizer.warmup_steps=0',
                  '--config.guards.max_nonfinite_in_row=3', '--config.checkpoint.every=1', '--config.log_every=1')
  assert proc.returncode == 1, explain(proc)
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'non-finite' in lines[0] and 'last good checkpoint is step 1' in lines[0], explain(proc)
  assert 'Traceback' not in proc.stderr
  assert sorted(os.listdir(w / 'sft' / 'checkpoints')) == ['1']
  assert not (w / 'sft' / 'DONE').exists()
  train = [r for r in read_metrics(w / 'sft' / 'metrics.jsonl') if r['split'] == 'train']
  assert [r['nonfinite_skipped'] for r in train] == [0, 1, 2, 3]
  assert np.isfinite(train[0]['loss']) and not any(np.isfinite(r['loss']) for r in train[1:])


# ---------------------------------------------------------------------------------------------------- faults

def read_metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def last_records(path):
  """{(split, step): the last record logged for it, wall-clock figures left out} (a resumed run logs the steps
  after its checkpoint a second time)."""
  out = {}
  for r in read_metrics(path):
    out[r['split'], r['step']] = {k: v for k, v in r.items() if k not in WALL_CLOCK}
  return out


def assert_same_run(ours, theirs):
  from safetensors.numpy import load_file
  for stage in STAGES:
    a, b = load_file(ours / stage / 'hf' / 'model.safetensors'), load_file(theirs / stage / 'hf' / 'model.safetensors')
    assert a.keys() == b.keys()
    for k in a:
      assert np.array_equal(a[k], b[k]), (stage, k, np.abs(a[k] - b[k]).max())
    assert last_records(ours / stage / 'metrics.jsonl') == last_records(theirs / stage / 'metrics.jsonl'), stage
    assert json.loads((ours / stage / 'DONE').read_text()) == json.loads((theirs / stage / 'DONE').read_text())
  assert json.loads((ours / 'eval' / 'results.json').read_text()) == \
      json.loads((theirs / 'eval' / 'results.json').read_text())


def steps_of(ref, stage):
  return max(r['step'] for r in read_metrics(ref / stage / 'metrics.jsonl'))


@pytest.mark.slow
def test_killed_at_random_steps_of_every_stage_resumes_bitwise(quick_pipeline, tmp_path):
  """SIGKILL at a random step of each stage, SIGKILL while sft writes a checkpoint, SIGTERM at a random step of
  rm and of ppo: rerunning the same command after each fault ends with the uninterrupted run's weights,
  metrics, summaries and eval results, bit for bit."""
  ref, proc = quick_pipeline
  assert proc.returncode == 0, explain(proc)
  seed = random.randrange(10**6)
  rng = random.Random(seed)
  n = {s: steps_of(ref, s) for s in STAGES}
  save_kill = 4  # sft writes checkpoints at even steps
  faults = [(s, rng.randint(1, n[s]), 'kill') for s in STAGES]
  if faults[1][1] == save_kill:
    faults[1] = ('sft', save_kill + 1, 'kill')
  kill_at = dict((s, k) for s, k, _ in faults)
  for s in ('rm', 'ppo'):  # a SIGTERM at another step than the SIGKILL of the same stage
    faults.append((s, rng.choice([k for k in range(1, n[s] + 1) if k != kill_at[s]]), 'term'))
  faults.append(('sft', save_kill, 'kill-in-save'))
  spec = ','.join(f'{s}:{k}:{m}' for s, k, m in faults)
  why = f'faults {spec} (seed {seed})'
  w = tmp_path / 'W'
  fired = []
  for _ in range(len(faults) + 1):
    proc = run_main(QUICK[0], w, *QUICK[1:], env={'JAX_RLHF_FAULT': spec})
    if proc.returncode == -9:  # SIGKILL: which marker appeared?
      fired.append('kill')
      sft_ckpts = w / 'sft' / 'checkpoints'
      if (w / 'sft' / f'.fault-{save_kill}-kill-in-save').exists() and 'kill-in-save' not in fired[:-1]:
        fired[-1] = 'kill-in-save'
        # orbax's temporary folder of step 4 is there, the step itself is not: the kill came mid-write
        names = os.listdir(sft_ckpts)
        assert str(save_kill) not in names and any(x.startswith(f'{save_kill}.') for x in names), (names, why)
      continue
    assert proc.returncode == 0, explain(proc) + why
    if 'preempted (SIGTERM)' in proc.stdout:
      line = next(x for x in proc.stdout.splitlines() if 'preempted (SIGTERM)' in x)
      stage, step = next((s, k) for s, k, m in faults if m == 'term' and line.startswith(f'[{s}]'))
      assert f'saved step {step} ' in line, (line, why)
      steps = sorted(int(x) for x in os.listdir(w / stage / 'checkpoints') if x.isdigit())
      assert steps[-1] == step, (steps, why)
      fired.append('term')
      continue
    break
  assert sorted(fired) == sorted(m for _, _, m in faults), (fired, why)
  for s, k, m in faults:
    assert (w / s / f'.fault-{k}-{m}').exists(), (s, k, m, why)
  assert_same_run(w, ref)
