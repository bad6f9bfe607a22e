"""Model scoring of responses (contract.md: branch house-core owns this file; this branch carries only the one
function the DPO family needs, with the contract's signature and semantics, so that house-core's file replaces it
at merge).

Layout: `seq`/`att` [B, P+N] hold a left-padded prompt of static length P (`prompt_len`), then a right-padded
response of N slots. Position P-1+t of the decoder predicts response token t.
"""
from __future__ import annotations

import jax.numpy as jnp

from jax_rlhf import rl


def sequence_logps(model, seq, att, prompt_len: int, temperature: float = 1.0):
  """Summed log-prob of each response's real tokens (att[:, prompt_len:] > 0): [B] float32.

  The DPO family's log pi(y|x) (Rafailov et al. 2023, eq. 7): sum_t log pi(y_t | x, y_<t), under logits / T
  (T = 0 means 1). model: a `Transformer` with an LM head; pads (left of the prompt, right of the response)
  are masked out of attention and get positions from the mask, so they change nothing.
  """
  t = float(temperature) if temperature > 0 else 1.0
  h, _ = model.hidden_states(seq[:, :-1], att[:, :-1])  # [B, P+N-1, D]
  logits = model.logits(h[:, prompt_len - 1:]) / t  # [B, N, V] the positions that predict the response
  logp = rl.logprobs_from_logits(logits, seq[:, prompt_len:])  # [B, N]
  real = att[:, prompt_len:] > 0  # [B, N]
  return jnp.sum(jnp.where(real, logp, 0.0), axis=-1).astype(jnp.float32)
