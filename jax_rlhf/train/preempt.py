"""Preemption: SIGTERM asks the run to save a checkpoint at the end of the current step and exit 0.

Spot/preemptible TPU VMs and most schedulers send SIGTERM, then SIGKILL after a grace period (30 s on GCE
spot VMs). One process: our handler sets a flag that `Checkpointer.step_end` reads after every step. Several
processes: JAX's distributed runtime already listens for SIGTERM, and `reached_preemption_sync_point(step)`
makes every process agree on the same step to save at (orbax's recommended pattern).

A test hook makes faults deterministic: `JAX_RLHF_FAULT=stage:step:mode[,stage:step:mode...]` fires once per
entry (a marker file in the stage folder remembers it), at the end of that step of that stage:
  kill          SIGKILL this process (before the step's checkpoint, if any, is written)
  term          SIGTERM this process (so the preemption path saves at that step and exits 0)
  kill-in-save  start a checkpoint save of that step, then SIGKILL while orbax is writing it
"""
from __future__ import annotations

import os
import signal
import time

import jax

FAULT_ENV = 'JAX_RLHF_FAULT'
_requested = False


class Preempted(Exception):
  """Raised after the preemption checkpoint is written; main exits 0."""


def _on_sigterm(signum, frame):  # pylint: disable=unused-argument
  global _requested
  _requested = True


def install() -> None:
  """SIGTERM -> save and stop at the end of the step (one process; JAX handles it with several)."""
  global _requested
  _requested = False
  if jax.process_count() == 1:
    signal.signal(signal.SIGTERM, _on_sigterm)


def requested(step: int) -> bool:
  """Whether to save and stop after `step`; every process must call it at every step."""
  if jax.process_count() == 1:
    return _requested
  from jax.experimental import multihost_utils
  try:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except RuntimeError:  # the preemption service is off
    return False


def faults(stage_dir: str, step: int) -> list[str]:
  """Modes of the test hook that fire now in `W/<stage>` (each once: a marker file is written before it fires)."""
  spec = os.environ.get(FAULT_ENV, '')
  out = []
  for item in filter(None, spec.split(',')):
    s, k, mode = item.split(':')
    if s == os.path.basename(stage_dir) and int(k) == step:
      marker = os.path.join(stage_dir, f'.fault-{k}-{mode}')
      if not os.path.exists(marker):
        open(marker, 'w').close()
        out.append(mode)
  return out


def kill_self(sig=signal.SIGKILL) -> None:
  os.kill(os.getpid(), sig)
  time.sleep(60 if sig == signal.SIGKILL else 0.01)  # SIGKILL never returns; a handler runs during the sleep
