"""Two processes on localhost (4 fake CPU devices each, jax.distributed with gloo collectives) run the whole quick
pipeline, every stage: the same rankings, weights close to, and a results.json within rtol 1e-4 of one process
with 8 devices (conftest's `quick_pipeline`); only process 0 writes the logs, the files and the exports."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import QUICK, ROOT, xla_flags

from jax_rlhf.config import stage_config

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_processes(config, workdir, *overrides, timeout=1800):
  port = free_port()
  env = {**os.environ, 'XLA_FLAGS': xla_flags(4), 'JAX_PLATFORMS': 'cpu'}
  procs = [subprocess.Popen([sys.executable, '-m', 'jax_rlhf.main', '--config', config, '--workdir', str(workdir),
                             f'--coordinator=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}', *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out, err))
  return outs


def explain(outs):
  return '\n'.join(f'--- process {i}: exit {rc}\n{out[-2000:]}\n{err[-3000:]}' for i, (rc, out, err) in enumerate(outs))


def key_bias(name: str, n: int) -> slice | None:
  """The key projection's part of a bias (GPT-2's fused c_attn: the middle third; a separate k_proj: all of it).
  Its exact gradient is 0: q . (k + b) adds the same q . b to a query's score for every key, which the softmax
  cancels, so what it gets is rounding, which Adam turns into steps of up to lr, in either direction."""
  if name.endswith('attn.c_attn.bias'):
    return slice(n // 3, 2 * n // 3)
  return slice(0, n) if name.endswith('k_proj.bias') else None


def assert_close_weights(ours, theirs, rtol, atol, free=(), free_atol=0.0):
  """Weights within rtol/atol; those named in `free`, and the key biases (`key_bias`), only within free_atol."""
  from safetensors.numpy import load_file
  a, b = load_file(ours / 'hf' / 'model.safetensors'), load_file(theirs / 'hf' / 'model.safetensors')
  assert a.keys() == b.keys()
  for k in a:
    if k in free:
      np.testing.assert_allclose(a[k], b[k], rtol=0, atol=free_atol, err_msg=k)
      continue
    x, y = a[k].copy(), b[k].copy()
    kb = key_bias(k, x.shape[-1])
    if kb is not None:
      np.testing.assert_allclose(x[..., kb], y[..., kb], rtol=0, atol=free_atol, err_msg=k)
      x[..., kb] = y[..., kb] = 0
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=k)


def assert_close_json(ours, theirs, rtol, path='results'):
  """Equal structure and strings; numbers within rtol (and 1e-6 absolute, for figures that are 0)."""
  if isinstance(theirs, dict):
    assert isinstance(ours, dict) and ours.keys() == theirs.keys(), (path, ours, theirs)
    for k in theirs:
      assert_close_json(ours[k], theirs[k], rtol, f'{path}.{k}')
  elif isinstance(theirs, list):
    assert isinstance(ours, list) and len(ours) == len(theirs), path
    for i, (a, b) in enumerate(zip(ours, theirs)):
      assert_close_json(a, b, rtol, f'{path}[{i}]')
  elif isinstance(theirs, (int, float)) and not isinstance(theirs, bool):
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=1e-6, err_msg=path)
  else:
    assert ours == theirs, path


def ref_done_steps(ref, stage):
  """Optimizer steps the run took (PPO: iterations x epochs x minibatches)."""
  done = json.loads((ref / stage / 'DONE').read_text())
  if stage == 'ppo':
    c = stage_config('pipeline', 'quick').ppo
    return done['iterations'] * c.ppo_epochs * c.num_minibatches
  return done.get('steps', 0)


def quick_lr(stage):
  """The quick config's peak learning rate of a stage (Adam's steps are at most about lr each)."""
  c = stage_config('pipeline', 'quick')
  return {'pretrain': c.pretrain, 'sft': c.sft, 'rm': c.rm}[stage].optimizer.lr if stage != 'ppo' else \
      c.ppo.policy_optimizer.lr


def test_two_processes_make_the_whole_quick_pipeline_as_one_process_with_8_devices(quick_pipeline, tmp_path):
  ref, proc = quick_pipeline
  assert proc.returncode == 0, proc.stderr[-3000:]
  w = tmp_path / 'W'
  outs = run_two_processes(QUICK[0], w, *QUICK[1:])
  assert all(rc == 0 for rc, _, _ in outs), explain(outs)
  runs = ('pretrain', 'sft', 'label', 'rm', 'ppo')
  for stage in (*runs, 'eval'):
    # one voice: process 0's (gloo's own C++ lines reach both stdouts)
    assert f'[{stage}] ' in outs[0][1] and f'[{stage}]' not in outs[1][1], explain(outs)
    assert (w / stage / 'DONE').is_file()
  assert (w / 'label' / 'rankings.jsonl').read_text() == (ref / 'label' / 'rankings.jsonl').read_text()
  for stage in ('pretrain', 'sft', 'rm', 'ppo'):
    assert len((w / stage / 'metrics.jsonl').read_text().splitlines()) == \
        len((ref / stage / 'metrics.jsonl').read_text().splitlines())  # written once, not once per process
    steps = sorted(int(x) for x in os.listdir(w / stage / 'checkpoints') if x.isdigit())
    assert steps == sorted(int(x) for x in os.listdir(ref / stage / 'checkpoints') if x.isdigit())
    # The ranking loss is blind to a constant added to every score, so the gradient of the RM's last norm bias
    # (which adds w . bias to every score) is 0 up to rounding, and Adam turns that rounding into steps of up to
    # lr in either direction; the normalisation's bias absorbs the constant, so the scores (results.json) agree.
    free = ('transformer.ln_f.bias', 'model.norm.bias') if stage == 'rm' else ()
    lr_steps = ref_done_steps(ref, stage) * quick_lr(stage)
    assert_close_weights(w / stage, ref / stage, rtol=1e-4, atol=1e-5, free=free, free_atol=lr_steps)
  assert [json.loads(line)['stage'] for line in (w / 'wall_times.jsonl').read_text().splitlines()] == \
      [*runs, 'eval']  # one line per run: process 0's
  assert_close_json(json.loads((w / 'eval' / 'results.json').read_text()),
                    json.loads((ref / 'eval' / 'results.json').read_text()), rtol=1e-4)
  samples = [[json.loads(line) for line in (d / 'eval' / 'samples.jsonl').read_text().splitlines()] for d in (w, ref)]
  assert_close_json(*samples, rtol=1e-4, path='samples')
  assert (w / 'eval' / 'report.md').is_file()
