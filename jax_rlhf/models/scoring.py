"""Model scoring of responses, each rule written once: PPO, eval, labelling and the coming algorithms call these.

Layout everywhere: `seq`/`att` [B, P+N] hold a left-padded prompt of static length P (`prompt_len`), then a
right-padded response of N slots. Position P-1+t of the decoder predicts response token t, so a forward of
`seq[:, :-1]` gives the N predicting positions as `h[:, P-1:]`. All functions are pure (jit inside a caller).
"""
from __future__ import annotations

import jax.numpy as jnp

from jax_rlhf import rl


def effective_temperature(t: float) -> float:
  """The temperature the log-probs of samples use: T itself, and 1 for greedy decoding (T = 0, an argmax has
  no distribution of its own; Ziegler et al. and N+ score samples under logits / T)."""
  t = float(t)
  return t if t > 0 else 1.0


def response_forward(model, seq, att, prompt_len: int):
  """Final hidden states of the positions that predict the response tokens: [B, N, D]."""
  h, _ = model.hidden_states(seq[:, :-1], att[:, :-1])  # [B, P+N-1, D]
  return h[:, prompt_len - 1:]


def response_logprobs(model, seq, att, prompt_len: int, temperature: float):
  """log p(token_t) of each response token under logits / T, and those logits: ([B, N] f32, [B, N, V]).

  model: a `Transformer` with an LM head. T goes through `effective_temperature` (0 means 1). Pads get a
  number too: mask them with att[:, prompt_len:].
  """
  logits = model.logits(response_forward(model, seq, att, prompt_len))  # [B, N, V]
  logits = logits / effective_temperature(temperature)
  return rl.logprobs_from_logits(logits, seq[:, prompt_len:]), logits


def sequence_logps(model, seq, att, prompt_len: int, temperature: float = 1.0):
  """Summed log-prob of each response's real tokens (att[:, prompt_len:] > 0): [B] float32.

  The DPO family's log pi(y|x) (Rafailov et al. 2023, eq. 7): sum_t log pi(y_t | x, y_<t).
  """
  logp, _ = response_logprobs(model, seq, att, prompt_len, temperature)  # [B, N]
  real = att[:, prompt_len:] > 0  # [B, N]
  return jnp.sum(jnp.where(real, logp, 0.0), axis=-1).astype(jnp.float32)


def response_values(value_model, seq, att, prompt_len: int):
  """V(s_t) for each response token t (the state before it is generated): [B, N] float32.

  value_model: a `ScalarModel` (decoder body + scalar head).
  """
  return value_model.head(response_forward(value_model.transformer, seq, att, prompt_len))


def last_real_index(mask):
  """Index of the last real token of each row: mask [B, T] (bool, int or float) -> [B] int32.

  The one copy (`rl.kl_shaped_rewards`, `ScalarModel.score` and the RM's losses call it). The largest index
  where mask is nonzero, so it works for right-padded rows and for left-padded prompt +
  right-padded response rows. A row with no real token gives 0: check `mask.any(-1)` before using it.
  """
  valid = jnp.asarray(mask) != 0  # [B, T]
  positions = jnp.arange(valid.shape[-1], dtype=jnp.int32)  # [T]
  return jnp.max(jnp.where(valid, positions, 0), axis=-1)  # [B]


def at_last_real(x, mask):
  """x[b, last_real_index(mask)[b]] for x [B, T]: [B]. A row with no real token gives x[b, 0]."""
  return jnp.take_along_axis(x, last_real_index(mask)[:, None], axis=-1)[:, 0]


def reward_at_last(reward_model, seq, att):
  """A scalar model's score of each row, read at its last real token (the EOS; never a pad, N+ #12): [B].

  reward_model: a `ScalarModel`; seq/att [B, T], left- or right-padded.
  """
  values = reward_model(seq, att)  # [B, T] float32
  return at_last_real(values, att)
