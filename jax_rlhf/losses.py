"""The losses of the three stages, as small pure jnp functions (float32 math, jit-able).

  SFT / ptx : token_cross_entropy
  RM        : ranking_loss (K-way Bradley-Terry over all C(K,2) pairs of a prompt; InstructGPT eq. 1)
  PPO       : clipped_policy_loss, clipped_value_loss (Schulman et al. 2017; Ziegler et al. 2019)

Masks are bool or 0/1 float arrays of the data's shape; masked reductions never divide by zero. Each loss
returns (loss, metrics) or (loss, n_tokens); metrics are flat dicts of scalars.
"""

import jax
import jax.numpy as jnp

from jax_rlhf.rl import _float, _valid, kl_estimate, logprobs_from_logits, masked_mean


def token_cross_entropy(logits, targets, mask):
  """Mean next-token cross-entropy over the masked positions: -sum_t m_t log p(y_t) / max(sum_t m_t, 1).

  logits  # [B, T, V]; targets  # [B, T] already aligned with logits (the caller shifts by one);
  mask  # [B, T] (SFT: response tokens only, InstructGPT; ptx: all real text tokens). float32 math.
  Returns (loss, n_tokens): a scalar mean, and the number of tokens it averages (for token-weighted logging).
  """
  logp = logprobs_from_logits(logits, targets)  # [B, T]
  valid = jnp.broadcast_to(_valid(mask), logp.shape)  # [B, T]
  loss = -masked_mean(logp, valid)
  n_tokens = jnp.sum(valid.astype(jnp.float32))
  return loss, n_tokens


def ranking_loss(rewards, ranking, valid, margin=0.0, centering_coef=0.0):
  """The reward model's K-way ranking loss (InstructGPT eq. 1; Bradley-Terry; TRL RewardTrainer options):

    loss(b)  = 1/C(k_b,2) sum_{i<j ranks of b} [ -log sigmoid(r_(i) - r_(j) - margin)
                                               + centering_coef * (r_(i) + r_(j))^2 ]
    loss     = mean over prompts with at least one pair of loss(b)   (each prompt counts once)

  where r_(i) is the reward of the response ranked i-th (best first). InstructGPT: margin 0, no centring;
  TRL: centering_coef 0.01 (its term is a mean over pairs, hence the per-pair form here). The K=2 case is a
  plain chosen/rejected pair.

  rewards  # [B, K] one scalar per response, K padded to Kmax (padded entries arbitrary);
  ranking  # [B, K] int response indices, best first (padded entries arbitrary);
  valid    # [B, K] bool, which ranking positions are real (the first k_b of row b).
  Returns (loss, metrics): metrics['accuracy'] is the fraction of pairs with r_better > r_worse (strictly)
  and metrics['margin_mean'] the mean r_better - r_worse, both averaged per prompt then over prompts;
  metrics['num_pairs'] is the number of pairs in the batch.
  """
  rewards = _float(rewards)  # [B, K]
  k = rewards.shape[-1]
  ranking = jnp.clip(jnp.asarray(ranking).astype(jnp.int32), 0, k - 1)  # [B, K]
  valid = _valid(valid)  # [B, K]
  r = jnp.take_along_axis(rewards, ranking, axis=-1)  # [B, K] reward of the i-th best response
  r = jnp.where(valid, r, 0.0)  # padded garbage (or NaN) never reaches a pair

  r_better, r_worse = r[:, :, None], r[:, None, :]  # [B, K, 1], [B, 1, K]
  upper = jnp.triu(jnp.ones((k, k), jnp.bool_), k=1)  # [K, K] i < j: rank i beats rank j
  pairs = upper[None] & valid[:, :, None] & valid[:, None, :]  # [B, K, K]
  diff = r_better - r_worse  # [B, K, K]
  pair_loss = -jax.nn.log_sigmoid(diff - margin) + centering_coef * jnp.square(r_better + r_worse)

  def per_prompt_then_batch(x):  # [B, K, K] -> scalar: mean over each prompt's pairs, then over prompts
    per_prompt = masked_mean(x, pairs, axis=(1, 2))  # [B]
    has_pairs = pairs.any(axis=(1, 2))  # [B]
    return masked_mean(per_prompt, has_pairs)

  loss = per_prompt_then_batch(pair_loss)
  metrics = {
      'accuracy': per_prompt_then_batch((diff > 0).astype(rewards.dtype)),
      'margin_mean': per_prompt_then_batch(diff),
      'num_pairs': jnp.sum(pairs.astype(jnp.int32)),
  }
  return loss, metrics


