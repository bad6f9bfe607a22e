"""The LM train step that pretraining, SFT and PPO-ptx share: next-token cross-entropy under a loss mask.

Batch layout (right-padded): `tokens [B, T]`, `attention_mask [B, T]` (1 = real token), `loss_mask [B, T]`
(1 where token t is a target, i.e. predicted from tokens < t; SFT sets it on response tokens only).
"""
from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from jax_rlhf import losses
from jax_rlhf import sharding as shd
from jax_rlhf.train import state as state_lib
from jax_rlhf.train.state import TrainState


def lm_loss(model, batch: dict[str, jax.Array], dropout_key=None):
  """Mean next-token cross-entropy over `loss_mask` positions. Returns (loss, n_target_tokens)."""
  tokens = batch['tokens']  # [B, T]
  logits = model(tokens[:, :-1], batch['attention_mask'][:, :-1], dropout_key=dropout_key)  # [B, T-1, V]
  return losses.token_cross_entropy(logits, tokens[:, 1:], batch['loss_mask'][:, 1:])


def lm_train_step(graphdef, tx: optax.GradientTransformation, state: TrainState, batch, rng):
  """One AdamW step on the LM loss (pure; jit it with `jit_lm_step`). A non-finite gradient skips the update
  (the optimizer's guard, see state.make_optimizer); `nonfinite_skipped` counts such steps so far."""
  key = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.rest)
    loss, n = lm_loss(model, batch, key if model.config.dropout_rate > 0 or model.lora_dropout > 0 else None)
    return loss, n

  (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, 'tokens': n, 'grad_norm': optax.tree.norm(grads),
             'nonfinite_skipped': state_lib.nonfinite_counts(opt_state)[1]}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def lm_eval_step(graphdef, state: TrainState, batch):
  """Summed CE and token count (so that means over many batches are exact)."""
  model = nnx.merge(graphdef, state.params, state.rest)
  loss, n = lm_loss(model, batch)
  return {'loss_sum': loss * n, 'tokens': n}


def jit_lm_step(graphdef, tx, state_shardings, mesh: Mesh):
  """The LM step jitted with explicit shardings and the state donated."""
  batch_sh = shd.batch_sharding(mesh)
  return shd.mesh_jit(
      mesh, lambda state, batch, rng: lm_train_step(graphdef, tx, state, batch, rng),
      in_shardings=(state_shardings, batch_sh, shd.replicated(mesh)),
      out_shardings=(state_shardings, shd.replicated(mesh)),
      donate_argnums=0)


def jit_lm_eval(graphdef, state_shardings, mesh: Mesh):
  return shd.mesh_jit(mesh, lambda state, batch: lm_eval_step(graphdef, state, batch),
                 in_shardings=(state_shardings, shd.batch_sharding(mesh)),
                 out_shardings=shd.replicated(mesh))
