"""Epochs x minibatches of gradient steps in one `lax.scan`, over a dict of trained roles.

Each role (e.g. 'policy', 'value') is a `state.TrainState` with its own optax optimizer; one loss function of
all the roles' params gives every role's gradient. PPO trains policy + value on one clipped loss; a
critic-free method (GRPO, the DPO family) trains {'policy'} alone. Pure: the caller jits (and donates) it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jax_rlhf import sharding as shd
from jax_rlhf.train import state as state_lib

# loss_fn(params: {role: Params}, rest: {role: other variables}, minibatch, extra) -> (loss, metrics)
LossFn = Callable[[dict, dict, Any, Any], tuple[jax.Array, dict]]


def minibatch_indices(rng, batch_size: int, epochs: int, num_minibatches: int):
  """Row indices of each step: [E*M, batch_size // M]; a fresh permutation per epoch (key split E ways).
  With M = 1 every step sees the whole batch in its order (no permutation, no gather)."""
  mb_size = batch_size // num_minibatches
  perms = jax.vmap(lambda k: jax.random.permutation(k, batch_size))(jax.random.split(rng, epochs))
  idx = perms[:, :mb_size * num_minibatches].reshape(epochs * num_minibatches, mb_size)  # [E*M, mb]
  if num_minibatches == 1:
    idx = jnp.broadcast_to(jnp.arange(batch_size), (epochs, batch_size))
  return idx


def update(loss_fn: LossFn, optimizers: Mapping[str, optax.GradientTransformation],
           trained: Mapping[str, state_lib.TrainState], data: Any, rng, *, epochs: int, num_minibatches: int,
           extra: Any = None, skip: Callable[[dict], jax.Array] | None = None):
  """`epochs` x `num_minibatches` optimizer steps of every trained role, in one `lax.scan` (pure).

  loss_fn(params, rest, minibatch, extra) -> (scalar loss, dict of scalar metrics): params/rest are dicts
    role -> that role's `nnx.Param` state / other variables; the loss is differentiated w.r.t. all params.
  optimizers: role -> optax transformation (each role's own; its opt_state lives in its TrainState).
  trained: role -> TrainState. data: a pytree of arrays with the batch [B, ...] first; each step gathers
    its minibatch rows (`minibatch_indices`: a permutation per epoch from rng, split E ways).
  extra: None, or a pytree with [E*M, ...] leading: step s gets extra[s] (PPO-ptx's pretraining batches).
  skip: None, or metrics -> bool scalar: when true the whole step is dropped (every role keeps its state,
    bitwise; PPO's ratio_threshold). Non-finite gradients are dropped by the optimizer
    (`state.make_optimizer`'s apply_if_finite) and counted in its state.
  Returns (trained, metrics, per_step):
    metrics: every loss metric's mean over the E*M steps, '<role>_grad_norm' (the mean global norm of that
      role's gradient), 'skipped' (steps the predicate dropped, a sum; only with skip) and
      'nonfinite_skipped' (the optimizers' count of non-finite updates so far, over all roles);
    per_step: the stacked [E*M] metrics of each step (e.g. step 0's PPO ratio, exactly 1).
  """
  names = sorted(trained)
  batch_size = jax.tree.leaves(data)[0].shape[0]
  idx = minibatch_indices(rng, batch_size, epochs, num_minibatches)

  def step(roles, xs):
    i, extra_step = xs
    # rows over the batch axes under a stage's mesh (`sharding.constrain`), not left to the partitioner
    minibatch = jax.tree.map(lambda x: shd.constrain(x[i], ('batch',)), data)
    rest = {name: roles[name].rest for name in names}
    grad_fn = jax.value_and_grad(lambda params: loss_fn(params, rest, minibatch, extra_step), has_aux=True)
    (_, metrics), grads = grad_fn({name: roles[name].params for name in names})
    new = {}
    for name in names:
      st = roles[name]
      updates, opt_state = optimizers[name].update(grads[name], st.opt_state, st.params)
      new[name] = st.replace(step=st.step + 1, params=optax.apply_updates(st.params, updates), opt_state=opt_state)
    if skip is not None:
      dropped = skip(metrics)
      new = jax.tree.map(lambda old, upd: jnp.where(dropped, old, upd), dict(roles), new)
      metrics['skipped'] = dropped.astype(jnp.float32)
    for name in names:
      metrics[f'{name}_grad_norm'] = optax.tree.norm(grads[name])
    return new, metrics

  trained, per_step = jax.lax.scan(step, {name: trained[name] for name in names}, (idx, extra))
  metrics = jax.tree.map(jnp.mean, per_step)
  if skip is not None:
    metrics['skipped'] = jnp.sum(per_step['skipped'])  # steps dropped in this update
  metrics['nonfinite_skipped'] = state_lib.nonfinite_counts(trained)[1]  # updates skipped so far
  return trained, metrics, per_step