def clipped_policy_loss(logp, old_logp, advantages, mask, clip=0.2):
  """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), per token, as a loss to minimise:

    ratio_t = exp(logp_t - old_logp_t)
    L       = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - c, 1 + c))     (c = 0.2: Ziegler; N+)

  The mean is over all valid tokens of the (mini)batch. logp, old_logp, advantages, mask  # [B, N];
  old_logp and advantages are frozen once per batch (so the ratio is exactly 1 on the first minibatch).
  metrics: clipfrac (fraction of valid tokens where the clipped term is strictly larger, i.e. clipping acts),
  approx_kl (mean of 0.5 (logp - old_logp)^2, as TRL), ratio_mean.
  """
  logp, old_logp, advantages = _float(logp), _float(old_logp), _float(advantages)
  valid = jnp.broadcast_to(_valid(mask), logp.shape)  # [B, N]
  log_ratio = jnp.where(valid, logp - old_logp, 0.0)  # [B, N]; 0 on pads so exp never overflows there
  ratio = jnp.exp(log_ratio)  # [B, N]
  advantages = jnp.where(valid, advantages, 0.0)  # [B, N]
  unclipped = -advantages * ratio  # [B, N]
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)  # [B, N]
  loss = masked_mean(jnp.maximum(unclipped, clipped), valid)
  metrics = {
      'clipfrac': masked_mean((clipped > unclipped).astype(logp.dtype), valid),
      'approx_kl': masked_mean(0.5 * jnp.square(log_ratio), valid),
      'ratio_mean': masked_mean(ratio, valid),
  }
  return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# GRPO family: asymmetric clip, token / sequence / constant aggregation, GSPO's sequence ratio, KL in the loss
# ---------------------------------------------------------------------------------------------------------


