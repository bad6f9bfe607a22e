"""PPOTrainer (experience + update) on tiny random models, against float64 numpy references.

Three trainers are compiled once per module and shared (compiles dominate the cost on a CPU):
  * `lr_run` on a (data=2, fsdp=2, model=2) mesh and on a (1, 1, 1) mesh, same models and config, lr > 0;
  * `frozen_run` with lr = 0, the reference built from the policy's weights, and PPO-ptx on.
Vocabulary 16 so that a random policy ends some of its 6-token responses with EOS and not others.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_rlhf import sharding as shd
from jax_rlhf.config import stage_config
from jax_rlhf.data import batches
from jax_rlhf.models.heads import ScalarModel
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset
from jax_rlhf.train import ppo

EOS, PAD = 0, 1
VOCAB = 16
B, P, N = 8, 8, 6  # prompts per batch, prompt slots, response tokens
BETA = 0.1
CFG = preset('tiny', vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS)


def make_config(lr=3e-3, value_lr=3e-3, ptx_coef=0.0, temperature=0.7):
  c = stage_config('ppo', 'quick')
  c.data.max_prompt_len = P
  c.ppo.update(batch_size=B, max_new_tokens=N, ppo_epochs=2, num_minibatches=2, temperature=temperature)
  c.ppo.policy_optimizer.lr = lr
  c.ppo.value_optimizer.lr = value_lr
  c.ppo.ptx.update(coef=ptx_coef, batch_size=B // 2)
  return c


def make_models(policy_seed=0, value_seed=1, ref_seed=2, reward_seed=3):
  """Fresh models each call (the trainer donates the policy/value buffers it is given): {policy, value,
  reference, reward}."""
  return {'policy': Transformer(CFG, rngs=nnx.Rngs(policy_seed)), 'value': ScalarModel(CFG, rngs=nnx.Rngs(value_seed)),
          'reference': Transformer(CFG, rngs=nnx.Rngs(ref_seed)),
          'reward': ScalarModel(CFG, rngs=nnx.Rngs(reward_seed))}


def make_prompts(seed=0):
  """Left-padded prompts [B, P] of 2..P tokens that never contain EOS or pad."""
  rng = np.random.default_rng(seed)
  rows = [list(rng.integers(2, VOCAB, size=int(rng.integers(2, P + 1)))) for _ in range(B)]
  rows[0] = list(rng.integers(2, VOCAB, size=P))  # one full row
  prompt, mask = batches.pad_left(rows, P, PAD)
  return {'prompt': prompt, 'prompt_mask': mask}


def make_ptx(mesh, config, seed=0):
  pc = config.ppo
  n = pc.ppo_epochs * pc.num_minibatches
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, VOCAB, size=(n * pc.ptx.batch_size, 12)).astype(np.int32)
  arrays = {'tokens': tokens, 'attention_mask': np.ones_like(tokens), 'loss_mask': np.ones_like(tokens)}
  return ppo.ptx_batch(arrays, n, mesh), arrays


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def run_trainer(mesh_shape, config, models, *, ptx=False, experience_first=True):
  """Build a PPOTrainer on a mesh of prod(mesh_shape) devices, optionally take one experience batch from the
  initial states (key 1), then run one `step` (key 0). Returns a dict of host values."""
  n = int(np.prod(mesh_shape))
  mesh = shd.make_mesh(mesh_shape, devices=jax.devices()[:n])
  trainer = ppo.PPOTrainer(config, mesh, models, (EOS, PAD))
  prompts = shd.put_batch(make_prompts(), mesh)
  out = {'trainer': trainer}
  st = trainer.states
  out['params_before'] = host(st['policy'].params)
  out['value_params_before'] = host(st['value'].params)
  if experience_first:
    exp, em = trainer.experience(st, prompts, jax.random.key(1), jnp.float32(BETA))
    out['exp'], out['exp_metrics'] = host(exp), host(em)
  ptx_batch = None
  if ptx:
    ptx_batch, out['ptx_host'] = make_ptx(mesh, config)
  out['metrics'] = host(trainer.step(prompts, ptx_batch, jax.random.key(0), BETA))
  out['params_after'] = host(trainer.states['policy'].params)
  out['value_params_after'] = host(trainer.states['value'].params)
  return out


@pytest.fixture(scope='module')
def lr_run():
  config = make_config()
  return {shape: run_trainer(shape, config, make_models()) for shape in ((2, 2, 2), (1, 1, 1))}


@pytest.fixture(scope='module')
def frozen_run():
  config = make_config(lr=0.0, value_lr=0.0, ptx_coef=2.0)
  models = make_models(ref_seed=0)  # reference = the policy's weights
  return run_trainer((1, 1, 1), config, models, ptx=True)


# ---------------------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------------------


def log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@nnx.jit
def forward(model, tokens, mask):
  """The model's own full forward (LM logits [B, T, V] or per-token scalars [B, T]), no padding tricks."""
  return model(tokens, mask)


