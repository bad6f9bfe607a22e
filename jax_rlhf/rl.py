"""The RL arithmetic of PPO for language models, as small pure jnp functions.

Each equation lives in exactly one function named after it, with its source:
masked statistics and whitening (Ziegler et al. 2019), GAE (Schulman et al. 2016), the KL-shaped per-token
reward (InstructGPT eq. 2; Ziegler et al. 2019) and the KL controllers (Ziegler et al. 2019).

Conventions shared by every function here:
  * B is the batch, N the response length; `mask  # [B, N]` is bool or 0/1 float, True on real tokens.
    Response masks are right-padded (real tokens, then pads).
  * Entries at masked positions may hold anything (even NaN); they never reach a result, and results are 0
    there.
  * Masked reductions divide by max(count, 1), so an all-pad batch gives 0, never NaN.
  * Math is in float32 at least (bf16 inputs are upcast); float64 inputs stay float64.
  * Everything is jit-able: no Python control flow on array values (string/flag arguments are static).
"""

import jax
import jax.numpy as jnp


def _float(x):
  """x as a float array of at least float32 precision."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _valid(mask):
  """A bool view of a bool or 0/1 float mask."""
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


# ---------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------


def masked_sum(x, mask, axis=None):
  """sum_i mask_i * x_i over `axis` (all axes if None); masked entries contribute exactly 0, even NaN."""
  x = _float(x)
  m = jnp.broadcast_to(jnp.asarray(mask).astype(x.dtype), x.shape)
  return jnp.sum(jnp.where(m != 0, x * m, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
  """sum_i mask_i x_i / max(sum_i mask_i, 1): the mean over valid entries; 0 where none is valid."""
  x = _float(x)
  m = jnp.broadcast_to(jnp.asarray(mask).astype(x.dtype), x.shape)
  count = jnp.sum(m, axis=axis)
  return masked_sum(x, m, axis) / jnp.maximum(count, 1.0)


def masked_var(x, mask, unbiased=False):
  """Variance of the valid entries (over all axes): mean_i (x_i - mean)^2.

  Biased (divide by n) by default, as in Ziegler et al.'s whitening; `unbiased=True` multiplies by
  n / max(n - 1, 1) (Bessel's correction, as TRL's masked_var).
  """
  x = _float(x)
  m = jnp.broadcast_to(jnp.asarray(mask).astype(x.dtype), x.shape)
  mean = masked_mean(x, m)
  var = masked_mean(jnp.square(x - mean), m)
  if unbiased:  # static flag
    n = jnp.sum(m)
    var = var * n / jnp.maximum(n - 1.0, 1.0)
  return var


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
  """Whitening over the valid entries (all axes): (x - mean) / sqrt(var + eps), biased var.

  Source: Ziegler et al. 2019 (lm-human-preferences `whiten`); N+ #25 (advantages).
  With shift_mean=False the mean is added back, x' = (x - mean) / sqrt(var + eps) + mean: scale only,
  used to whiten rewards without moving their mean (Ziegler; N+ #24). Invalid entries are returned as 0.
  """
  x = _float(x)
  valid = jnp.broadcast_to(_valid(mask), x.shape)
  mean = masked_mean(x, valid)
  var = masked_var(x, valid)
  white = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:  # static flag
    white = white + mean
  return jnp.where(valid, white, 0.0)


# ---------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
  """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16), as a backward `lax.scan` over N.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t            (the value targets, "returns")

  rewards, values  # [B, N] per response token; mask  # [B, N] right-padded response mask.
  The episode ends at the last valid token: V and A after it are 0 (bootstrap 0), so the terminal step is
  delta = r_T - V_T. Ziegler et al. and N+ use gamma = 1, lam = 0.95.
  Returns (advantages, returns), both [B, N] and 0 at invalid positions (rewards and values there are ignored).
  """
  rewards, values = _float(rewards), _float(values)
  dtype = jnp.promote_types(rewards.dtype, values.dtype)
  valid = jnp.broadcast_to(_valid(mask), rewards.shape)
  m = valid.astype(dtype)  # [B, N]
  r = jnp.where(valid, rewards, 0.0).astype(dtype)  # [B, N]
  v = jnp.where(valid, values, 0.0).astype(dtype)  # [B, N]

  def step(carry, xs):
    next_value, next_adv = carry  # [B], [B]: V_{t+1}, A_{t+1} (0 past the last valid token)
    r_t, v_t, m_t = xs  # [B] each
    delta = r_t + gamma * next_value - v_t
    adv = (delta + gamma * lam * next_adv) * m_t
    return (v_t, adv), adv

  zeros = jnp.zeros(r.shape[:1], dtype)  # [B]
  _, adv_t = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)  # [N, B]
  advantages = adv_t.T  # [B, N]
  returns = jnp.where(valid, advantages + v, 0.0)  # [B, N]
  return advantages, returns


# ---------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------


def kl_shaped_rewards(logp, ref_logp, score, mask, beta, estimator='k1'):
  """Per-token reward with a KL penalty to the reference policy (InstructGPT eq. 2; Ziegler et al. 2019):

    r_t = -beta * kl_t  +  [t == last valid token] * score

  kl_t per token, from the sampled tokens' log-probs (Schulman, "Approximating KL divergence", 2020):
    k1 = logp - ref_logp                                        (default; TRL, N+)
    k3 = (exp(ref_logp - logp) - 1) - (ref_logp - logp)         (>= 0, lower variance)

  logp, ref_logp  # [B, N]; score  # [B] RM score of each response (read at its EOS); mask  # [B, N];
  beta: scalar KL coefficient (may be traced). Returns (rewards, kl), both [B, N], 0 at invalid positions.
  A row with no valid token gets no score.
  """
  from jax_rlhf.models.scoring import last_real_index  # scoring imports this module
  if estimator not in ('k1', 'k3'):
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")
  valid = jnp.broadcast_to(_valid(mask), jnp.shape(logp))  # [B, N]
  kl = kl_estimate(logp, ref_logp, estimator, mask=valid)  # [B, N], 0 at invalid positions
  rewards = -jnp.asarray(beta, kl.dtype) * kl  # [B, N]
  is_last = jax.nn.one_hot(last_real_index(valid), valid.shape[-1], dtype=jnp.bool_)  # [B, N]
  is_last = is_last & valid.any(axis=-1, keepdims=True)  # [B, N]; rows without tokens get no score
  score = _float(score).astype(rewards.dtype)  # [B]
  rewards = rewards + jnp.where(is_last, score[:, None], 0.0)
  return rewards, kl


# ---------------------------------------------------------------------------------------------------------
# KL controllers (pure functions of a scalar beta; the trainer keeps beta in its state)
# ---------------------------------------------------------------------------------------------------------


def fixed_kl_update(beta, kl, n_steps):
  """Fixed KL coefficient: beta stays (InstructGPT beta = 0.02; N+ 0.05). Same signature as the adaptive one."""
  del kl, n_steps
  return beta


def adaptive_kl_update(beta, kl, n_steps, target, horizon):
  """Adaptive KL controller (Ziegler et al. 2019, sec. 2.2; lm-human-preferences AdaptiveKLController):

    e = clip(KL / target - 1, -0.2, 0.2)
    beta <- beta * (1 + e * n_steps / horizon)

  kl: the measured KL of the batch (sum over response tokens, mean over episodes, in the paper);
  n_steps: episodes in the batch; Ziegler: beta init 0.15, target 6 nats, horizon 10000.
  """
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return beta * (1.0 + error * n_steps / horizon)


# ---------------------------------------------------------------------------------------------------------
# Log-probs and entropy from logits
# ---------------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits, tokens):
  """log p(token_t) = log_softmax(logits_t)[token_t], in float32: logits [B, T, V], tokens [B, T] -> [B, T].

  The caller divides logits by the sampling temperature first (Ziegler; N+) and aligns tokens to logits.
  """
  logp_all = jax.nn.log_softmax(_float(logits), axis=-1)  # [B, T, V]
  tokens = jnp.asarray(tokens).astype(jnp.int32)
  return jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]  # [B, T]


def entropy_from_logits(logits):
  """H_t = -sum_v p_v log p_v, in float32: logits [B, T, V] -> [B, T]. Logits of -inf (banned tokens) add 0."""
  logp = jax.nn.log_softmax(_float(logits), axis=-1)  # [B, T, V]
  p = jnp.exp(logp)  # [B, T, V]
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)  # [B, T]


# ---------------------------------------------------------------------------------------------------------
# Critic-free RL (GRPO family): KL estimators, group / leave-one-out / REINFORCE++ advantages, loss-side beta
#
# Rewards of a rollout with G samples per prompt are [B] group-major: row i belongs to group i // G, so
# `rewards.reshape(B // G, G)` puts each prompt's G samples on one row.
# ---------------------------------------------------------------------------------------------------------


def kl_estimate(logp, ref_logp, kind='k3', mask=None):
  """Per-token estimators of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman, "Approximating
  KL divergence", 2020; d = logp - ref_logp, the tokens drawn from pi):

    k1 = d                                   (unbiased, can be negative; InstructGPT's reward KL)
    k2 = 1/2 d^2                             (biased, >= 0, low variance)
    k3 = exp(-d) - 1 + d                     (unbiased, >= 0; DeepSeekMath eq. 4, TRL's GRPO loss KL)

  k3 is computed as expm1(-d) + d (exactly `kl_shaped_rewards`' float ops). logp, ref_logp  # [B, N] (any
  equal shapes); mask  # [B, N] or None: with a mask, d is 0 at invalid positions before the estimator (so
  garbage there never overflows) and the result is 0 there. Returns [B, N], float32 at least.
  """
  logp, ref_logp = _float(logp), _float(ref_logp)
  if mask is None:
    log_ratio = logp - ref_logp
  else:
    valid = jnp.broadcast_to(_valid(mask), logp.shape)
    log_ratio = jnp.where(valid, logp - ref_logp, 0.0)
  if kind == 'k1':
    kl = log_ratio
  elif kind == 'k2':
    kl = 0.5 * jnp.square(log_ratio)
  elif kind == 'k3':
    kl = jnp.expm1(-log_ratio) + log_ratio
  else:
    raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3', got {kind!r}")
  if mask is not None:
    kl = jnp.where(valid, kl, 0.0)
  return kl


def _groups(rewards, group_size):
  """rewards [B] -> [B // G, G] (group-major rows), checking that G divides B (static shapes)."""
  rewards = _float(rewards)
  if rewards.ndim != 1:
    raise ValueError(f'rewards must be [B], got shape {rewards.shape}')
  b = rewards.shape[0]
  if group_size < 1 or b % group_size:
    raise ValueError(f'group_size {group_size} must be >= 1 and divide the batch {b}')
  return rewards.reshape(b // group_size, group_size)


def group_advantages(rewards, group_size, *, scale='group', eps=1e-4):
  """GRPO's outcome advantage (DeepSeekMath sec. 4.1.2, "outcome supervision"), one scalar per response:

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)           scale='group'  (DeepSeekMath; TRL default)
    A_i = (r_i - mean_g(r)) / (std_B(r) + eps)           scale='batch'  (TRL scale_rewards='batch')
    A_i =  r_i - mean_g(r)                               scale='none'   (Dr. GRPO, Liu et al. 2025)

  mean_g, std_g over the G samples of response i's prompt; std with Bessel's correction (divide by G - 1, as
  torch.std in TRL; a group of one has std 0); std_B the Bessel std of the whole batch. eps = 1e-4 as TRL.
  rewards  # [B] group-major (row i in group i // G). Returns [B]; a group whose rewards are all equal gets
  advantage 0 on each of its rows (whatever the scale).
  """
  r = _groups(rewards, group_size)  # [B/G, G]
  g = group_size
  centred = r - jnp.mean(r, axis=1, keepdims=True)  # [B/G, G]
  if scale == 'group':
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / max(g - 1, 1))  # [B/G, 1]
  elif scale == 'batch':
    flat = r.reshape(-1)
    n = flat.shape[0]
    std = jnp.sqrt(jnp.sum(jnp.square(flat - jnp.mean(flat))) / max(n - 1, 1))  # []
  elif scale == 'none':
    return centred.reshape(-1)
  else:
    raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
  return (centred / (std + eps)).reshape(-1)


def rloo_advantages(rewards, group_size):
  """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, eq. 6; TRL RLOOTrainer):

    A_i = r_i - 1/(G-1) sum_{j in group(i), j != i} r_j  =  G/(G-1) (r_i - mean_g(r))

  computed in the first form (the group sum minus r_i). rewards  # [B] group-major; G >= 2. Returns [B].
  """
  if group_size < 2:
    raise ValueError(f'rloo_advantages needs group_size >= 2, got {group_size}')
  r = _groups(rewards, group_size)  # [B/G, G]
  others = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)  # [B/G, G]
  return (r - others).reshape(-1)


def reinforce_pp_advantages(logp, ref_logp, score, mask, beta, *, group_size=None, kl_kind='k1', gamma=1.0,
                            eps=1e-8):
  """REINFORCE++ (Hu 2025, arXiv 2501.03262; verl `compute_reinforce_plus_plus_outcome_advantage` and
  `..._baseline_...`): the KL penalty goes into the per-token reward, no critic, whitening over the batch.

    r_t = -beta * kl_t + [t == last] * score                 (kl_shaped_rewards, estimator kl_kind)
    without a group (group_size=None):
      G_t = sum_{s >= t} gamma^(s-t) r_s                     (return to go)
      A_t = (G_t - mean) / sqrt(var + eps)                   mean/var over the batch's valid tokens
    with a group baseline (REINFORCE++-baseline, group_size=G):
      R_i = sum_t r_t - mean_{j in group(i)} sum_t r_t       (the whole response's return, minus its group's)
      A_t = whiten(R_i broadcast to the tokens of response i)

  var is Bessel-corrected, as verl's masked_whiten (ours `masked_whiten` is biased, Ziegler's). logp,
  ref_logp, mask  # [B, N]; score  # [B] (read at EOS); beta scalar (may be traced); gamma static.
  Returns (advantages, kl): both [B, N], 0 at invalid positions.
  """
  rewards, kl = kl_shaped_rewards(logp, ref_logp, score, mask, beta, kl_kind)  # [B, N] each
  valid = jnp.broadcast_to(_valid(mask), rewards.shape)  # [B, N]
  if group_size is None:
    def step(running, r_t):  # r_t [B]; rewards past the last valid token are 0, so no reset is needed
      running = r_t + gamma * running
      return running, running
    _, ret_t = jax.lax.scan(step, jnp.zeros(rewards.shape[:1], rewards.dtype), rewards.T, reverse=True)
    returns = ret_t.T  # [B, N]
  else:
    total = jnp.sum(rewards, axis=1)  # [B]
    centred = group_advantages(total, group_size, scale='none')  # [B]
    returns = jnp.broadcast_to(centred[:, None], rewards.shape)  # [B, N]
  mean = masked_mean(returns, valid)
  var = masked_var(returns, valid, unbiased=True)
  advantages = jnp.where(valid, (returns - mean) * jax.lax.rsqrt(var + eps), 0.0)
  return advantages, kl


def adaptive_loss_beta_update(beta, kl, n_steps, target, horizon):
  """Adaptive coefficient of the loss-side KL penalty (GRPO's beta * kl in the loss), with Ziegler et al.'s
  proportional rule (2019, sec. 2.2) moved from the reward to the loss:

    e    = clip(KL / target - 1, -0.2, 0.2)
    beta <- beta * (1 + e * n_steps / horizon)

  KL here is what the loss penalises: the token mean of the chosen estimator (k3 by default) over the
  rollout's valid tokens, so `target` is in nats per token (not per response, as PPO's reward-side
  controller). n_steps: responses in the rollout. No library ships this (TRL, tunix: fixed beta; verl: only
  for the reward-side KL). A beta of 0 stays 0, so start from beta > 0.
  """
  return adaptive_kl_update(beta, kl, n_steps, target, horizon)
