"""jax_rlhf's one entry point.

  python -m jax_rlhf.main --config configs/ppo.py --workdir runs/x --config.ppo.kl.coef=0.05
  python -m jax_rlhf.main --config configs/pipeline.py:quick --workdir runs/q

`config.stage` picks what runs: pretrain | sft | rm | ppo | eval | pipeline (all of them in order, with the
extra PPO runs of `config.ppo_runs` after ppo, each skipped when its `W/<stage>/DONE` exists; the wall time of
each stage that ran is appended to `W/wall_times.jsonl`). Mistakes a user can make end in one line and exit
status 2.

Several processes (a TPU slice's hosts, GPU hosts): every process runs the same command; with
`--coordinator=HOST:PORT --num_processes=N --process_id=I` (or `--distributed` to let JAX find the cluster
itself: TPU VMs, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) `jax.distributed.initialize` joins them first.
Only process 0 prints and writes logs and exports; every process writes its part of each checkpoint.

Exit status: 0 done (or preempted by SIGTERM after saving a checkpoint: run it again to resume), 1 stopped by
the non-finite guard, 2 a mistake of the user's.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/ppo.py[:variants].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for everything the run writes (stages chain through it).')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'Multi-process: HOST:PORT of process 0 (jax.distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: how many processes in all.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this process (0 .. num_processes-1).')
_DISTRIBUTED = flags.DEFINE_boolean('distributed', False, 'Call jax.distributed.initialize() with no arguments '
                                    '(TPU VM slices, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS set).')

def run_stage(config, workdir: str, stage: str):
  """Runs one stage (a name of `config.ppo_runs` is a PPO run); None when it was already complete."""
  from jax_rlhf.train import checkpoint, common
  if stage != 'eval' and checkpoint.is_done(common.stage_dir(workdir, stage)):
    print(f'[{stage}] already complete in {common.stage_dir(workdir, stage)}; skipping')
    return None
  if stage in config.ppo_runs:
    from jax_rlhf.config import ppo_run_config
    from jax_rlhf.train import ppo
    try:
      run_config = ppo_run_config(config, stage)
    except ValueError as e:
      raise common.UserError(str(e)) from None
    return ppo.run(run_config, workdir, name=stage)
  if stage in ('pretrain', 'sft'):
    from jax_rlhf.train import sft
    return sft.run(config, workdir, stage)
  if stage == 'rm':
    from jax_rlhf.train import rm
    return rm.run(config, workdir)
  if stage == 'ppo':
    from jax_rlhf.train import ppo
    return ppo.run(config, workdir)
  if stage == 'eval':
    from jax_rlhf import evaluate
    return evaluate.run(config, workdir)
  raise ValueError(f'unknown stage {stage!r}')


def run(config, workdir: str) -> None:
  import jax
  from jax_rlhf.config import STAGES, apply_cpu_bf16, pipeline_stages
  from jax_rlhf.train.common import UserError
  if config.stage not in STAGES:
    raise SystemExit(f'error: config.stage={config.stage!r}; choose one of {", ".join(STAGES)}')
  apply_cpu_bf16(config)
  try:
    stages = pipeline_stages(config) if config.stage == 'pipeline' else (config.stage,)
  except ValueError as e:
    raise UserError(str(e)) from None
  if config.stage == 'pipeline' and config.sft.init != 'pretrain':  # SFT starts from model.path (or scratch)
    stages = tuple(s for s in stages if s != 'pretrain')
  for stage in stages:
    t = time.perf_counter()
    done = run_stage(config, workdir, stage)
    dt = time.perf_counter() - t
    print(f'[{stage}] {dt:.1f} s', flush=True)
    if done is not None and jax.process_index() == 0:
      with open(os.path.join(workdir, 'wall_times.jsonl'), 'a') as f:
        f.write(json.dumps({'stage': stage, 'wall_s': round(dt, 1), 'time': round(time.time(), 1)}) + '\n')


def init_distributed() -> None:
  """jax.distributed.initialize when the flags (or --distributed) say there are several processes."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not any(v is not None for v in explicit) and not _DISTRIBUTED.value:
    return
  from jax_rlhf.train.common import UserError
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise UserError('--coordinator, --num_processes and --process_id go together (or use --distributed)')
  import jax
  # CPU processes talk through gloo (harmless on GPU/TPU, whose collectives are their own)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if _COORDINATOR.value is not None:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  else:
    jax.distributed.initialize()
  if jax.process_index() != 0:  # one voice: process 0 prints; errors still reach stderr
    sys.stdout = open(os.devnull, 'w')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    config = _CONFIG.value
    if config is not None:
      config.stage  # a config file that failed to load raises here  # pylint: disable=pointless-statement
  except OSError as e:  # the config file does not exist or does not load
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f'error: --config: {lines[-1] if lines else e}', file=sys.stderr)
    sys.exit(2)
  if config is None:
    raise app.UsageError('--config is required, e.g. --config configs/pipeline.py')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required: the folder the run writes to')
  logging.set_verbosity(logging.WARNING)  # orbax/jax INFO lines drown the progress bars
  from jax_rlhf.train.checkpoint import Diverged
  from jax_rlhf.train.common import UserError
  from jax_rlhf.train import preempt
  try:
    init_distributed()
    preempt.install()
    run(config, _WORKDIR.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except Diverged as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except preempt.Preempted:
    sys.stdout.flush()
    sys.exit(0)


def _parse_flags(argv):
  """absl flag parsing, with a misspelt `--config.x=y` override (or a bad value) as one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # the last line says what is wrong (ml_collections puts a traceback before it)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f'error: {lines[0]} {lines[-1]}' if len(lines) > 1 else f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    arg = next((a for a in argv[1:] if a.startswith('--config.')), '')
    print(f'error: bad config override {arg}: {e}'.replace('\n', ' '), file=sys.stderr)
    sys.exit(2)


def entry():
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  entry()
