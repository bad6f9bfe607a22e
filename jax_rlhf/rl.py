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
  logp, ref_logp = _float(logp), _float(ref_logp)
  valid = jnp.broadcast_to(_valid(mask), logp.shape)  # [B, N]
  log_ratio = jnp.where(valid, logp - ref_logp, 0.0)  # [B, N]
  if estimator == 'k1':
    kl = log_ratio
  elif estimator == 'k3':
    kl = jnp.expm1(-log_ratio) + log_ratio
  else:
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")
  kl = jnp.where(valid, kl, 0.0)  # [B, N]
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
