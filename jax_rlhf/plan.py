"""A memory plan: does each training stage of a config fit on N devices of a chip, before anything is launched?

  python -m jax_rlhf.plan --config configs/ppo.py:model=llama-3-8b --devices 64 --chip v5p \
      --config.mesh.data=1 --config.mesh.fsdp=-1

For each run of the config's plan that trains (pretrain, sft, rm, ppo, dpo, grpo; `pipeline.plan_of`: the whole plan for
stage=pipeline, else the one run) it builds the stage's states as abstract arrays (`jax.eval_shape`: no weight is
allocated), places them by the sharding rules on the config's mesh over N fake CPU devices, and lowers and
compiles the stage's own jitted step functions (lm.jit_lm_step, rm.rm_train_step, ppo.experience + ppo.ppo_update,
dpo.jit_train_step, grpo.rollout + grpo.advantages and grpo.update) on abstract batches of the config's sizes, under
the mesh as the stages run them (`sharding.mesh_jit`: activations pinned to the batch axes, `sharding.constrain`),
and with the config's `model.remat` / `model.scan_layers` (or --remat / --scan_layers). Per device it prints:

  params, optimizer, frozen  EXACT: every leaf's shard shape under its NamedSharding x its dtype's size
  temp                       ESTIMATE: XLA:CPU's `compiled.memory_analysis().temp_size_in_bytes`, the largest of
                             the stage's functions (a TPU/GPU compiler schedules and fuses differently)
  io                         ESTIMATE: that function's batch inputs and outputs not aliased to a donated state
                             (argument + output - alias - the states' own bytes)

against the chip's HBM per device (`CHIPS`), with fits / does not fit. The last line printed is one JSON object:
{run name: {kind, param_count, param_bytes, optimizer_bytes, frozen_bytes, temp_bytes, io_bytes, total_bytes,
hbm_bytes, fits}} (bytes per device). `--compile=false` skips compiling (exact figures only; temp/io null).

Run as a module it sets XLA_FLAGS=--xla_force_host_platform_device_count=N (and JAX_PLATFORMS=cpu) before jax
is imported; imported into a process whose jax already has >= N devices (tests), it uses the first N.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable

# HBM per device (one chip; a GPU), bytes, and where the figure comes from.
GIB = 2**30
CHIPS: dict[str, tuple[int, str]] = {
    'v4': (32 * GIB, 'cloud.google.com/tpu/docs/v4: 32 GiB HBM2 per chip'),
    'v5e': (16 * GIB, 'cloud.google.com/tpu/docs/v5e: 16 GiB HBM2 per chip'),
    'v5p': (95 * GIB, 'cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e per chip'),
    'v6e': (32 * GIB, 'cloud.google.com/tpu/docs/v6e: 32 GiB HBM per chip (Trillium)'),
    'h100': (80 * GIB, 'nvidia.com H100 SXM datasheet: 80 GB HBM3'),
    'h200': (141 * GIB, 'nvidia.com H200 datasheet: 141 GB HBM3e'),
}
TRAINING_KINDS = ('pretrain', 'sft', 'rm', 'ppo', 'dpo', 'grpo')


def _devices_from_argv(argv: list[str]) -> int | None:
  for i, a in enumerate(argv):
    if a.startswith('--devices='):
      return int(a.split('=', 1)[1])
    if a == '--devices' and i + 1 < len(argv):
      return int(argv[i + 1])
  return None


def force_host_devices(n: int) -> None:
  """N fake CPU devices for the jax imported after this (XLA_FLAGS), CPU platform only."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'xla_force_host_platform_device_count' not in f]
  os.environ['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={n}'])
  os.environ['JAX_PLATFORMS'] = 'cpu'


if __name__ == '__main__':  # before jax is imported
  try:
    _n = _devices_from_argv(sys.argv)
  except ValueError:
    _n = None
  if _n:
    force_host_devices(_n)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jax_rlhf import kernels, pipeline  # noqa: E402
from jax_rlhf import rewards as rewards_lib  # noqa: E402
from jax_rlhf import sharding as shd  # noqa: E402
from jax_rlhf.models import hf_config, lora, transformer, transformer_config  # noqa: E402
from jax_rlhf.models.heads import ScalarModel  # noqa: E402
from jax_rlhf.train import dpo, grpo, lm, ppo, rm, rollout  # noqa: E402
from jax_rlhf.train import state as state_lib  # noqa: E402
from jax_rlhf.train import common  # noqa: E402
from jax_rlhf.train.common import UserError  # noqa: E402


