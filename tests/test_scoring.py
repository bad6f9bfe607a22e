"""models/scoring.py against explicit loops and float64 numpy, on tiny random models and fresh random inputs.

Layout: left-padded prompt of P slots, then a right-padded response of N slots. Pads hold junk tokens, so a
result that leaks a pad shows.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_rlhf.models import scoring
from jax_rlhf.models.heads import ScalarModel
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset

EOS, PAD = 0, 1
VOCAB = 16
CFG = preset('tiny', vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS)


@pytest.fixture(scope='module')
def lm():
  return Transformer(CFG, rngs=nnx.Rngs(11))


@pytest.fixture(scope='module')
def scalar():
  return ScalarModel(CFG, rngs=nnx.Rngs(12))


def make_rows(seed, b=4, max_prompt=5, max_response=4):
  """Random (prompt, response) token lists: prompts of 1..max_prompt tokens, responses of 1..max_response."""
  rng = np.random.default_rng(seed)
  return [(list(rng.integers(2, VOCAB, size=int(rng.integers(1, max_prompt + 1)))),
           list(rng.integers(2, VOCAB, size=int(rng.integers(1, max_response + 1))))) for _ in range(b)], rng


def layout(rows, p, n, rng):
  """seq/att [B, p+n]: prompt left-padded to p slots, response right-padded to n; junk tokens at the pads."""
  b = len(rows)
  seq = rng.integers(0, VOCAB, size=(b, p + n)).astype(np.int32)
  att = np.zeros((b, p + n), np.int32)
  for i, (prompt, response) in enumerate(rows):
    seq[i, p - len(prompt):p] = prompt
    att[i, p - len(prompt):p] = 1
    seq[i, p:p + len(response)] = response
    att[i, p:p + len(response)] = 1
  return seq, att


def log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@nnx.jit
def _forward(model, ids):
  return model(ids, jnp.ones_like(ids))


@nnx.jit
def full_forward(model, seq, att):
  """The model's own forward of padded rows: LM logits [B, T, V] or per-token scalars [B, T]."""
  return model(seq, att)


logprobs_fn = jax.jit(scoring.response_logprobs, static_argnums=(3, 4))


def unpadded_outputs(model, tokens, width=16):
  """The model's own forward of one row with no pads and no mask: [len(tokens), ...] float64. (The row is
  followed by junk up to a fixed width, one compiled shape; causal attention keeps it from the first positions.)"""
  ids = np.full((1, width), 5, np.int32)
  ids[0, :len(tokens)] = tokens
  return np.asarray(_forward(model, jnp.asarray(ids)), np.float64)[0, :len(tokens)]


def test_effective_temperature():
  assert scoring.effective_temperature(0) == 1.0 and scoring.effective_temperature(0.0) == 1.0
  assert scoring.effective_temperature(0.7) == 0.7 and scoring.effective_temperature(2) == 2.0


@pytest.mark.parametrize('temperature', [0.7, 1.0])
def test_response_logprobs_equal_float64_log_softmax(lm, temperature):
  rows, rng = make_rows(0)
  p, n = 6, 5
  seq, att = layout(rows, p, n, rng)
  logp, logits = logprobs_fn(lm, seq, att, p, temperature)
  assert logp.shape == (len(rows), n) and logp.dtype == jnp.float32 and logits.shape == (len(rows), n, VOCAB)
  full = np.asarray(full_forward(lm, seq, att), np.float64)  # [B, p+n, V], the model's own forward
  ref = np.take_along_axis(log_softmax64(full[:, p - 1:-1] / temperature), seq[:, p:, None], -1)[..., 0]
  real = att[:, p:] > 0
  np.testing.assert_allclose(np.where(real, logp, 0), np.where(real, ref, 0), atol=2e-5, rtol=0)
  np.testing.assert_allclose(logits, full[:, p - 1:-1] / temperature, atol=2e-5, rtol=1e-5)


def test_temperature_zero_scores_as_one(lm):
  rows, rng = make_rows(1)
  seq, att = layout(rows, 5, 4, rng)
  zero, _ = logprobs_fn(lm, seq, att, 5, 0.0)
  one, _ = logprobs_fn(lm, seq, att, 5, 1.0)
  half, _ = logprobs_fn(lm, seq, att, 5, 0.5)
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(one))
  assert np.abs(np.asarray(half) - np.asarray(one)).max() > 1e-3


def test_sequence_logps_ignore_pads_and_padding_amount(lm):
  """The summed log-prob of the response's real tokens is the same for a prompt left-padded to 5 or 9 slots with
  a response right-padded to 4 or 7 slots (junk at every pad), and equals a float64 sum over an unpadded
  forward of each row alone."""
  rows, rng = make_rows(2, b=3)
  fn = jax.jit(scoring.sequence_logps, static_argnums=(3, 4))
  got = {}
  for p, n in ((5, 4), (9, 7)):
    seq, att = layout(rows, p, n, rng)
    out = fn(lm, seq, att, p, 0.8)
    assert out.shape == (len(rows),) and out.dtype == jnp.float32
    got[p, n] = np.asarray(out)
  ref = []
  for prompt, response in rows:
    logits = unpadded_outputs(lm, prompt + response)  # [T, V]
    lp = log_softmax64(logits[len(prompt) - 1:-1] / 0.8)
    ref.append(sum(lp[t, tok] for t, tok in enumerate(response)))
  for key, value in got.items():
    np.testing.assert_allclose(value, ref, atol=5e-5, rtol=0, err_msg=str(key))


def test_response_values_equal_a_loop_over_prefixes(scalar):
  """V(s_t) = the head's output after the prompt and response[:t], from an unpadded forward of each row."""
  rows, rng = make_rows(3, b=3)
  p, n = 6, 4
  seq, att = layout(rows, p, n, rng)
  values = np.asarray(jax.jit(scoring.response_values, static_argnums=3)(scalar, seq, att, p))
  assert values.shape == (len(rows), n)
  for i, (prompt, response) in enumerate(rows):
    out = unpadded_outputs(scalar, prompt + response)  # [T]
    for t in range(len(response)):
      np.testing.assert_allclose(values[i, t], out[len(prompt) - 1 + t], atol=2e-5, rtol=0)


def test_reward_at_last_and_last_real_index_equal_loops(scalar):
  rows, rng = make_rows(4, b=3)
  p, n = 6, 5
  seq, att = layout(rows, p, n, rng)
  rewards = np.asarray(jax.jit(scoring.reward_at_last)(scalar, seq, att))
  np.testing.assert_array_equal(rewards, np.asarray(nnx.jit(lambda m, t, a: m.score(t, a))(scalar, seq, att)))
  per_token = np.asarray(full_forward(scalar, seq, att), np.float64)  # [B, T]
  for i, (prompt, response) in enumerate(rows):
    last = max(t for t in range(p + n) if att[i, t])
    assert last == p + len(response) - 1
    np.testing.assert_allclose(rewards[i], per_token[i, last], atol=1e-6, rtol=0)
    np.testing.assert_allclose(rewards[i], unpadded_outputs(scalar, prompt + response)[-1], atol=2e-5, rtol=0)
  # any mask layout, including an empty row (index 0) and float masks
  mask = (rng.random((6, 9)) < 0.5).astype(np.float32)
  mask[2] = 0
  expected = [max([t for t in range(9) if mask[i, t]], default=0) for i in range(6)]
  np.testing.assert_array_equal(np.asarray(scoring.last_real_index(mask)), expected)
  np.testing.assert_array_equal(np.asarray(scoring.last_real_index(mask > 0)), expected)
