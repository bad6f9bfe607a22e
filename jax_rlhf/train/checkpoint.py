"""Checkpoints with orbax: save every N steps and at the end, resume from the latest, read a finished stage.

A checkpoint holds the train state(s) of a stage as a flat dict of arrays keyed by their pytree path
(`policy.params.blocks.0.attn.q`), so that it is readable with any orbax tool and restores directly into
the shardings of the live state, plus a JSON `meta` item: the data position, the RNG seed/step, the KL
controller's beta, and anything else the stage needs to continue exactly where it stopped. Orbax writes
into a temporary folder and renames it when complete, so a kill during a save leaves the previous
checkpoint usable.

Every stage's loop ends each step with `Checkpointer.step_end`, which saves every `checkpoint.every` steps
and at the last, saves and stops on SIGTERM (preempt.py), and stops a run whose updates have been non-finite
`guards.max_nonfinite_in_row` times in a row without writing over the last good checkpoint.

A stage that has finished writes `W/<stage>/DONE` (JSON) after its last checkpoint and HF export; the
pipeline skips stages that have it.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from jax_rlhf.train import preempt
from jax_rlhf.train import state as state_lib


_whole_replica_writes = False  # set once the multi-process array handler is registered


class Diverged(Exception):
  """Too many non-finite updates in a row: main prints the one line and exits 1."""


def _key(path) -> str:
  parts = []
  for p in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return '.'.join(parts)


def flatten(tree: Any) -> dict[str, Any]:
  """{dotted path: leaf} of a pytree (nnx Variables contribute their value)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    out[_key(path)] = leaf
  if len(out) != len(flat):
    raise ValueError('pytree paths collide when flattened to dotted keys')
  return out


def unflatten(template: Any, flat: dict[str, Any]) -> Any:
  """Inverse of `flatten` onto the structure of `template`."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  missing = [_key(p) for p, _ in paths if _key(p) not in flat]
  if missing:
    raise KeyError(f'checkpoint lacks {len(missing)} arrays, e.g. {missing[:3]}')
  return jax.tree_util.tree_unflatten(treedef, [flat[_key(p)] for p, _ in paths])


def _abstract(tree: Any) -> dict[str, Any]:
  def one(x):
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return {k: one(v) for k, v in flatten(tree).items()}


class Checkpointer:
  """A stage's checkpoints under `directory` (orbax CheckpointManager, `keep` most recent)."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True, every: int = 0,
               check_every: int = 0, max_nonfinite_in_row: int = 0):
    self.directory = os.path.abspath(directory)
    self.stage_dir = os.path.dirname(self.directory)
    self.every, self.check_every, self.max_nonfinite = every, check_every, max_nonfinite_in_row
    global _whole_replica_writes
    if jax.process_count() > 1 and not _whole_replica_writes:
      _whole_replica_writes = True
      # orbax's replica-parallel save slices replicated arrays on each process's own devices; those small
      # programs compiled at different moments on different processes hang the CPU (gloo) client. Each
      # replicated array is written whole from its first replica instead.
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(flatten(state)), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restore into the structure, dtypes and shardings of `template` (a live or abstract state)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(template)), meta=ocp.args.JsonRestore()))
    return unflatten(template, dict(out['state'])), dict(out['meta'])

  def resume(self, template: Any, **loaders) -> tuple[Any, dict[str, Any]]:
    """Restore the latest checkpoint (state, meta) and put each named loader at its saved position;
    `(template, {})` when there is none. Loaders are saved in meta under the same names."""
    if self.latest_step() is None:
      return template, {}
    state, meta = self.restore(template)
    for name, loader in loaders.items():
      if loader is not None and meta.get(name) is not None:
        loader.restore(meta[name])
    return state, meta

  def step_end(self, step: int, total: int, state: Any, meta: dict[str, Any]) -> None:
    """After train step `step` of `total`: the periodic/last save, preemption, the non-finite guard.

    The guard reads the skip counters (one device scalar) only at checkpoint and check steps, so it adds no
    host round trip to the other steps; a checkpoint is written only when the last update was applied, so a
    run of skipped steps never replaces the last good checkpoint.
    """
    modes = preempt.faults(self.stage_dir, step)
    if 'kill' in modes:
      preempt.kill_self()
    if 'term' in modes:
      preempt.kill_self(preempt.signal.SIGTERM)
    stop = preempt.requested(step)
    periodic = (self.every > 0 and step % self.every == 0) or step == total or 'kill-in-save' in modes
    if periodic or stop or (self.check_every > 0 and step % self.check_every == 0):
      in_row, skipped = (int(x) for x in jax.device_get(state_lib.nonfinite_counts(state)))
      if self.max_nonfinite and in_row >= self.max_nonfinite:
        self.wait()
        latest = self.latest_step()
        raise Diverged(f'{os.path.basename(self.stage_dir)}: the last {in_row} updates (to step {step}) had a '
                       f'non-finite loss or gradient and were skipped ({skipped} in all); stopping. The last good '
                       f'checkpoint is step {latest} in {self.directory}' if latest is not None else
                       f'{os.path.basename(self.stage_dir)}: the last {in_row} updates (to step {step}) had a '
                       f'non-finite loss or gradient and were skipped; stopping with no checkpoint written')
      if in_row and not stop:
        periodic = False  # the last update was skipped: keep the last good checkpoint
    if periodic or stop:
      if self.latest_step() != step:
        self.save(step, state, meta)
    if 'kill-in-save' in modes:
      self._kill_while_writing(step)
    if stop:
      self.wait()
      if jax.process_index() == 0:
        print(f'[{os.path.basename(self.stage_dir)}] preempted (SIGTERM): saved step {step} in {self.directory}; '
              f'run the same command again to resume', flush=True)
      raise preempt.Preempted(step)

  def _kill_while_writing(self, step: int) -> None:
    """Test hook: SIGKILL while orbax writes step's checkpoint (its temporary folder exists, the final not)."""
    final = os.path.join(self.directory, str(step))
    for _ in range(20000):
      tmp = [n for n in os.listdir(self.directory) if n.startswith(f'{step}.') and 'tmp' in n]
      if tmp or os.path.exists(final):
        break
      time.sleep(0.0005)
    preempt.kill_self()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def for_stage(stage_dir: str, config) -> Checkpointer:
  """The checkpointer of a stage, `W/<stage>/checkpoints`, as config.checkpoint says."""
  return Checkpointer(os.path.join(stage_dir, 'checkpoints'), keep=config.checkpoint.keep,
                      async_save=config.checkpoint.async_save, every=config.checkpoint.every,
                      check_every=config.log_every, max_nonfinite_in_row=config.guards.max_nonfinite_in_row)


def resume_stage(stage_dir: str, config, name: str, state, loader):
  """The stage's checkpointer, and the state and data loader restored from its latest checkpoint (as they are
  when there is none): (checkpointer, state, the step to continue after). Says so when it resumes."""
  ckpt = for_stage(stage_dir, config)
  state, meta = ckpt.resume(state, loader=loader)
  start = int(meta.get('step', 0))
  if start:
    print(f'[{name}] resumed from step {start}')
  return ckpt, state, start


def mark_done(stage_dir: str, summary: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(stage_dir, 'DONE'), 'w') as f:
      json.dump(summary, f, indent=1, default=float)


def is_done(stage_dir: str) -> bool:
  return os.path.exists(os.path.join(stage_dir, 'DONE'))
