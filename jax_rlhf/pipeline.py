"""The pipeline as a plan of named runs with explicit inputs.

A plan (`config.plan`, a tuple) lists runs in the order they are made. Each run is a ConfigDict:

  name       its folder W/<name> (and the name other runs' inputs use)
  kind       pretrain | sft | label | rm | ppo | eval | dpo | grpo: which stage's `run` makes it (KINDS)
  inputs     role -> name of a run of the same workdir: init (the model it starts from), policy, reference,
             reward, value, rankings (a name, or a tuple of label runs whose rankings add up: later rounds),
             prompts_from. A stage fills in its default for a role left out.
  overrides  a nested dict of config fields, applied to this run's own copy of the (locked) config:
             {'ppo': {'kl': {'coef': 0.02}}}. A field the config does not have fails naming the nearest one.

`variants.default_plan()` is InstructGPT's recipe: pretrain, sft, label, rm, ppo, eval. The `ablation`
variant adds ppo_lowbeta and ppo_ptx after ppo. `stage=pipeline` makes every run of the plan in order (a run
with a W/<name>/DONE is skipped, as is a pretrain or label run no later run reads: SFT from `model.path`,
rankings from `data.rankings` or `rm.data`); `stage=<kind or run name>` makes the plan's run of that name alone (a
default-plan run when the plan has none). Every stage's entry point is
`run(config, workdir, name, inputs) -> dict`, imported when its run is made.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import json
import os
import time
from typing import Any, Mapping

import ml_collections

# kind -> (module, function): the stage that makes a run of that kind.
KINDS = {
    'pretrain': ('jax_rlhf.train.sft', 'run_pretrain'),
    'sft': ('jax_rlhf.train.sft', 'run'),
    'label': ('jax_rlhf.train.label', 'run'),
    'rm': ('jax_rlhf.train.rm', 'run'),
    'ppo': ('jax_rlhf.train.ppo', 'run'),
    'eval': ('jax_rlhf.evaluate', 'run'),
    'dpo': ('jax_rlhf.train.dpo', 'run'),
    'grpo': ('jax_rlhf.train.grpo', 'run'),
}
ROLES = ('init', 'policy', 'reference', 'reward', 'value', 'rankings', 'prompts_from')


class PlanError(ValueError):
  """A mistake in a plan or its overrides (the caller prints it as one line, exit 2)."""


def field_paths(c: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every dotted field path of a config, sections and leaves: ['seed', 'ppo', 'ppo.kl', 'ppo.kl.coef', ...]."""
  out = []
  for k, v in c.items():
    path = f'{prefix}{k}'
    out.append(path)
    if isinstance(v, ml_collections.ConfigDict):
      out += field_paths(v, path + '.')
  return out


def unknown_field(c: ml_collections.ConfigDict, path: str) -> str | None:
  """None when `path` (dotted) names a field of `c`; else one line saying which section lacks which field and,
  by difflib over every dotted path, the nearest real one: 'ppo has no field kl_coef; did you mean ppo.kl.coef?'."""
  parts = path.split('.')
  node, where = c, 'config'
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      return None  # below a leaf (a dict-valued field): the config's own check decides
    if part not in node:
      paths = field_paths(c)
      prefix = '.'.join(parts[:i]) + '.' if i else ''
      near = (difflib.get_close_matches(path, paths, n=1, cutoff=0.85) or  # a near path: ppo.kl_coef
              [prefix + k for k in difflib.get_close_matches(part, list(node), n=1, cutoff=0.6)] or  # a sibling
              difflib.get_close_matches(path, paths, n=1, cutoff=0.6))  # a path in another section
      if not near:  # the misspelt key alone, against every field's last part
        leaf = [p for p in paths if difflib.get_close_matches(part, [p.rsplit('.', 1)[-1]], n=1, cutoff=0.7)]
        near = [min(leaf, key=lambda p: (p.count('.') != i, len(p)))] if leaf else []
      hint = f'; did you mean {near[0]}?' if near else ''
      return f'{where} has no field {part}{hint}'
    node, where = node[part], '.'.join(parts[:i + 1])
  return None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], run: str,
                    prefix: str = '') -> None:
  """Set the nested `overrides` on `config` (locked: no new fields); a PlanError names a bad key or value."""
  for k, v in overrides.items():
    path = f'{prefix}{k}'
    node = _get(config, prefix)
    if k not in node:
      raise PlanError(f'plan run {run}: {unknown_field(config, path)}')
    if isinstance(node[k], ml_collections.ConfigDict) and isinstance(v, Mapping):
      apply_overrides(config, v, run, path + '.')
      continue
    try:
      setattr(node, k, v)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
      raise PlanError(f'plan run {run}: bad override {path}={v!r}: {e}') from None