# ---------------------------------------------------------------------------------------------------- pieces

def model_config(config, **overrides) -> transformer_config.TransformerConfig:
  """The model of `config.model`: `model.path`'s config.json when set, else the preset; dtypes, remat and
  scan_layers from the config (`overrides` win). (The tokenizer's vocabulary is not read: the preset's or the
  file's vocab_size is planned.)"""
  try:
    kw = {**common.model_kw(config), **overrides}
    if config.model.path:
      path = os.path.expanduser(config.model.path)
      if not os.path.isfile(os.path.join(path, 'config.json')):
        raise UserError(f'model.path {path} has no config.json')
      return hf_config.config_from_hf(hf_config.read_config(path), **kw)
    return transformer_config.preset(config.model.preset, **kw)
  except ValueError as e:
    raise UserError(f'config.model: {e}') from None


def abstract_state(model_fn: Callable[[], nnx.Module], tx, mesh, cast: str | None = None):
  """(graphdef, state as ShapeDtypeStructs carrying their NamedShardings, shardings) of the TrainState that
  `state_lib.place_state` would build, without allocating it. `cast`: floating leaves held in this dtype (PPO's
  frozen_dtype)."""
  def init():
    _, params, rest = state_lib.split_model(model_fn())
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                                opt_state=tx.init(params) if tx is not None else None)
  graphdef = nnx.graphdef(nnx.eval_shape(model_fn))
  abstract = jax.eval_shape(init)
  if cast is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(cast))
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, abstract)
  shardings = shd.shardings_of(abstract, mesh)
  sds = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return graphdef, sds, shardings


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs: the largest shard of each leaf (exact for
  an even split; a dimension the mesh does not divide is replicated by the rules)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if x is None:
      continue
    shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if x is not None))


def _batch(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh, batch_dim: int = 0) -> dict:
  lead = (None,) * batch_dim
  sh = shd.NamedSharding(mesh, shd.P(*lead, shd.BATCH_AXES))
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh) for k, (shape, dtype) in shapes.items()}


def _rep(x, mesh):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.replicated(mesh))


def _check_rows(what: str, rows: int, mesh) -> None:
  if rows % shd.batch_divisor(mesh):
    raise UserError(f'{what}={rows} must be divisible by the data x fsdp devices ({shd.batch_divisor(mesh)})')


def _compile(fn, *args) -> dict | None:
  """XLA's memory analysis of fn compiled on these abstract arguments (per device: an SPMD program)."""
  m = fn.lower(*args).compile().memory_analysis()
  return {'temp': int(m.temp_size_in_bytes), 'argument': int(m.argument_size_in_bytes),
          'output': int(m.output_size_in_bytes), 'alias': int(m.alias_size_in_bytes)}


# ---------------------------------------------------------------------------------------------------- stages
# Each returns (functions, trained states, frozen states): functions is a list of (name, jitted fn, abstract
# args, bytes of the states among the args), compiled by `plan_run`.

def _lm_stage(kind, rc, mesh, mcfg):
  sc = rc.pretrain if kind == 'pretrain' else rc.sft
  d = rc.data
  length = d.seq_len if kind == 'pretrain' else d.max_prompt_len + d.max_response_len
  _check_rows(f'{kind}.batch_size', sc.batch_size, mesh)
  tx = state_lib.make_optimizer(sc.optimizer, sc.steps)
  graphdef, state, shardings = abstract_state(lambda: transformer.Transformer(mcfg, rngs=nnx.Rngs(0)), tx, mesh)
  step = lm.jit_lm_step(graphdef, tx, shardings, mesh)
  b = sc.batch_size
  batch = _batch({k: ((b, length), jnp.int32) for k in ('tokens', 'attention_mask', 'loss_mask')}, mesh)
  rng = _rep(jax.eval_shape(lambda: jax.random.key(0)), mesh)
  return [('step', step, (state, batch, rng), bytes_per_device(state))], {'policy': state}, {}


