"""Two processes on localhost (4 fake CPU devices each, jax.distributed with gloo collectives) run the quick SFT
and the quick PPO stages; their final weights equal those of the same stages in one process with 8 devices
(conftest's `quick_pipeline`), and only process 0 writes the logs and the export."""
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import QUICK, ROOT

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_processes(config, workdir, *overrides, timeout=1800):
  port = free_port()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
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


def assert_close_weights(ours, theirs, rtol, atol):
  from safetensors.numpy import load_file
  a, b = load_file(ours / 'hf' / 'model.safetensors'), load_file(theirs / 'hf' / 'model.safetensors')
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize('stage, inputs', [('sft', ('data', 'pretrain')), ('ppo', ('data', 'pretrain', 'sft', 'rm'))])
def test_two_processes_equal_one_process_with_8_devices(quick_pipeline, tmp_path, stage, inputs):
  ref, proc = quick_pipeline
  assert proc.returncode == 0, proc.stderr[-3000:]
  w = tmp_path / 'W'
  for d in inputs:
    shutil.copytree(ref / d, w / d, symlinks=True)
  outs = run_two_processes(f'configs/{stage}.py:quick', w, *QUICK[1:])
  assert all(rc == 0 for rc, _, _ in outs), explain(outs)
  # one voice: process 0's (gloo's own C++ lines reach both stdouts)
  assert f'[{stage}] done' in outs[0][1] and f'[{stage}]' not in outs[1][1], explain(outs)
  assert (w / stage / 'DONE').is_file()
  assert len((w / stage / 'metrics.jsonl').read_text().splitlines()) == \
      len((ref / stage / 'metrics.jsonl').read_text().splitlines())  # written once, not once per process
  steps = sorted(int(x) for x in os.listdir(w / stage / 'checkpoints') if x.isdigit())
  assert steps == sorted(int(x) for x in os.listdir(ref / stage / 'checkpoints') if x.isdigit())
  assert_close_weights(w / stage, ref / stage, rtol=1e-4, atol=1e-5)
