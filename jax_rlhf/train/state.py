"""Train state, optimizer and schedules from the config, and sharded construction of both.

A model is held as `(graphdef, params, rest)`: `params` are the `nnx.Param` leaves the optimizer trains,
`rest` any other variables (e.g. the reward model's normalisation). The graphdef is static; every jitted
function takes the state pytree and merges inside.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jax_rlhf import sharding as shd
from jax_rlhf.models import lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # scalar int32
  params: Any           # nnx.State of Params (trained)
  rest: Any             # nnx.State of other variables (not trained)
  opt_state: Any        # optax state


def schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Learning rate: linear warm-up, then 'cosine' (to end_lr_frac of peak), 'linear' (to 0) or 'constant'."""
  peak = float(opt_cfg.lr)
  warmup = int(opt_cfg.get('warmup_steps', 0))
  decay_steps = max(int(total_steps) - warmup, 1)
  kind = opt_cfg.get('schedule', 'cosine')
  if kind == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(opt_cfg.get('end_lr_frac', 0.1)))
  elif kind == 'linear':
    after = optax.linear_schedule(peak, 0.0, decay_steps)
  elif kind == 'constant':
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f'optimizer.schedule must be cosine | linear | constant, got {kind!r}')
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


# apply_if_finite lets an update through after this many non-finite ones in a row; the run stops long before
# (guards.max_nonfinite_in_row, checked by the host), so in effect it never does.
_NEVER = 2**31 - 1


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay) with global-norm clipping; hyperparameters from the config.

  Wrapped in `optax.apply_if_finite`: a step whose gradient has a NaN or Inf anywhere (which a non-finite
  loss always gives) changes nothing (zero update, moments and schedule count untouched), decided inside the
  jitted step; the state counts such steps, in a row and in total (`nonfinite_counts`).
  """
  parts = []
  if opt_cfg.get('grad_clip', 0.0):
    parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip)))
  parts.append(optax.adamw(schedule(opt_cfg, total_steps), b1=float(opt_cfg.b1), b2=float(opt_cfg.b2),
                           eps=float(opt_cfg.eps), weight_decay=float(opt_cfg.weight_decay)))
  return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=_NEVER)


def _finite_guards(tree) -> list:
  is_guard = lambda x: isinstance(x, optax.ApplyIfFiniteState)  # noqa: E731
  return [x for x in jax.tree.leaves(tree, is_leaf=is_guard) if is_guard(x)]


def nonfinite_counts(tree) -> tuple[jax.Array, jax.Array]:
  """(longest current run of skipped non-finite steps, total skipped) over every optimizer state in `tree`
  (a TrainState or a dict of them); device scalars, (0, 0) when there is no optimizer."""
  guards = _finite_guards(tree)
  if not guards:
    return jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
  return (jnp.max(jnp.stack([g.notfinite_count for g in guards])),
          jnp.sum(jnp.stack([g.total_notfinite for g in guards])))


def split_model(model: nnx.Module):
  """(graphdef, params, rest) of a model. With LoRA adapters (`models.lora`) `params` holds the adapters (and a
  scalar model's head) alone and the frozen base weights go to `rest`: the optimizer never sees them."""
  graphdef, params, rest = nnx.split(model, lora.trainable if lora.has_adapters(model) else nnx.Param, ...)
  return graphdef, params, rest


def create_state(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation | None, mesh: Mesh,
                 rules=shd.DEFAULT_RULES):
  """Build a model and its TrainState directly with sharded outputs (eval_shape + jit(out_shardings)).

  `model_fn` makes the model (random init, or loads weights). Returns (graphdef, state, state_shardings).
  With `tx=None` the state has no optimizer (frozen models: reference, reward).
  """
  def init():
    graphdef_, params, rest = split_model(model_fn())
    opt_state = tx.init(params) if tx is not None else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=opt_state)

  graphdef = nnx.graphdef(nnx.eval_shape(model_fn))
  abstract = jax.eval_shape(init)
  shardings = shd.shardings_of(abstract, mesh, rules)
  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def place_state(graphdef_and_model: nnx.Module, tx, mesh: Mesh, rules=shd.DEFAULT_RULES):
  """TrainState for an existing (host) model, placed by the rules (e.g. after loading a checkpoint)."""
  graphdef, params, rest = split_model(graphdef_and_model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                     opt_state=tx.init(params) if tx is not None else None)
  shardings = shd.shardings_of(jax.eval_shape(lambda: state), mesh, rules)
  return graphdef, jax.device_put(state, shardings), shardings


def num_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
