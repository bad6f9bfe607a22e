"""Test setup: 8 fake CPU devices (set before jax is imported), CPU only, no network."""
import os

_flag = '--xla_force_host_platform_device_count=8'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Fast XLA:CPU compiles: three quarters of the suite's time is XLA compiling tiny programs. LLVM at -O0 skips its
# optimisation passes, and the classic loop emitters (instead of the MLIR fusion emitters) give it far less to
# compile: the same programs, results equal up to float rounding, the tests' steps too small for slower code to
# matter. On the CPU only (bench/gpu_check.sh runs tests on a GPU); JAX_RLHF_TEST_FAST_COMPILE=0 compiles as
# users do.
if (os.environ.get('JAX_RLHF_TEST_FAST_COMPILE', '1') != '0' and os.environ['JAX_PLATFORMS'] == 'cpu'
    and 'xla_backend_optimization_level' not in os.environ['XLA_FLAGS']):
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
# One persistent compilation cache per test session (an empty folder each time, so a run's time is honest): the
# many `python -m jax_rlhf.main` processes of the end-to-end tests, and the stage tests that run a stage several
# times in this process (preempted, resumed), compile each program once instead of once per process or run.
if os.environ.get('JAX_RLHF_TEST_COMPILE_CACHE', '1') != '0' and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  _cache = tempfile.mkdtemp(prefix='jax_rlhf_test_xla_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The quick pipeline that several end-to-end tests read (never write): checkpoints every 2 steps, so that
# every stage can be resumed from its middle.
QUICK = ('configs/pipeline.py:quick', '--config.checkpoint.every=2')


def xla_flags(devices=None):
  """This session's XLA_FLAGS for a child process with `devices` fake CPU devices (None: XLA's one)."""
  flags = [f for f in os.environ['XLA_FLAGS'].split() if not f.startswith('--xla_force_host_platform_device_count')]
  return ' '.join(flags + ([f'--xla_force_host_platform_device_count={devices}'] if devices else []))


def run_main(config, workdir, *overrides, timeout=1800, env=None):
  cmd = [sys.executable, '-m', 'jax_rlhf.main', '--config', config, '--workdir', str(workdir), *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope='session')
def quick_pipeline(tmp_path_factory):
  """(workdir, CompletedProcess) of one uninterrupted quick pipeline run, shared by the test modules."""
  workdir = tmp_path_factory.mktemp('pipeline') / 'W'
  return workdir, run_main(QUICK[0], workdir, *QUICK[1:])
