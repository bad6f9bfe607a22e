"""The losses of the stages, as small pure jnp functions (float32 math, jit-able).

  SFT / ptx : token_cross_entropy
  RM        : ranking_loss (K-way Bradley-Terry over all C(K,2) pairs of a prompt; InstructGPT eq. 1),
              soft_ranking_loss (the same with a judge's soft pairwise labels)
  PPO       : clipped_policy_loss, clipped_value_loss (Schulman et al. 2017; Ziegler et al. 2019)
  DPO       : dpo_loss (pairs; sigmoid/cDPO, IPO, SLiC-HF hinge, robust), ranking_dpo_loss (all pairs of a
              K-way ranking), soft_ranking_dpo_loss (all pairs, a judge's soft label each: per-pair cDPO), best_vs_worst_dpo_loss, listwise_dpo_loss (Plackett-Luce; DPO appendix A.3),
              rpo_nll_loss (iterative RPO's NLL on the chosen response, added to a DPO loss)

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


def soft_ranking_loss(rewards, prefs, valid):
  """The reward model's loss on soft pairwise labels (a soft Bradley-Terry target; the cross-entropy form of
  InstructGPT eq. 1 with the label a probability, as RLAIF's distilled RM, Lee et al. 2023, section 2.3):

    loss(b)  = 1/C(k_b,2) sum_{i<j<k_b} -[ P_ij log sigmoid(r_i - r_j) + (1 - P_ij) log sigmoid(r_j - r_i) ]
    loss     = mean over prompts with at least one pair of loss(b)   (each prompt counts once)

  with i, j response indices (not ranks) and P_ij = P(response i beats response j), a judge's soft preference.
  A hard ranking (P_ij = 1 when i is ranked above j, else 0) gives `ranking_loss` with margin 0.

  rewards  # [B, K]; prefs  # [B, K, K] P(i beats j) (only i < j is read); valid  # [B, K] bool, the first k_b
  responses of row b. Returns (loss, metrics): 'accuracy' the expected agreement P_ij [r_i > r_j] +
  (1 - P_ij) [r_j > r_i], 'margin_mean' the mean of (2 P_ij - 1)(r_i - r_j), both per prompt then over prompts.
  """
  rewards = _float(rewards)  # [B, K]
  prefs = _float(prefs)  # [B, K, K]
  k = rewards.shape[-1]
  valid = _valid(valid)  # [B, K]
  r = jnp.where(valid, rewards, 0.0)  # padded garbage never reaches a pair
  diff = r[:, :, None] - r[:, None, :]  # [B, K, K] r_i - r_j
  upper = jnp.triu(jnp.ones((k, k), jnp.bool_), k=1)
  pairs = upper[None] & valid[:, :, None] & valid[:, None, :]  # [B, K, K]
  p = jnp.where(pairs, prefs, 0.5)
  pair_loss = -(p * jax.nn.log_sigmoid(diff) + (1.0 - p) * jax.nn.log_sigmoid(-diff))

  def per_prompt_then_batch(x):
    per_prompt = masked_mean(x, pairs, axis=(1, 2))  # [B]
    return masked_mean(per_prompt, pairs.any(axis=(1, 2)))

  agree = p * (diff > 0).astype(rewards.dtype) + (1.0 - p) * (diff < 0).astype(rewards.dtype)
  metrics = {'accuracy': per_prompt_then_batch(agree), 'margin_mean': per_prompt_then_batch((2 * p - 1) * diff),
             'num_pairs': jnp.sum(pairs.astype(jnp.int32))}
  return per_prompt_then_batch(pair_loss), metrics


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


# ---------------------------------------------------------------------------------------------------------
# DPO family: preference optimisation without a reward model
# ---------------------------------------------------------------------------------------------------------
# Every loss here reads summed response log-probs (`scoring.sequence_logps`) of the policy and the frozen
# reference. s = log pi(y|x) - log pi_ref(y|x) is a response's implicit reward / beta; for a pair,
# Delta = s_w - s_l (w the preferred response). Rafailov et al. 2023 (DPO), eqs. 7 and 18.

DPO_LOSS_TYPES = ('sigmoid', 'ipo', 'ipo_norm', 'hinge', 'robust')


def dpo_pair_losses(delta, *, beta=0.1, loss_type='sigmoid', label_smoothing=0.0):
  """The per-pair loss of each DPO loss_type, from Delta = s_w - s_l (any shape, float32 math):

    sigmoid  : -(1-eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)
               DPO eq. 7 (Rafailov et al. 2023) at eps = 0; conservative DPO (cDPO; Mitchell 2023, the DPO
               authors' code `preference_loss(label_smoothing=...)`) for eps > 0.
    ipo      : (Delta - 1/(2 beta))^2, beta = IPO's tau (Azar et al. 2023, eq. 17), on summed log-ratios as in
               the DPO authors' code (eric-mitchell/direct-preference-optimization `preference_loss(ipo=True)`).
    ipo_norm : the same square on length-normalised log-ratios; the caller passes Delta = s_w/|y_w| - s_l/|y_l|
               (TRL's `ipo`, "agreed with the IPO authors"). `dpo_loss` does that division from its lengths.
    hinge    : max(0, 1 - beta Delta): SLiC-HF's calibration loss (Zhao et al. 2023, arXiv 2305.10425) with the
               reference's log-ratio and margin 1/beta (TRL `hinge`).
    robust   : [-(1-eps) log sigmoid(beta Delta) + eps log sigmoid(-beta Delta)] / (1 - 2 eps): the unbiased
               loss under a label-flip rate eps (Chowdhury et al. 2024, rDPO eq. 6; TRL `robust`), eps < 0.5.

  eps = label_smoothing is used by sigmoid and robust only; any other loss_type refuses eps != 0.
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f'dpo loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}')
  eps = float(label_smoothing)
  if eps and loss_type not in ('sigmoid', 'robust'):
    raise ValueError(f'label_smoothing={eps} has no meaning for loss_type {loss_type!r} (sigmoid or robust only)')
  if not 0.0 <= eps < 0.5:
    raise ValueError(f'label_smoothing must be in [0, 0.5), got {eps}')
  z = beta * _float(delta)
  if loss_type == 'sigmoid':
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  if loss_type in ('ipo', 'ipo_norm'):
    return jnp.square(_float(delta) - 1.0 / (2.0 * beta))
  if loss_type == 'hinge':
    return jax.nn.relu(1.0 - z)
  return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _dpo_pairs(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing, chosen_lengths,
               rejected_lengths):
  """Per-pair (loss, TRL metrics) of pairs given elementwise (any common shape)."""
  chosen, rejected = _float(chosen), _float(rejected)
  s_w = chosen - _float(ref_chosen)  # log-ratios
  s_l = rejected - _float(ref_rejected)
  delta = s_w - s_l
  if loss_type == 'ipo_norm':
    if chosen_lengths is None or rejected_lengths is None:
      raise ValueError("loss_type 'ipo_norm' needs chosen_lengths and rejected_lengths (response tokens)")
    delta = (s_w / jnp.maximum(_float(chosen_lengths), 1.0)) - (s_l / jnp.maximum(_float(rejected_lengths), 1.0))
  loss = dpo_pair_losses(delta, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
  metrics = {
      'rewards/chosen': beta * s_w,
      'rewards/rejected': beta * s_l,
      'rewards/margins': beta * (s_w - s_l),
      'rewards/accuracies': (s_w > s_l).astype(s_w.dtype),
      'logps/chosen': chosen,
      'logps/rejected': rejected,
  }
  return loss, metrics


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, loss_type='sigmoid',
             label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
  """DPO and its pairwise relatives on B chosen/rejected pairs (Rafailov et al. 2023, eq. 7):

    s_w = log pi(y_w|x) - log pi_ref(y_w|x),  s_l likewise,  Delta = s_w - s_l
    loss = mean_b dpo_pair_losses(Delta_b)         (loss_type: sigmoid | ipo | ipo_norm | hinge | robust)

  chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps  # [B] log-probs summed over each
  response's tokens (the DPO authors' `_get_batch_logps(average_log_prob=False)`; TRL). `ipo_norm` also needs
  chosen_lengths / rejected_lengths  # [B] response token counts: Delta = s_w/|y_w| - s_l/|y_l|.
  Returns (loss, metrics) with TRL's meanings (means over the batch): rewards/chosen = beta s_w,
  rewards/rejected = beta s_l, rewards/margins = beta (s_w - s_l), rewards/accuracies = frac(s_w > s_l),
  logps/chosen and logps/rejected = the policy's summed log-probs. The rewards use the summed log-ratios for
  every loss_type. When policy == reference the sigmoid loss is log 2 and every reward is 0.
  """
  loss, m = _dpo_pairs(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
                       label_smoothing, chosen_lengths, rejected_lengths)
  return jnp.mean(loss), {k: jnp.mean(v) for k, v in m.items()}


def _rank_order(x, ranking):
  """x [B, K] reordered best first by ranking [B, K] (indices clipped into range)."""
  k = x.shape[-1]
  ranking = jnp.clip(jnp.asarray(ranking).astype(jnp.int32), 0, k - 1)
  return jnp.take_along_axis(x, ranking, axis=-1)


def ranking_dpo_loss(policy_logps, ref_logps, ranking, valid, *, beta=0.1, loss_type='sigmoid', label_smoothing=0.0,
                     lengths=None):
  """Pairwise DPO over all C(k_b, 2) pairs of each prompt's ranking, weighted as `ranking_loss` weights them
  (InstructGPT's K-way batching, arXiv 2203.02155 sec. 3.5, applied to DPO eq. 7):

    loss(b) = 1/C(k_b,2) sum_{i<j ranks of b} dpo_pair_losses(Delta_(i)(j)),  Delta_(i)(j) = s_(i) - s_(j)
    loss    = mean over prompts with at least one pair of loss(b)     (each prompt counts once)

  policy_logps, ref_logps  # [B, K] summed response log-probs, K padded (padded entries arbitrary);
  ranking  # [B, K] response indices best first; valid  # [B, K] bool, the first k_b positions are real;
  lengths  # [B, K] response token counts (only for loss_type 'ipo_norm').
  metrics: dpo_loss's, as per-prompt means over pairs then means over prompts; 'num_pairs' in the batch.
  """
  valid = _valid(valid)
  k = valid.shape[-1]
  pol = jnp.where(valid, _rank_order(_float(policy_logps), ranking), 0.0)  # [B, K] best first; pads -> 0
  ref = jnp.where(valid, _rank_order(_float(ref_logps), ranking), 0.0)
  lens = None if lengths is None else jnp.where(valid, _rank_order(_float(lengths), ranking), 1.0)
  upper = jnp.triu(jnp.ones((k, k), jnp.bool_), k=1)  # [K, K] rank i beats rank j
  pairs = upper[None] & valid[:, :, None] & valid[:, None, :]  # [B, K, K]
  w = lambda x: None if x is None else x[:, :, None]  # noqa: E731  [B, K, 1]: the better response
  l = lambda x: None if x is None else x[:, None, :]  # noqa: E731  [B, 1, K]: the worse one
  loss, m = _dpo_pairs(w(pol), l(pol), w(ref), l(ref), beta, loss_type, label_smoothing, w(lens), l(lens))

  def per_prompt_then_batch(x):  # [B, K, K] -> scalar
    x = jnp.broadcast_to(x, pairs.shape)
    return masked_mean(masked_mean(x, pairs, axis=(1, 2)), pairs.any(axis=(1, 2)))

  metrics = {name: per_prompt_then_batch(v) for name, v in m.items()}
  metrics['num_pairs'] = jnp.sum(pairs.astype(jnp.int32))
  return per_prompt_then_batch(loss), metrics


def soft_ranking_dpo_loss(policy_logps, ref_logps, prefs, valid, *, beta=0.1):
  """DPO over all C(k_b, 2) pairs of a prompt with a judge's soft label per pair: conservative DPO (cDPO,
  Mitchell 2023; `dpo_pair_losses` sigmoid) with a per-pair label-smoothing eps_ij = 1 - P_ij, i.e.

    loss(b) = 1/C(k_b,2) sum_{i<j<k_b} -[ P_ij log sigmoid(beta Delta_ij) + (1 - P_ij) log sigmoid(-beta Delta_ij) ]
    loss    = mean over prompts with at least one pair of loss(b),     Delta_ij = s_i - s_j

  (s = log pi - log pi_ref of each response, i, j response indices, P_ij = P(i beats j)). Hard labels give
  `ranking_dpo_loss` (sigmoid, eps 0). policy_logps, ref_logps  # [B, K]; prefs  # [B, K, K]; valid  # [B, K].
  Returns (loss, metrics): 'rewards/margins' the mean of beta (2 P_ij - 1) Delta_ij, 'rewards/accuracies' the
  expected agreement of sign(Delta_ij) with the soft label, 'num_pairs'.
  """
  valid = _valid(valid)
  k = valid.shape[-1]
  s = jnp.where(valid, _float(policy_logps) - _float(ref_logps), 0.0)  # [B, K]
  delta = s[:, :, None] - s[:, None, :]  # [B, K, K]
  pairs = jnp.triu(jnp.ones((k, k), jnp.bool_), k=1)[None] & valid[:, :, None] & valid[:, None, :]
  p = jnp.where(pairs, _float(prefs), 0.5)
  z = beta * delta
  pair_loss = -(p * jax.nn.log_sigmoid(z) + (1.0 - p) * jax.nn.log_sigmoid(-z))

  def per_prompt_then_batch(x):
    return masked_mean(masked_mean(x, pairs, axis=(1, 2)), pairs.any(axis=(1, 2)))

  agree = p * (delta > 0).astype(z.dtype) + (1.0 - p) * (delta < 0).astype(z.dtype)
  metrics = {'rewards/margins': per_prompt_then_batch((2 * p - 1) * z), 'rewards/accuracies': per_prompt_then_batch(agree),
             'num_pairs': jnp.sum(pairs.astype(jnp.int32))}
  return per_prompt_then_batch(pair_loss), metrics


def best_vs_worst_dpo_loss(policy_logps, ref_logps, ranking, valid, *, beta=0.1, loss_type='sigmoid',
                           label_smoothing=0.0, lengths=None):
  """DPO on one pair per prompt: its best response (rank 1) against its worst (rank k_b), as RLHFlow's and
  OAIF's online DPO pick them (Xiong et al. 2023, arXiv 2312.11456; Guo et al. 2024, arXiv 2402.04792):

    loss = mean over prompts with k_b >= 2 of dpo_pair_losses(s_(1) - s_(k_b))

  Arguments as `ranking_dpo_loss`; metrics are dpo_loss's over those pairs.
  """
  valid = _valid(valid)
  k = valid.shape[-1]
  n = jnp.sum(valid.astype(jnp.int32), axis=-1)  # [B] k_b
  has_pair = n >= 2  # [B]
  worst = jnp.clip(n - 1, 0, k - 1)[:, None]  # [B, 1] rank position of the worst real response

  def pick(x):  # [B, K] -> (best [B], worst [B]); 0 for prompts without a pair (pads never reach a loss)
    x = _rank_order(_float(x), ranking)  # [B, K] best first
    best, last = x[:, 0], jnp.take_along_axis(x, worst, axis=-1)[:, 0]
    return jnp.where(has_pair, best, 0.0), jnp.where(has_pair, last, 0.0)

  pol_w, pol_l = pick(policy_logps)
  ref_w, ref_l = pick(ref_logps)
  len_w, len_l = (None, None) if lengths is None else pick(lengths)
  loss, m = _dpo_pairs(pol_w, pol_l, ref_w, ref_l, beta, loss_type, label_smoothing, len_w, len_l)
  metrics = {name: masked_mean(v, has_pair) for name, v in m.items()}
  metrics['num_pairs'] = jnp.sum(has_pair.astype(jnp.int32))
  return masked_mean(loss, has_pair), metrics


def listwise_dpo_loss(policy_logps, ref_logps, ranking, valid, *, beta=0.1):
  """K-way DPO under the Plackett-Luce model (Rafailov et al. 2023, appendix A.3, eq. 18):

    loss(b) = -sum_{k=1}^{k_b - 1} log( exp(beta s_(k)) / sum_{j=k}^{k_b} exp(beta s_(j)) )
    loss    = mean over prompts with k_b >= 2 of loss(b)

  s = policy_logps - ref_logps and (k) the k-th best response of prompt b. For k_b = 2 this is DPO's sigmoid
  loss -log sigmoid(beta (s_w - s_l)). Arguments as `ranking_dpo_loss` (policy_logps, ref_logps [B, K];
  ranking, valid [B, K]). metrics: dpo_loss's, over all C(k_b,2) pairs of each ranking (per prompt, then
  over prompts), and 'num_pairs'.
  """
  valid = _valid(valid)
  k = valid.shape[-1]
  pol = jnp.where(valid, _rank_order(_float(policy_logps), ranking), 0.0)  # [B, K] best first
  ref = jnp.where(valid, _rank_order(_float(ref_logps), ranking), 0.0)
  u = beta * (pol - ref)  # [B, K]
  # tail(b, k) = log sum_{j >= k, j real} exp(u_j): a finite floor (not -inf) for pads keeps gradients finite
  tail_mask = jnp.triu(jnp.ones((k, k), jnp.bool_))[None] & valid[:, None, :]  # [B, K(k), K(j)]
  tail = jax.nn.logsumexp(jnp.where(tail_mask, u[:, None, :], -1e30), axis=-1)  # [B, K]
  has_next = valid & jnp.concatenate([valid[:, 1:], jnp.zeros_like(valid[:, :1])], axis=-1)  # [B, K] k < k_b
  per_prompt = -jnp.sum(jnp.where(has_next, u - tail, 0.0), axis=-1)  # [B]
  loss = masked_mean(per_prompt, has_next.any(axis=-1))
  _, metrics = ranking_dpo_loss(policy_logps, ref_logps, ranking, valid, beta=beta)
  return loss, metrics


def rpo_nll_loss(policy_logps, lengths, ranking, valid):
  """Iterative RPO's NLL term (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv 2404.19733,
  eq. 1: L = L_DPO + alpha L_NLL), on the chosen (rank 1) response of each prompt that has a pair:

    L_NLL = mean over prompts with k_b >= 2 of  -log pi(y_w|x) / |y_w|

  policy_logps [B, K] summed log-probs, lengths [B, K] response tokens (EOS included), ranking [B, K] best first,
  valid [B, K] as for `ranking_dpo_loss`. The caller adds alpha x this to its DPO loss (TRL's `rpo_alpha`).
  Returns (loss, {'rpo/nll': loss}).
  """
  valid = _valid(valid)
  has_pair = jnp.sum(valid.astype(jnp.int32), axis=-1) >= 2  # [B]
  best = _rank_order(_float(policy_logps), ranking)[:, 0]  # [B] log pi(y_w|x)
  n_w = jnp.maximum(_rank_order(_float(lengths), ranking)[:, 0], 1.0)  # [B] |y_w|
  loss = masked_mean(-best / n_w, has_pair)
  return loss, {'rpo/nll': loss}

