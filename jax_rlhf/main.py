"""jax_rlhf's one entry point.

  python -m jax_rlhf.main --config configs/ppo.py --workdir runs/x --config.ppo.kl.coef=0.05
  python -m jax_rlhf.main --config configs/pipeline.py:quick --workdir runs/q

`config.stage` picks what runs: pipeline (every run of `config.plan` in order, jax_rlhf/pipeline.py: each
skipped when its `W/<name>/DONE` exists; the wall time of each run made is appended to `W/wall_times.jsonl`),
or one run: a kind (pretrain | sft | label | rm | ppo | eval | dpo | grpo) or any run name of the plan
(`configs/pipeline.py:compare --config.stage=dpo_online`), that run alone. Mistakes a user can
make end in one line and exit status 2; a misspelt override names the nearest real field.

Several processes (a TPU slice's hosts, GPU hosts): every process runs the same command; with
`--coordinator=HOST:PORT --num_processes=N --process_id=I` (or `--distributed` to let JAX find the cluster
itself: TPU VMs, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) `jax.distributed.initialize` joins them first.
Only process 0 prints and writes logs and exports; every process writes its part of each checkpoint.

Exit status: 0 done (or preempted by SIGTERM after saving a checkpoint: run it again to resume), 1 stopped by
the non-finite guard, 2 a mistake of the user's.
"""
from __future__ import annotations

import os
import sys

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

def flag_fields(argv) -> set[str]:
  """The config fields the command line sets: `--config.ppo.kl.coef=0.05` (or `--config.ppo.kl.coef 0.05`) ->
  'ppo.kl.coef'."""
  return {a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')}


def run(config, workdir: str, fields=()) -> None:
  from jax_rlhf import pipeline
  from jax_rlhf.variants import apply_cpu_bf16
  apply_cpu_bf16(config)
  pipeline.execute(config, workdir, fields)


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
    run(config, _WORKDIR.value, flag_fields(sys.argv[1:]))
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
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    print(f'error: {_misspelt(argv, overrides) or f"bad config override {overrides[0] if overrides else chr(32)}: {e}"}'
          .replace('\n', ' '), file=sys.stderr)
    sys.exit(2)


def _misspelt(argv, overrides) -> str | None:
  """'ppo has no field kl_coef; did you mean ppo.kl.coef?' for the first override naming no field of the config
  file's config (None when every override names a field: the value is what is wrong)."""
  from jax_rlhf import pipeline
  config_arg = next((a.split('=', 1)[1] if '=' in a else argv[i + 2] for i, a in enumerate(argv[1:])
                     if a in ('--config', '-config') or a.startswith('--config=')), None)
  try:  # the config file's config, without the overrides
    import importlib.util
    path, _, arg = config_arg.partition(':')
    spec = importlib.util.spec_from_file_location('_config_file', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in overrides:
    path = arg[len('--config.'):].split('=', 1)[0]
    msg = pipeline.unknown_field(config, path)
    if msg:
      return msg
  return None


def entry():
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  entry()