def grpo_policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, aggregation='token',
                     constant_len=None, ratio_level='token', ref_logp=None, beta=0.0, kl_kind='k3'):
  """The critic-free clipped surrogate of the GRPO family, per token, as a loss to minimise:

    ratio_t  = exp(logp_t - old_logp_t)                                    ratio_level='token' (PPO, GRPO)
    ratio_t  = exp(1/|o| sum_s (logp_s - old_logp_s))  for every t        ratio_level='sequence' (GSPO,
                                                                           Zheng et al. 2025, eq. 7)
    l_t      = max(-A ratio_t, -A clip(ratio_t, 1 - clip_low, 1 + clip_high)) + beta * kl_t
                                                                           (DeepSeekMath eq. 3; DAPO eq. 8)
    kl_t     = kl_estimate(logp_t, ref_logp_t, kl_kind)                   (k3: DeepSeekMath eq. 4)

  aggregated over the valid tokens of the (mini)batch by `aggregation`:
    'token'    : sum_{i,t} l_t / sum_i |o_i|                   token mean (DAPO eq. 8; TRL loss_type 'dapo')
    'sequence' : mean_i (1/|o_i| sum_t l_t)                    per-response mean, then over responses with at
                                                               least one token (DeepSeekMath eq. 3; TRL 'grpo')
    'constant' : sum_{i,t} l_t / (B * L)                       L = constant_len (default N, the padded
                                                               length): Dr. GRPO (Liu et al. 2025; TRL 'dr_grpo')

  DAPO: clip_low 0.2, clip_high 0.28; GSPO: 3e-4 / 4e-4 with ratio_level='sequence'. With clip_low ==
  clip_high, ratio_level='token', aggregation='token' and beta 0 this is `clipped_policy_loss`.

  logp, old_logp, mask  # [B, N]; advantages  # [B] (one per response, broadcast to its tokens) or [B, N];
  ref_logp  # [B, N] or None (no KL term); beta: scalar, may be traced (the adaptive controller's).
  metrics (token means over valid tokens): clipfrac_low (ratio < 1 - clip_low where A < 0: the lower clip
  acts, as TRL), clipfrac_high (ratio > 1 + clip_high where A > 0), clipfrac (their sum), approx_kl
  (0.5 (logp - old_logp)^2), ratio_mean, kl (mean kl_t; 0 without ref_logp).
  """
  logp, old_logp, advantages = _float(logp), _float(old_logp), _float(advantages)
  valid = jnp.broadcast_to(_valid(mask), logp.shape)  # [B, N]
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = jnp.where(valid, jnp.broadcast_to(advantages, logp.shape), 0.0)  # [B, N]
  log_ratio = jnp.where(valid, logp - old_logp, 0.0)  # [B, N]; 0 on pads so exp never overflows there
  if ratio_level == 'token':
    ratio = jnp.exp(log_ratio)  # [B, N]
  elif ratio_level == 'sequence':
    seq_log_ratio = masked_mean(log_ratio, valid, axis=1)  # [B]
    ratio = jnp.broadcast_to(jnp.exp(seq_log_ratio)[:, None], logp.shape)  # [B, N]
  else:
    raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
  unclipped = -advantages * ratio  # [B, N]
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, N]
  per_token = jnp.maximum(unclipped, clipped)  # [B, N]
  if ref_logp is not None:
    kl = kl_estimate(logp, ref_logp, kl_kind, mask=valid)  # [B, N]
    per_token = per_token + jnp.asarray(beta, per_token.dtype) * kl
  else:
    kl = jnp.zeros_like(per_token)

  if aggregation == 'token':
    loss = masked_mean(per_token, valid)
  elif aggregation == 'sequence':
    per_seq = masked_mean(per_token, valid, axis=1)  # [B]
    loss = masked_mean(per_seq, valid.any(axis=1))
  elif aggregation == 'constant':
    length = logp.shape[1] if constant_len is None else constant_len
    loss = jnp.sum(jnp.where(valid, per_token, 0.0)) / (logp.shape[0] * length)
  else:
    raise ValueError(f"aggregation must be 'token', 'sequence' or 'constant', got {aggregation!r}")

  low = ((ratio < 1.0 - clip_low) & (advantages < 0)).astype(logp.dtype)
  high = ((ratio > 1.0 + clip_high) & (advantages > 0)).astype(logp.dtype)
  metrics = {
      'clipfrac_low': masked_mean(low, valid),
      'clipfrac_high': masked_mean(high, valid),
      'clipfrac': masked_mean(low + high, valid),
      'approx_kl': masked_mean(0.5 * jnp.square(log_ratio), valid),
      'ratio_mean': masked_mean(ratio, valid),
      'kl': masked_mean(kl, valid),
  }
  return loss, metrics


def clipped_value_loss(values, old_values, returns, mask, clip=0.2):
  """PPO's clipped value loss (Ziegler et al. 2019; N+ #20; as OpenAI baselines):

    V^clip_t = old_V_t + clip(V_t - old_V_t, -c, c)
    L        = 0.5 * mean_t max((V_t - R_t)^2, (V^clip_t - R_t)^2)       (c = 0.2)

  values, old_values, returns, mask  # [B, N]; the mean is over all valid tokens.
  metrics: vf_clipfrac (fraction of valid tokens where the clipped error is strictly larger),
  value_error (mean (V - R)^2, unclipped).
  """
  values, old_values, returns = _float(values), _float(old_values), _float(returns)
  valid = jnp.broadcast_to(_valid(mask), values.shape)  # [B, N]
  values = jnp.where(valid, values, 0.0)
  old_values = jnp.where(valid, old_values, 0.0)
  returns = jnp.where(valid, returns, 0.0)
  values_clipped = old_values + jnp.clip(values - old_values, -clip, clip)  # [B, N]
  err = jnp.square(values - returns)  # [B, N]
  err_clipped = jnp.square(values_clipped - returns)  # [B, N]
  loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), valid)
  metrics = {
      'vf_clipfrac': masked_mean((err_clipped > err).astype(values.dtype), valid),
      'value_error': masked_mean(err, valid),
  }
  return loss, metrics