def _rm_stage(kind, rc, mesh, mcfg):
  r = rc.rm
  _check_rows('rm.batch_size', r.batch_size, mesh)
  tx = state_lib.make_optimizer(r.optimizer, 1000)  # the schedule's length changes no buffer
  graphdef, state, shardings = abstract_state(lambda: ScalarModel(mcfg, rngs=nnx.Rngs(0)), tx, mesh)
  step = shd.mesh_jit(mesh, lambda s, b: rm.rm_train_step(graphdef, tx, r, s, b), donate_argnums=0,
                 in_shardings=(shardings, shd.batch_sharding(mesh)), out_shardings=(shardings, shd.replicated(mesh)))
  b, k, length = r.batch_size, rc.label.k_max, rc.data.max_prompt_len + rc.data.max_response_len
  batch = _batch({'tokens': ((b, k, length), jnp.int32), 'attention_mask': ((b, k, length), jnp.int32),
                  'ranking': ((b, k), jnp.int32), 'valid': ((b, k), jnp.bool_)}, mesh)
  return [('step', step, (state, batch), bytes_per_device(state))], {'reward': state}, {}


def _lora_reference(rc, mcfg, makers: dict) -> Any:
  """With model.lora.rank > 0: wraps the trained makers ('policy', 'value') in LoRA and, when there is a
  'reference' maker, drops it (the reference is the policy's base with its adapters off, no copy) and returns
  that graphdef. Else (no LoRA, or no reference) None, and the makers as they are or wrapped."""
  if not common.lora_config(rc).rank:
    return None
  for name in ('policy', 'value'):
    if name in makers:
      makers[name] = (lambda make: lambda: common.add_lora(make(), rc))(makers[name])
  if makers.pop('reference', None) is None:
    return None
  return lora.reference_graphdef(nnx.eval_shape(makers['policy']))


def _dpo_stage(kind, rc, mesh, mcfg):
  dc = rc.dpo
  _check_rows('dpo.batch_size', dc.batch_size, mesh)
  tx = state_lib.make_optimizer(dc.optimizer, 1000)
  makers = {'policy': lambda: transformer.Transformer(mcfg, rngs=nnx.Rngs(0)),
             'reference': lambda: transformer.Transformer(mcfg, rngs=nnx.Rngs(0))}
  ref_graphdef = _lora_reference(rc, mcfg, makers)
  graphdef, state, shardings = abstract_state(makers['policy'], tx, mesh)
  ref, ref_shardings = None, None
  if ref_graphdef is None:
    _, ref, ref_shardings = abstract_state(makers['reference'], None, mesh)
  p_len = rc.data.max_prompt_len
  b, k, length = dc.batch_size, rc.label.k_max, p_len + rc.data.max_response_len
  shapes = {'tokens': ((b, k, length), jnp.int32), 'attention_mask': ((b, k, length), jnp.int32),
            'ranking': ((b, k), jnp.int32), 'valid': ((b, k), jnp.bool_), 'lengths': ((b, k), jnp.int32)}
  if dc.precompute_ref:  # the reference ran once before training; the step reads its log-probs
    shapes['ref_logps'] = ((b, k), jnp.float32)
    step = dpo.jit_train_step(graphdef, tx, dc, p_len, shardings, None, mesh)
    fns = [('step', step, (state, None, _batch(shapes, mesh)), bytes_per_device(state))]
    return fns, {'policy': state}, {}  # the reference is freed before training
  step = dpo.jit_train_step(graphdef, tx, dc, p_len, shardings, ref_shardings, mesh, ref_graphdef)
  fns = [('step', step, (state, ref, _batch(shapes, mesh)), bytes_per_device(state) + bytes_per_device(ref))]
  return fns, {'policy': state}, ({} if ref is None else {'reference': ref})