def ref_response_logp(model, seq, att, temperature):
  """log p(token) of the response tokens under logits / T, from one full forward, in float64."""
  logits = np.asarray(forward(model, jnp.asarray(seq), jnp.asarray(att)), np.float64)  # [B, P+N, V]
  lp = log_softmax64(logits[:, P - 1:-1] / temperature)  # position P-1+t predicts token P+t
  return np.take_along_axis(lp, seq[:, P:, None], -1)[..., 0]  # [B, N]


def ref_score(reward_model, seq, att):
  """The RM's per-token output at each row's last real token (a Python loop over rows)."""
  per_token = np.asarray(forward(reward_model, jnp.asarray(seq), jnp.asarray(att)), np.float64)  # [B, T]
  out = np.zeros(len(seq))
  for i in range(len(seq)):
    last = max(t for t in range(seq.shape[1]) if att[i, t])
    out[i] = per_token[i, last]
  return out


def ref_advantages(logp, ref_logp, values, score, mask, beta, gamma, lam, eps=1e-8):
  """KL-shaped rewards, GAE and whitening as plain float64 loops. Returns (advantages, returns)."""
  b, n = logp.shape
  adv = np.zeros((b, n))
  ret = np.zeros((b, n))
  for i in range(b):
    length = int(mask[i].sum())
    rewards = [-beta * (logp[i, t] - ref_logp[i, t]) for t in range(length)]
    rewards[-1] += score[i]
    last = 0.0
    for t in reversed(range(length)):
      next_v = values[i, t + 1] if t + 1 < length else 0.0
      last = rewards[t] + gamma * next_v - values[i, t] + gamma * lam * last
      adv[i, t] = last
      ret[i, t] = last + values[i, t]
  valid = [adv[i, t] for i in range(b) for t in range(n) if mask[i, t]]
  mean = sum(valid) / len(valid)
  var = sum((v - mean) ** 2 for v in valid) / len(valid)
  white = np.where(mask > 0, (adv - mean) / math.sqrt(var + eps), 0.0)
  return white, ret


def eos_rows(exp):
  tokens = exp['seq'][:, P:]
  return np.array([any(t == EOS and m for t, m in zip(tr, mr)) for tr, mr in zip(tokens, exp['mask'])])


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(2, 2, 2), (1, 1, 1)], ids=['mesh222', 'mesh111'])
def test_ratio_is_one_and_clipfrac_zero_on_first_minibatch(lr_run, shape):
  m = lr_run[shape]['metrics']
  assert abs(float(m['first_ratio_mean']) - 1.0) < 1e-5, m['first_ratio_mean']
  assert float(m['first_clipfrac']) == 0.0
  # ...while later minibatches see the updated policy (so the first one is 1 because old log-probs are frozen,
  # not because nothing moves).
  assert abs(float(m['ratio_mean']) - 1.0) > 1e-6 or float(m['approx_kl']) > 0.0, m


def test_lr_zero_leaves_logprobs_unchanged_and_kl_zero(frozen_run):
  r = frozen_run
  for before, after in zip(jax.tree.leaves(r['params_before']), jax.tree.leaves(r['params_after'])):
    np.testing.assert_array_equal(before, after)
  for before, after in zip(jax.tree.leaves(r['value_params_before']), jax.tree.leaves(r['value_params_after'])):
    np.testing.assert_array_equal(before, after)
  em, m = r['exp_metrics'], r['metrics']
  assert float(em['kl']) == 0.0 and float(m['kl']) == 0.0
  assert abs(float(m['non_score_reward'])) < 1e-6
  # The policy's log-probs do not move during the update: every minibatch's ratio is exactly 1.
  assert abs(float(m['ratio_mean']) - 1.0) < 1e-6 and float(m['approx_kl']) < 1e-12
  assert float(m['clipfrac']) == 0.0


