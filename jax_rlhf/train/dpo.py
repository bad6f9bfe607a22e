"""DPO: train the policy straight on preferences, with the frozen SFT model as the reference (Rafailov et al. 2023).

One batch is B prompts with K ranked responses each ([B, K, P+N], K padded, `valid` marks the real ones). Every
response goes through the policy once (and through the reference once: in the same jitted step, or once over the
whole dataset before training, `dpo.precompute_ref`), its summed log-prob read by `scoring.sequence_logps`; the
loss then uses them by `dpo.mode`:
  pairwise      : every C(k_b,2) pair of the ranking, each prompt counting once (`losses.ranking_dpo_loss`)
  listwise      : the whole ranking under Plackett-Luce (`losses.listwise_dpo_loss`; DPO appendix A.3)
  best_vs_worst : rank 1 against rank k_b (`losses.best_vs_worst_dpo_loss`)
A chosen/rejected pair is the K = 2 case. Dropout is off: no dropout key reaches the model, so the step-0 loss
is exactly log 2 (TRL #744).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_rlhf import losses
from jax_rlhf import sharding as shd
from jax_rlhf.data import batches
from jax_rlhf.models import scoring
from jax_rlhf.train import rm
from jax_rlhf.train import state as state_lib

MODES = ('pairwise', 'listwise', 'best_vs_worst')


# ---------------------------------------------------------------------------------------------------- data

def preference_arrays(tokenizer, records: Sequence[dict], max_prompt_len: int, max_response_len: int, k_max: int
                      ) -> tuple[dict[str, np.ndarray], batches.Truncation]:
  """Ranking records as the scoring layout: `tokens`/`attention_mask` [N, K, P+R] = the prompt LEFT-padded to
  P = max_prompt_len (cut from the left), then the response + EOS right-padded to R = max_response_len (cut from
  the right, as `batches.rankings` cuts); `ranking` [N, K] best first, `valid` [N, K], `lengths` [N, K] the
  response tokens counted in the log-prob (EOS included)."""
  stats = batches.Truncation(total=len(records))
  n = len(records)
  length = max_prompt_len + max_response_len
  pad = tokenizer.pad_token_id
  tokens = np.full((n, k_max, length), pad, np.int32)
  att = np.zeros((n, k_max, length), np.int32)
  ranking = np.zeros((n, k_max), np.int32)
  valid = np.zeros((n, k_max), bool)
  lengths = np.zeros((n, k_max), np.int32)
  prompt_ids = batches.encode(tokenizer, [r['prompt'] for r in records])
  for i, (rec, p) in enumerate(zip(records, prompt_ids)):
    k = len(rec['responses'])
    if k > k_max:
      raise ValueError(f'ranking record {i} has {k} responses, more than k_max={k_max}')
    p = batches._cut_prompt(p, max_prompt_len, stats)
    rs = [batches._cut_response(r, max_response_len, tokenizer.eos_token_id, stats)
          for r in batches.encode(tokenizer, rec['responses'])]
    prompt, prompt_mask = batches.pad_left([p], max_prompt_len, pad)
    resp, resp_mask = batches.pad_right(rs, max_response_len, pad)
    tokens[i, :k, :max_prompt_len], att[i, :k, :max_prompt_len] = prompt, prompt_mask
    tokens[i, :k, max_prompt_len:], att[i, :k, max_prompt_len:] = resp, resp_mask
    ranking[i, :k] = rec['ranking']
    valid[i, :k] = True
    lengths[i, :k] = [len(r) for r in rs]
  return {'tokens': tokens, 'attention_mask': att, 'ranking': ranking, 'valid': valid, 'lengths': lengths}, stats


def compact(batch: dict[str, np.ndarray], rows: int, offset: int = 0) -> dict[str, np.ndarray] | None:
  """`rm.compact` (the real responses only, as `rows` sequences), keeping the DPO batch's per-response fields."""
  small = rm.compact(batch, rows, offset)
  if small is not None:
    small.update({k: batch[k] for k in ('lengths', 'ref_logps') if k in batch})
  return small


# ---------------------------------------------------------------------------------------------------- steps