def _ppo_stage(kind, rc, mesh, mcfg):
  """The two functions `ppo.PPOTrainer` compiles (experience, update), on the same shardings."""
  pc = rc.ppo
  _check_rows('ppo.batch_size / ppo.num_minibatches', pc.batch_size // max(pc.num_minibatches, 1), mesh)
  n_updates = pc.iterations * pc.ppo_epochs * pc.num_minibatches
  optimizers = {'policy': state_lib.make_optimizer(pc.policy_optimizer, n_updates),
                'value': state_lib.make_optimizer(pc.value_optimizer, n_updates)}
  frozen = None if rc.model.frozen_dtype == 'float32' else rc.model.frozen_dtype
  makers = {'policy': lambda: transformer.Transformer(mcfg, rngs=nnx.Rngs(0)),
            'value': lambda: ScalarModel(mcfg, rngs=nnx.Rngs(0)),
            'reference': lambda: transformer.Transformer(mcfg, rngs=nnx.Rngs(0)),
            'reward': lambda: ScalarModel(mcfg, rngs=nnx.Rngs(0))}
  graphdefs, states, shardings = {}, {}, {}
  ref_graphdef = _lora_reference(rc, mcfg, makers)
  if ref_graphdef is not None:
    graphdefs['reference'] = ref_graphdef
  for name, make in makers.items():
    tx = optimizers.get(name)
    graphdefs[name], states[name], shardings[name] = abstract_state(make, tx, mesh, None if tx else frozen)
  settings = rollout.Settings(pc.max_new_tokens, pc.temperature, pc.top_k, pc.top_p, mcfg.eos_token_id,
                              mcfg.pad_token_id)
  rep, batch_sh = shd.replicated(mesh), shd.batch_sharding(mesh)
  trained_sh = {name: shardings[name] for name in ppo.TRAINED}
  experience = shd.mesh_jit(
      mesh, lambda s, batch, rng, beta: ppo.experience(graphdefs, pc, settings, s, batch, rng, beta),
      in_shardings=(shardings, batch_sh, rep, rep))
  ptx_sh = shd.NamedSharding(mesh, shd.P(None, shd.BATCH_AXES))
  update = shd.mesh_jit(
      mesh, lambda trained, exp, ptx, rng: ppo.ppo_update(graphdefs, pc, optimizers, trained, exp, ptx, rng),
      in_shardings=(trained_sh, batch_sh, ptx_sh, rep), out_shardings=(trained_sh, rep), donate_argnums=0)
  b, p = pc.batch_size, rc.data.max_prompt_len
  prompts = _batch({'prompt': ((b, p), jnp.int32), 'prompt_mask': ((b, p), jnp.int32)}, mesh)
  rng = _rep(jax.eval_shape(lambda: jax.random.key(0)), mesh)
  beta = _rep(jax.ShapeDtypeStruct((), jnp.float32), mesh)
  exp, _ = experience.eval_shape(states, prompts, rng, beta)
  exp = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in exp.items()}
  ptx = None
  if pc.ptx.coef > 0:
    n = pc.ppo_epochs * pc.num_minibatches
    _check_rows('ppo.ptx.batch_size', pc.ptx.batch_size, mesh)
    ptx = _batch({k: ((n, pc.ptx.batch_size, rc.data.seq_len), jnp.int32)
                  for k in ('tokens', 'attention_mask', 'loss_mask')}, mesh, batch_dim=1)
  trained = {name: states[name] for name in ppo.TRAINED}
  frozen_states = {name: states[name] for name in ('reference', 'reward') if name in states}
  fns = [('experience', experience, (states, prompts, rng, beta), bytes_per_device(states)),
         ('update', update, (trained, exp, ptx, rng), bytes_per_device(trained))]
  return fns, trained, frozen_states


