"""Test setup: 8 fake CPU devices (set before jax is imported), CPU only, no network."""
import os

_flag = '--xla_force_host_platform_device_count=8'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')


import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The quick pipeline that several end-to-end tests read (never write): checkpoints every 2 steps, so that
# every stage can be resumed from its middle.
QUICK = ('configs/pipeline.py:quick', '--config.checkpoint.every=2')


def run_main(config, workdir, *overrides, timeout=1800, env=None):
  cmd = [sys.executable, '-m', 'jax_rlhf.main', '--config', config, '--workdir', str(workdir), *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope='session')
def quick_pipeline(tmp_path_factory):
  """(workdir, CompletedProcess) of one uninterrupted quick pipeline run, shared by the test modules."""
  workdir = tmp_path_factory.mktemp('pipeline') / 'W'
  return workdir, run_main(QUICK[0], workdir, *QUICK[1:])