def response_logps(model, batch, prompt_len: int):
  """Summed log-prob of every response of a batch: [B, K] (padded responses give 0).

  A compacted batch (`compact`) runs the model on its real responses only and scatters them back."""
  b, k = batch['valid'].shape
  if 'row_tokens' in batch:
    r = scoring.sequence_logps(model, batch['row_tokens'], batch['row_mask'], prompt_len)  # [R]
    flat = jnp.zeros((b * k,), r.dtype).at[batch['row_index']].set(r, mode='drop')  # pad rows point past the end
    return flat.reshape(b, k)
  length = batch['tokens'].shape[-1]
  r = scoring.sequence_logps(model, batch['tokens'].reshape(b * k, length),
                             batch['attention_mask'].reshape(b * k, length), prompt_len)  # [B*K]
  return r.reshape(b, k)


def preference_loss(policy_logps, ref_logps, batch, dpo_cfg):
  """The loss of `dpo_cfg.mode` on log-probs [B, K] of a batch of rankings: (loss, metrics)."""
  args = (policy_logps, ref_logps, batch['ranking'], batch['valid'])
  if dpo_cfg.mode == 'listwise':
    return losses.listwise_dpo_loss(*args, beta=dpo_cfg.beta)
  fn = {'pairwise': losses.ranking_dpo_loss, 'best_vs_worst': losses.best_vs_worst_dpo_loss}.get(dpo_cfg.mode)
  if fn is None:
    raise ValueError(f'dpo.mode must be one of {MODES}, got {dpo_cfg.mode!r}')
  return fn(*args, beta=dpo_cfg.beta, loss_type=dpo_cfg.loss_type, label_smoothing=dpo_cfg.label_smoothing,
            lengths=batch.get('lengths'))


def reference_logps(graphdef, ref, batch, prompt_len: int):
  """The frozen reference's summed log-probs [B, K] (no gradient)."""
  return jax.lax.stop_gradient(response_logps(nnx.merge(graphdef, ref.params, ref.rest), batch, prompt_len))


def dpo_train_step(graphdef, tx, dpo_cfg, prompt_len: int, state, ref, batch):
  """One AdamW step of DPO. `ref` is the reference's TrainState (run in this step), or None when the batch
  carries precomputed `ref_logps` [B, K]. Returns (state, metrics)."""
  ref_logps = batch['ref_logps'] if ref is None else reference_logps(graphdef, ref, batch, prompt_len)

  def loss_fn(params):
    policy_logps = response_logps(nnx.merge(graphdef, params, state.rest), batch, prompt_len)
    return preference_loss(policy_logps, ref_logps, batch, dpo_cfg)

  (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
          {'loss': loss, **m, 'grad_norm': optax.tree.norm(grads),
           'nonfinite_skipped': state_lib.nonfinite_counts(opt_state)[1]})


def jit_train_step(graphdef, tx, dpo_cfg, prompt_len: int, shardings, ref_shardings, mesh):
  """`dpo_train_step` jitted on the mesh, state donated; `ref_shardings` None for precomputed reference
  log-probs (then call it as step(state, None, batch))."""
  step = lambda s, r, b: dpo_train_step(graphdef, tx, dpo_cfg, prompt_len, s, r, b)  # noqa: E731
  return jax.jit(step, donate_argnums=0, in_shardings=(shardings, ref_shardings, shd.batch_sharding(mesh)),
                 out_shardings=(shardings, shd.replicated(mesh)))


def precompute_ref(graphdef, ref, arrays: dict[str, np.ndarray], prompt_len: int, batch_size: int, mesh,
                   ref_shardings=None) -> np.ndarray:
  """The reference's summed log-probs of every response of `arrays` (`preference_arrays`), once: [N, K]
  float32 (0 for padded responses). The dataset then carries them as `ref_logps` (TRL's
  precompute_ref_log_probs; the DPO authors run the reference every step instead)."""
  fn = jax.jit(lambda r, b: reference_logps(graphdef, r, b, prompt_len),
               in_shardings=(ref_shardings, shd.batch_sharding(mesh)) if ref_shardings is not None else None)
  keys = ('tokens', 'attention_mask', 'ranking', 'valid')
  out = [np.asarray(fn(ref, shd.put_batch({k: b[k] for k in keys}, mesh)))[:n]
         for b, n in batches.padded_batches({k: arrays[k] for k in keys}, batch_size, shd.batch_divisor(mesh))]
  return np.concatenate(out).astype(np.float32)