def _grpo_stage(kind, rc, mesh, mcfg):
  """The two functions `grpo.GRPOTrainer` compiles (experience: rollout + reference + RM + advantages; update),
  on the same shardings: the policy trained, the reference (when the KL is on) and the RM (when `rm` is among
  the rewards) frozen in model.frozen_dtype."""
  gc = rc.grpo
  try:
    grpo.check_config(gc)
  except ValueError as e:
    raise UserError(str(e)) from None
  n_prompts = grpo.sampled_prompts(gc)
  _check_rows('grpo prompts per rollout', n_prompts, mesh)
  _check_rows('grpo rows per minibatch', gc.prompts_per_step * gc.num_generations // gc.num_minibatches, mesh)
  tx = state_lib.make_optimizer(gc.optimizer, gc.iterations * gc.num_iterations * gc.num_minibatches)
  frozen = None if rc.model.frozen_dtype == 'float32' else rc.model.frozen_dtype
  makers = {'policy': lambda: transformer.Transformer(mcfg, rngs=nnx.Rngs(0))}
  if grpo.uses_ref(gc):
    makers['reference'] = lambda: transformer.Transformer(mcfg, rngs=nnx.Rngs(0))
  if any(name == 'rm' for name, _ in rewards_lib.parse_rewards(gc.rewards)):
    makers['reward'] = lambda: ScalarModel(mcfg, rngs=nnx.Rngs(0))
  g, st, sh = ({'reference': None, 'reward': None} for _ in range(3))
  ref_graphdef = _lora_reference(rc, mcfg, makers)
  if ref_graphdef is not None:  # no reference state: the rollout runs this graphdef on the policy's state
    g['reference'] = ref_graphdef
    del st['reference'], sh['reference']
  for name, make in makers.items():
    g[name], st[name], sh[name] = abstract_state(make, tx if name == 'policy' else None, mesh,
                                                 None if name == 'policy' else frozen)
  rep, batch_sh = shd.replicated(mesh), shd.batch_sharding(mesh)
  settings = grpo.settings(gc, mcfg.eos_token_id, mcfg.pad_token_id)

  def experience(states, batch, key, beta):
    exp, m = grpo.rollout(g, gc, settings, states, batch, key)
    exp, am = grpo.advantages(gc, exp, exp['rm_score'], beta)
    return exp, {**m, **am}

  experience = shd.mesh_jit(mesh, experience, in_shardings=(sh, batch_sh, rep, rep))
  update = shd.mesh_jit(mesh, lambda p, e, k, beta: grpo.update(g, gc, tx, p, e, k, beta),
                        in_shardings=(sh['policy'], batch_sh, rep, rep), out_shardings=(sh['policy'], rep),
                        donate_argnums=(0,))
  prompts = _batch({'prompt': ((n_prompts, rc.data.max_prompt_len), jnp.int32),
                    'prompt_mask': ((n_prompts, rc.data.max_prompt_len), jnp.int32)}, mesh)
  rng = _rep(jax.eval_shape(lambda: jax.random.key(0)), mesh)
  beta = _rep(jax.ShapeDtypeStruct((), jnp.float32), mesh)
  exp, _ = experience.eval_shape(st, prompts, rng, beta)
  exp = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in exp.items()}
  frozen_states = {name: st[name] for name in ('reference', 'reward') if st.get(name) is not None}
  fns = [('experience', experience, (st, prompts, rng, beta),
          bytes_per_device({'policy': st['policy'], **frozen_states})),
         ('update', update, (st['policy'], exp, rng, beta), bytes_per_device(st['policy']))]
  return fns, {'policy': st['policy']}, frozen_states


STAGES = {'pretrain': _lm_stage, 'sft': _lm_stage, 'rm': _rm_stage, 'ppo': _ppo_stage, 'dpo': _dpo_stage,
          'grpo': _grpo_stage}


# ---------------------------------------------------------------------------------------------------- plan

def plan_run(kind: str, rc, mesh, hbm: int, *, compile: bool = True, **model_overrides) -> dict:
  """The per-device figures of one run of kind `kind` under its config `rc` (see the module docstring)."""
  mcfg = model_config(rc, **model_overrides)
  fns, trained, frozen = STAGES[kind](kind, rc, mesh, mcfg)
  params = {k: s.params for k, s in trained.items()}
  out = {'kind': kind,
         'param_count': count(params),
         'param_bytes': bytes_per_device(params),
         'optimizer_bytes': bytes_per_device({k: s.opt_state for k, s in trained.items()}),
         'frozen_bytes': bytes_per_device(frozen),
         'rest_bytes': bytes_per_device({k: (s.rest, s.step) for k, s in trained.items()}),
         'temp_bytes': None, 'io_bytes': None, 'functions': {}}
  if compile:
    for name, fn, args, state_bytes in fns:
      m = _compile(fn, *args)
      m['io'] = max(m['argument'] + m['output'] - m['alias'] - state_bytes, 0)
      out['functions'][name] = m
    worst = max(out['functions'].values(), key=lambda m: m['temp'] + m['io'])
    out['temp_bytes'], out['io_bytes'] = worst['temp'], worst['io']
  out['total_bytes'] = sum(out[k] or 0 for k in ('param_bytes', 'optimizer_bytes', 'frozen_bytes', 'rest_bytes',
                                                 'temp_bytes', 'io_bytes'))
  out['hbm_bytes'] = hbm
  out['fits'] = out['total_bytes'] <= hbm
  return out