def _get(config: ml_collections.ConfigDict, prefix: str) -> ml_collections.ConfigDict:
  node = config
  for part in filter(None, prefix.split('.')):
    node = node[part]
  return node


def run_config(config: ml_collections.ConfigDict, run: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a run is made with: a locked copy of `config` with the run's overrides applied."""
  c = copy.deepcopy(config)
  c.lock()
  overrides = run.overrides.to_dict() if isinstance(run.overrides, ml_collections.ConfigDict) else run.overrides
  apply_overrides(c, overrides or {}, run.name)
  return c


def _flat(overrides: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'ppo': {'kl': {'coef': 0.01}}} -> {'ppo.kl.coef': 0.01}."""
  out = {}
  for k, v in overrides.items():
    if isinstance(v, (Mapping, ml_collections.ConfigDict)):
      out.update(_flat(v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def flag_notes(config: ml_collections.ConfigDict, run, flag_fields) -> list[str]:
  """One line per command-line override (`--config.dpo.beta=0.5`: field 'dpo.beta') that this plan run's own
  override replaces with another value: a run's override wins over a flag (the ablation's ppo_lowbeta keeps its
  low beta whatever --config.ppo.kl.coef says), and the user should know that their flag did not reach it."""
  overrides = run.overrides.to_dict() if isinstance(run.overrides, ml_collections.ConfigDict) else run.overrides
  notes = []
  for path, value in _flat(overrides or {}).items():
    if path not in flag_fields:
      continue
    try:
      flag_value = _get(config, path.rpartition('.')[0])[path.rpartition('.')[2]]
    except (KeyError, AttributeError):
      continue
    if flag_value != value and not (isinstance(value, (list, tuple)) and tuple(value) == tuple(flag_value or ())):
      notes.append(f'[{run.name}] note: this run of the plan sets {path}={value!r}, which replaces '
                   f'--config.{path}={flag_value!r} here (a plan run\'s overrides win over flags; change the plan '
                   'or its variant to change it)')
  return notes


def check_plan(plan) -> None:
  """A PlanError for a run without a name or with an unknown kind, a name used twice, an unknown role, or an
  input that names no earlier run of the plan."""
  seen = set()
  for r in plan:
    if not r.get('name'):
      raise PlanError(f'a plan run has no name: {r}')
    if r.kind not in KINDS:
      near = difflib.get_close_matches(r.kind, KINDS, n=1)
      raise PlanError(f'plan run {r.name}: unknown kind {r.kind!r}' + (f'; did you mean {near[0]}?' if near else '') +
                      f' (kinds: {", ".join(KINDS)})')
    if r.name in seen:
      raise PlanError(f'plan run {r.name} appears twice')
    for role, src in r.inputs.items():
      if role not in ROLES:
        raise PlanError(f'plan run {r.name}: unknown input role {role!r} (roles: {", ".join(ROLES)})')
      if not isinstance(src, str) and role != 'rankings':
        raise PlanError(f'plan run {r.name}: its {role} input must be one run name, got {src!r}')
      for s in input_runs(src):
        if s not in seen:
          raise PlanError(f'plan run {r.name}: its {role} input {s!r} is no earlier run of the plan')
    seen.add(r.name)


def input_runs(src) -> tuple[str, ...]:
  """The run names of one input: a name, or (the `rankings` role) a tuple of names whose rankings add up."""
  return (src,) if isinstance(src, str) else tuple(src)


def used_inputs(run, rc: ml_collections.ConfigDict) -> dict[str, str]:
  """The inputs a run reads under its config `rc`: SFT reads `init` only when sft.init=pretrain; the RM reads
  `rankings` only when neither data.rankings nor rm.data gives them."""
  inputs = dict(run.inputs)
  if run.kind == 'sft' and rc.sft.init != 'pretrain':
    inputs.pop('init', None)
  if run.kind == 'rm' and (rc.data.rankings or rc.rm.data):
    inputs.pop('rankings', None)
  return inputs


def plan_of(config: ml_collections.ConfigDict) -> list[tuple[Any, ml_collections.ConfigDict]]:
  """The (run, its config) pairs `config.stage` makes, in order: the whole plan less pretrain and label runs
  that no later run reads, or the one run named like `config.stage` (a kind, or any run name of the plan:
  `stage=dpo_online` makes the compare plan's dpo_online alone)."""
  from jax_rlhf.config import KINDS as STAGE_KINDS, STAGES
  from jax_rlhf.variants import default_plan, single_run
  plan = tuple(config.plan)
  if config.stage not in STAGES and config.stage not in [r.name for r in plan]:
    known = [*STAGES, *[r.name for r in plan if r.name not in STAGES]]
    near = difflib.get_close_matches(str(config.stage), known, n=1)
    raise PlanError(f'config.stage={config.stage!r} is neither a kind nor a run of the plan'
                    + (f'; did you mean {near[0]!r}?' if near else '') + f' Choose one of {", ".join(known)}')
  check_plan(plan)
  if config.stage != 'pipeline':
    run = next((r for r in plan if r.name == config.stage), None)
    if run is None:
      run = next((r for r in default_plan() if r.name == config.stage), None) or single_run(config.stage)
    assert run.kind in STAGE_KINDS
    return [(run, run_config(config, run))]
  runs = [(r, run_config(config, r)) for r in plan]
  needed = set()
  for r, rc in runs:
    needed |= {n for src in used_inputs(r, rc).values() for n in input_runs(src)}
  return [(r, rc) for r, rc in runs if r.kind not in ('pretrain', 'label') or r.name in needed]


def make(run, rc: ml_collections.ConfigDict, workdir: str):
  """Makes one run (imports its stage); None when it was already complete (W/<name>/DONE; eval reprints)."""
  from jax_rlhf.train import checkpoint, common
  if run.kind != 'eval' and checkpoint.is_done(common.stage_dir(workdir, run.name)):
    print(f'[{run.name}] already complete in {common.stage_dir(workdir, run.name)}; skipping')
    return None
  module, fn = KINDS[run.kind]
  stage = getattr(importlib.import_module(module), fn)
  return stage(rc, workdir, name=run.name, inputs=dict(run.inputs))


def execute(config: ml_collections.ConfigDict, workdir: str, flag_fields=()) -> None:
  """Makes the runs of `plan_of(config)` in order, appending each one's wall time to W/wall_times.jsonl. With
  several processes, all of them wait for each other before each run (so that they agree on what is done and
  read the files process 0 wrote). flag_fields: the fields the command line set (`main.flag_fields`), for a
  note where a run's own override replaces one (`flag_notes`)."""
  import jax
  from jax_rlhf.train.common import UserError
  try:
    runs = plan_of(config)
  except PlanError as e:
    raise UserError(str(e)) from None
  for run, rc in runs:
    _barrier(f'before {run.name}')
    for line in flag_notes(config, run, set(flag_fields)):
      print(line, flush=True)
    t = time.perf_counter()
    done = make(run, rc, workdir)
    dt = time.perf_counter() - t
    print(f'[{run.name}] {dt:.1f} s', flush=True)
    if done is not None and jax.process_index() == 0:
      with open(os.path.join(workdir, 'wall_times.jsonl'), 'a') as f:
        f.write(json.dumps({'stage': run.name, 'wall_s': round(dt, 1), 'time': round(time.time(), 1)}) + '\n')
  _barrier('end')


def _barrier(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