def test_ptx_update_reports_the_pretraining_lm_loss(frozen_run):
  """With ptx.coef > 0 the update adds the LM loss on pretraining text; with lr = 0 each of the E x M batches
  sees the same policy, so the reported mean equals the mean of float64 cross-entropies of those batches."""
  r = frozen_run
  m = r['metrics']
  assert 'ptx_loss' in m and np.isfinite(m['ptx_loss'])
  policy = make_models()['policy']
  tokens = r['ptx_host']['tokens']  # [E*M*b, L], in the order ptx_batch reshapes them
  logits = np.asarray(forward(policy, jnp.asarray(tokens[:, :-1]), jnp.ones_like(jnp.asarray(tokens[:, :-1]))))
  lp = np.take_along_axis(log_softmax64(logits), tokens[:, 1:, None], -1)[..., 0]  # [E*M*b, L-1]
  per_update = -lp.reshape(4, -1).mean(1)  # E x M = 4 updates, b sequences each, every token a target
  np.testing.assert_allclose(float(m['ptx_loss']), per_update.mean(), rtol=1e-5)
  # loss = pg + vf_coef * vf + coef * ptx (means over the E x M updates)
  c = make_config(ptx_coef=2.0).ppo
  np.testing.assert_allclose(float(m['loss']), float(m['pg_loss']) + c.vf_coef * float(m['vf_loss'])
                             + 2.0 * float(m['ptx_loss']), rtol=1e-5, atol=1e-6)


def test_experience_matches_float64_reference(lr_run):
  r = lr_run[(1, 1, 1)]
  exp, em = r['exp'], r['exp_metrics']
  config = make_config()
  pc = config.ppo
  models = make_models()
  policy, value, ref, reward = models['policy'], models['value'], models['reference'], models['reward']
  seq, att, mask = exp['seq'], exp['att'], exp['mask']
  assert seq.shape == (B, P + N) and mask.shape == (B, N)
  # Layout: left-padded prompt, then the response; mask == the response part of att.
  np.testing.assert_array_equal(seq[:, :P], make_prompts()['prompt'])
  np.testing.assert_array_equal(mask, att[:, P:])
  has_eos = eos_rows(exp)
  assert has_eos.any() and not has_eos.all(), 'the fixture should give rows with and without EOS'

  logp = ref_response_logp(policy, seq, att, pc.temperature)
  ref_logp = ref_response_logp(ref, seq, att, pc.temperature)
  np.testing.assert_allclose(np.where(mask > 0, exp['old_logp'], 0), np.where(mask > 0, logp, 0), atol=2e-5)
  # V(s_t) is the head at the position before token t; causal, so a forward of the whole sequence gives it.
  values = np.asarray(forward(value, jnp.asarray(seq), jnp.asarray(att)), np.float64)[:, P - 1:-1]
  np.testing.assert_allclose(np.where(mask > 0, exp['old_values'], 0), np.where(mask > 0, values, 0), atol=2e-5)
  score = np.where(has_eos, ref_score(reward, seq, att), pc.missing_eos_penalty)

  # The reference is fed the trainer's own old_logp/values (frozen float32), so only the arithmetic is compared.
  adv, ret = ref_advantages(exp['old_logp'].astype(np.float64), ref_logp, exp['old_values'].astype(np.float64),
                            score, mask, BETA, pc.gamma, pc.lam)
  np.testing.assert_allclose(exp['advantages'], adv, atol=1e-4)
  np.testing.assert_allclose(exp['returns'], ret, atol=1e-4)
  kl = sum((exp['old_logp'][i, t] - ref_logp[i, t]) for i in range(B) for t in range(N) if mask[i, t]) / B
  np.testing.assert_allclose(float(em['kl']), kl, atol=1e-4)
  np.testing.assert_allclose(float(em['score']), score.mean(), atol=1e-5)
  np.testing.assert_allclose(float(em['eos_fraction']), has_eos.mean())
  np.testing.assert_allclose(float(em['response_length']), mask.sum(1).mean())
  assert float(em['beta']) == pytest.approx(BETA)


def test_responses_stop_at_eos_and_pad_after(lr_run):
  exp = lr_run[(1, 1, 1)]['exp']
  tokens, mask = exp['seq'][:, P:], exp['mask']
  for row, m in zip(tokens, mask):
    length = int(m.sum())
    assert m[:length].all() and not m[length:].any()  # right-padded
    assert (row[length:] == PAD).all()
    eos_at = [t for t in range(length) if row[t] == EOS]
    assert eos_at in ([], [length - 1]), (row, m)  # EOS, if any, is the last real token
    if not eos_at:
      assert length == N


def test_missing_eos_gets_penalty(lr_run):
  """A response without EOS is scored missing_eos_penalty (-1); one with EOS keeps the RM's score.
  (test_experience_matches_float64_reference checks that this score is the one added to the last token.)"""
  r = lr_run[(1, 1, 1)]
  exp, em = r['exp'], r['exp_metrics']
  reward = make_models()['reward']
  has_eos = eos_rows(exp)
  rm = ref_score(reward, exp['seq'], exp['att'])
  penalty = make_config().ppo.missing_eos_penalty
  assert penalty == -1.0
  np.testing.assert_allclose(float(em['score']), np.where(has_eos, rm, penalty).mean(), atol=1e-5)
  np.testing.assert_allclose(float(em['rm_score_raw']), np.where(has_eos, rm, 0.0).mean(), atol=1e-5)
  assert np.all(np.abs(rm[~has_eos] - penalty) > 1e-3)  # so the two readings differ on those rows