def make_plan(config, devices: int, chip: str, *, compile: bool = True, stages: tuple[str, ...] = (),
              **model_overrides) -> dict[str, dict]:
  """{run name: figures} for every training run of the config's plan (`pipeline.plan_of`) on `devices` devices
  of `chip`; `stages` keeps only those kinds."""
  if chip not in CHIPS:
    raise UserError(f'--chip {chip!r}: one of {", ".join(CHIPS)}')
  have = jax.devices()
  if len(have) < devices:
    raise UserError(f'--devices {devices}: this process has {len(have)} devices (run as `python -m jax_rlhf.plan`, '
                    f'which sets XLA_FLAGS=--xla_force_host_platform_device_count before jax is imported)')
  try:
    mesh = shd.make_mesh(dict(config.mesh), devices=have[:devices])
  except ValueError as e:
    raise UserError(f'config.mesh: {e}') from None
  try:
    runs = pipeline.plan_of(config)
  except pipeline.PlanError as e:
    raise UserError(str(e)) from None
  out = {}
  with kernels.mode('xla'):  # the chip's own dot, not this CPU's MKL custom call (which SPMD cannot partition)
    for run, rc in runs:
      if run.kind not in TRAINING_KINDS or (stages and run.kind not in stages):
        continue
      out[run.name] = plan_run(run.kind, rc, mesh, CHIPS[chip][0], compile=compile, **model_overrides)
  if not out:
    raise UserError(f'the config\'s plan has no training run{" of kinds " + ",".join(stages) if stages else ""}')
  return out


def _gib(x) -> str:
  if x is None:
    return '-'
  return f'{x / GIB:,.2f} GiB' if x >= GIB / 10 else f'{x / 2**20:,.2f} MiB'


def table(plan: dict[str, dict], devices: int, chip: str, mesh_shape: dict) -> str:
  hbm, source = CHIPS[chip]
  lines = [f'memory plan: {devices} x {chip} ({hbm / GIB:.0f} GiB HBM per device; {source}); mesh {mesh_shape}',
           'Per device. EXACT (shard shapes x dtype): params, optimizer, frozen, rest (non-trained variables, '
           'step). ESTIMATE (XLA:CPU memory_analysis, largest function): temp, io (batch and outputs).',
           '| run | kind | param count | params | optimizer | frozen | rest | temp | io | total | HBM | fits |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for name, p in plan.items():
    lines.append(f'| {name} | {p["kind"]} | {p["param_count"]:,} | {_gib(p["param_bytes"])} | '
                 f'{_gib(p["optimizer_bytes"])} | {_gib(p["frozen_bytes"])} | {_gib(p["rest_bytes"])} | '
                 f'{_gib(p["temp_bytes"])} | {_gib(p["io_bytes"])} | {_gib(p["total_bytes"])} | {_gib(hbm)} | '
                 f'{"fits" if p["fits"] else "DOES NOT FIT"} |')
  for name, p in plan.items():
    for fn, m in p['functions'].items():
      lines.append(f'  {name}/{fn}: compiler temp {_gib(m["temp"])}, arguments {_gib(m["argument"])}, '
                   f'outputs {_gib(m["output"])} ({_gib(m["alias"])} donated), io {_gib(m["io"])}')
  if any(p['temp_bytes'] is None for p in plan.values()):
    lines.append('(not compiled: temp and io unknown, the total counts the exact figures only)')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------- CLI

def main(argv) -> None:
  from absl import flags
  del argv
  f = flags.FLAGS
  config = f.config
  try:
    plan = make_plan(config, f.devices, f.chip, compile=f.compile, stages=tuple(filter(None, f.stages)),
                     **({'remat': f.remat} if f.remat else {}), **({'scan_layers': True} if f.scan_layers else {}))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  mesh = shd.make_mesh(dict(config.mesh), devices=jax.devices()[:f.devices])
  print(table(plan, f.devices, f.chip, dict(mesh.shape)))
  print(json.dumps({name: {k: v for k, v in p.items() if k != 'functions'} for name, p in plan.items()}))


def entry() -> None:
  from absl import app, flags

  from jax_rlhf import main as main_lib  # defines --config (and --workdir, unused here) and its one-line errors
  flags.DEFINE_integer('devices', 8, 'N: devices the plan is made for (fake CPU devices here).')
  flags.DEFINE_enum('chip', 'v5p', list(CHIPS), 'Accelerator whose HBM per device the plan is checked against.')
  flags.DEFINE_boolean('compile', True, 'Compile each step for XLA\'s temporary-memory estimate.')
  flags.DEFINE_list('stages', [], 'Only these kinds (pretrain, sft, rm, ppo, dpo, grpo); default: every training run.')
  flags.DEFINE_enum('remat', '', ['', 'none', 'full', 'dots_saveable'], 'Model remat override (TransformerConfig).')
  flags.DEFINE_boolean('scan_layers', False, 'Plan with the blocks scanned (TransformerConfig.scan_layers).')
  flags.mark_flag_as_required('config')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main, flags_parser=main_lib._parse_flags)


if __name__ == '__main__':
  entry()