def test_reward_read_at_eos_not_pad():
  """ScalarModel.score reads the head at the last real token (the EOS): left- and right-padded copies of the
  same sequences agree (fp32, < 1e-5), and the tokens after EOS (pads) do not matter."""
  model = ScalarModel(CFG, rngs=nnx.Rngs(5))
  rng = np.random.default_rng(0)
  lengths = [3, 7, 10, 5]
  t = 12
  rows = [list(rng.integers(2, VOCAB, size=n - 1)) + [EOS] for n in lengths]
  right, right_mask = batches.pad_right(rows, t, PAD)
  left, left_mask = batches.pad_left(rows, t, PAD)
  score = nnx.jit(lambda m, t, a: m.score(t, a))
  s_right = np.asarray(score(model, jnp.asarray(right), jnp.asarray(right_mask)))
  s_left = np.asarray(score(model, jnp.asarray(left), jnp.asarray(left_mask)))
  np.testing.assert_allclose(s_left, s_right, atol=1e-5, rtol=0)
  # = the per-token head output at the EOS: the last slot of the left-padded rows, slot length-1 of the right.
  per_right = np.asarray(forward(model, jnp.asarray(right), jnp.asarray(right_mask)))
  per_left = np.asarray(forward(model, jnp.asarray(left), jnp.asarray(left_mask)))
  for i, row in enumerate(rows):
    assert right[i, lengths[i] - 1] == EOS and left[i, -1] == EOS
    assert s_right[i] == per_right[i, lengths[i] - 1]
    np.testing.assert_allclose(s_right[i], per_left[i, -1], atol=1e-5, rtol=0)
    assert abs(per_right[i, -1] - s_right[i]) > 1e-6 or lengths[i] == t  # a pad slot holds another number
  # Other tokens after the EOS (masked out) change nothing.
  junk = right.copy()
  junk[right_mask == 0] = rng.integers(0, VOCAB, size=int((right_mask == 0).sum()))
  np.testing.assert_allclose(np.asarray(score(model, jnp.asarray(junk), jnp.asarray(right_mask))), s_right,
                             atol=1e-6, rtol=0)


def test_ppo_step_on_8_devices_equals_one_device(lr_run):
  a, b = lr_run[(2, 2, 2)], lr_run[(1, 1, 1)]
  np.testing.assert_array_equal(a['exp']['seq'], b['exp']['seq'])  # the same samples
  for k in b['metrics']:
    np.testing.assert_allclose(a['metrics'][k], b['metrics'][k], rtol=1e-4, atol=1e-5, err_msg=k)
  moved = 0.0
  for x, y, x0 in zip(jax.tree.leaves(a['params_after']), jax.tree.leaves(b['params_after']),
                      jax.tree.leaves(b['params_before'])):
    # 1e-4 of the weights' size, plus 1e-3 of how far they moved: Adam divides by sqrt(v), so the update of a
    # weight with a tiny gradient (a zero-initialised bias) carries its gradient's float32 noise at full size.
    tol = 1e-4 * float(np.abs(y).max()) + 1e-3 * float(np.abs(y - x0).max()) + 1e-7
    np.testing.assert_allclose(x, y, atol=tol, rtol=0)
    moved = max(moved, float(np.abs(y - x0).max()))
  assert moved > 1e-4  # the step did train
  for x, y, y0 in zip(jax.tree.leaves(a['value_params_after']), jax.tree.leaves(b['value_params_after']),
                      jax.tree.leaves(b['value_params_before'])):
    tol = 1e-4 * float(np.abs(y).max()) + 1e-3 * float(np.abs(y - y0).max()) + 1e-7
    np.testing.assert_allclose(x, y, atol=tol, rtol=0)
  # The 8-device states really are sharded.
  st = a['trainer'].states['policy'].params
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(st)}
  assert any('fsdp' in s or 'model' in s for s in specs), specs


def test_a_missing_input_run_names_the_run_to_make_first(tmp_path):
  """ppo.run's inputs map roles to runs; the first missing one is one UserError naming it (no models load)."""
  from jax_rlhf.train import common
  config = make_config()
  with pytest.raises(common.UserError, match=r'ppo_b needs the sft run'):
    ppo.load_models(config, str(tmp_path), 'ppo_b')
  for run in ('sft', 'rm'):
    (tmp_path / run).mkdir()
    (tmp_path / run / 'DONE').write_text('{}')
  with pytest.raises(common.UserError, match=r'ppo_b needs the rm_v2 run'):
    ppo.load_models(config, str(tmp_path), 'ppo_b', {'reward': 'rm_v2'})
