"""Tests for jax_rlhf.sampling: HF greedy parity, KV cache vs full forward, EOS/pad/mask, top-k/top-p
statistics, log-probs vs a float64 recomputation, early stop, and use of the pure `sample` inside a jit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_rlhf import sampling
from jax_rlhf.models import hf as hf_lib
from jax_rlhf.models import transformer as T
from jax_rlhf.models.transformer_config import preset

PAD, EOS = 1, 0


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

def _left_pad(rows, pad=PAD):
  p = max(len(r) for r in rows)
  ids = np.full((len(rows), p), pad, np.int32)
  mask = np.zeros((len(rows), p), np.int32)
  for i, r in enumerate(rows):
    ids[i, p - len(r):] = r
    mask[i, p - len(r):] = 1
  return ids, mask


def _prompts(rng, lengths, vocab):
  return _left_pad([rng.integers(2, vocab, size=n) for n in lengths])  # never PAD (1) or EOS (0)


def _np_filter(logits, temperature=1.0, top_k=0, top_p=1.0):
  """Independent float64 reference of temperature -> top-k -> top-p, on [..., V]."""
  x = np.asarray(logits, np.float64) / temperature
  v = x.shape[-1]
  if 0 < top_k < v:
    kth = np.sort(x, axis=-1)[..., ::-1][..., top_k - 1:top_k]
    x = np.where(x < kth, -np.inf, x)
  if top_p < 1.0:
    order = np.argsort(-x, axis=-1, kind='stable')
    xs = np.take_along_axis(x, order, axis=-1)
    p = np.exp(xs - xs[..., :1])
    p /= p.sum(-1, keepdims=True)
    before = np.cumsum(p, axis=-1) - p
    keep_sorted = before < top_p
    keep_sorted[..., 0] = True
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    x = np.where(keep, x, -np.inf)
  return x


def _np_log_softmax(x):
  m = np.max(x, axis=-1, keepdims=True)
  z = x - m
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state)(ids, mask)


def _forward(model, ids, mask=None):
  """fp32 logits of a plain full forward (no cache), jitted (eager op-by-op dispatch compiles far more)."""
  mask = np.ones_like(ids) if mask is None else mask
  return np.asarray(_jit_forward(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask)))


def _full_logits(model, prompt_ids, prompt_mask, out):
  """Logits of one full forward over prompt + sampled tokens; [B, N, V], row i predicting token i."""
  ids = np.concatenate([prompt_ids, out.tokens], axis=1)
  mask = np.concatenate([prompt_mask, out.mask], axis=1)
  return _forward(model, ids, mask)[:, prompt_ids.shape[1] - 1:-1]


@functools.lru_cache(maxsize=None)
def _tiny(layout, scale=1.0, seed=0):
  """A tiny random model, its parameters drawn in numpy (eager nnx init compiles op by op: seconds)."""
  if layout == 'gpt2':
    cfg = preset('tiny', vocab_size=128, pad_token_id=PAD, eos_token_id=EOS)
  else:
    cfg = preset('tiny', vocab_size=128, layout='llama', num_kv_heads=2, tie_embeddings=False,
                 activation='silu', pad_token_id=PAD, eos_token_id=EOS)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: T.Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    shape = var.get_value().shape
    base = 1.0 if path[-1] == 'scale' else 0.0
    var.set_value(jnp.asarray(base + 0.02 * rng.standard_normal(shape), jnp.float32))
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  if scale != 1.0:  # untied head only: sharper next-token distributions, so top-k / top-p sets are small
    model.lm_head.set_value(model.lm_head[...] * scale)
  return model


# ----------------------------------------------------------------------------------------------------
# Hugging Face parity (greedy)
# ----------------------------------------------------------------------------------------------------

def _hf_model(layout):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  # A larger init than HF's default, so that greedy top-1/top-2 logit gaps are wide (>= 0.017 here), not ties.
  common = dict(vocab_size=128, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2)
  if layout == 'gpt2':
    c = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
    m = transformers.GPT2LMHeadModel(c)
  else:
    c = transformers.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                                 rms_norm_eps=1e-5, **common)
    m = transformers.LlamaForCausalLM(c)
  return torch, m.eval()


@pytest.mark.parametrize('layout', ['gpt2', 'llama'])
def test_greedy_matches_transformers(layout, tmp_path):
  torch, hf = _hf_model(layout)
  hf.save_pretrained(tmp_path)
  ours = hf_lib.load_pretrained(tmp_path)
  n = 12
  ids, mask = _prompts(np.random.default_rng(1), [5, 2, 8, 4], 128)
  t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

  def hf_greedy(eos):
    with torch.no_grad():
      seq = hf.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=False, max_new_tokens=n,
                        eos_token_id=eos, pad_token_id=PAD)
    new = seq[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, n - new.shape[1])), constant_values=PAD)  # HF stops once all rows end

  # EOS = a token that some row first emits mid-way (so that greedy does not end at once, and EOS handling is
  # compared too: both must end that row there and pad after it; HF pads finished rows with pad_token_id).
  free = hf_greedy(EOS)
  assert len(np.unique(free)) > 4  # not a degenerate repetition of one token
  b, eos = next((b, int(t)) for b in range(len(free)) for t in free[b] if 2 <= np.argmax(free[b] == t) <= n - 3)
  first = int(np.argmax(free[b] == eos))
  hf_tok = hf_greedy(eos)
  assert (hf_tok[b, first + 1:] == PAD).all()

  out = jax.device_get(sampling.generate(ours, ids, mask, jax.random.key(0), max_new_tokens=n,
                                         temperature=0.0, eos_token_id=eos, pad_token_id=PAD))
  np.testing.assert_array_equal(out.tokens, hf_tok)
  assert out.mask[b].sum() == first + 1 >= 3
  # Greedy log-probs are those of log_softmax(logits): check against HF's own forward, in float64.
  full_mask = torch.cat([t_mask, torch.tensor(out.mask)], 1)
  with torch.no_grad():  # HF's plain forward does not derive positions from the mask: pass them
    full = hf(torch.cat([t_ids, torch.tensor(out.tokens, dtype=torch.long)], 1), attention_mask=full_mask,
              position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits.double().numpy()
  ref = np.take_along_axis(_np_log_softmax(full[:, ids.shape[1] - 1:-1]), out.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.logprobs, np.where(out.mask > 0, ref, 0.0), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# One sampled batch per layout: KV cache vs full forward, EOS/pad/mask, early stop, log-probs
# ----------------------------------------------------------------------------------------------------

_N = 16
_MANY_EOS = tuple(range(96, 128))  # 32 EOS ids of 128: sampled rows end at different steps, all before _N
_SETTINGS = {'gpt2': dict(temperature=1.0, top_k=0, top_p=1.0),         # plain sampling
             'llama': dict(temperature=0.7, top_k=64, top_p=0.9)}       # temperature, top-k and top-p together


@functools.lru_cache(maxsize=None)
def _sampled(layout):
  """gpt2: through the pure `sample` inside a user's jit (as the PPO experience step calls it); llama: through
  `generate`. Every test below then checks both paths."""
  model = _tiny(layout)
  ids, mask = _prompts(np.random.default_rng(2), [3, 9, 6, 1, 7, 9], 96)
  kw = dict(max_new_tokens=_N, eos_token_id=_MANY_EOS, pad_token_id=PAD, return_logits=True, **_SETTINGS[layout])
  if layout == 'gpt2':
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, mask, rng):
      return sampling.sample(graphdef, state, ids, mask, rng, **kw)

    out = step(state, ids, mask, jax.random.key(3))
  else:
    out = sampling.generate(model, ids, mask, jax.random.key(3), **kw)
  return model, ids, mask, jax.device_get(out)


@pytest.mark.parametrize('layout', ['gpt2', 'llama'])
def test_cache_decode_equals_full_forward(layout):
  model, ids, mask, out = _sampled(layout)
  full = _full_logits(model, ids, mask, out)
  valid = out.mask.astype(bool)
  # 32 of the 128 ids end a row, so a row runs ~4 tokens on average (~24 for the batch): at least 3 a row.
  assert valid.sum() >= 3 * ids.shape[0]
  np.testing.assert_allclose(out.logits[valid], full[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('layout', ['gpt2', 'llama'])
def test_eos_pad_mask_and_early_stop(layout):
  _, _, _, out = _sampled(layout)
  tok, lp, m = out.tokens, out.logprobs, out.mask
  ends = []
  for b in range(tok.shape[0]):
    hits = np.flatnonzero(np.isin(tok[b], _MANY_EOS))
    end = hits[0] + 1 if len(hits) else _N  # the EOS itself is part of the response
    ends.append(end)
    assert (m[b, :end] == 1).all() and (m[b, end:] == 0).all()
    assert (tok[b, end:] == PAD).all()
    assert (lp[b, end:] == 0).all() and (lp[b, :end] < 0).all()
  assert len(set(ends)) >= 3  # rows end at different steps
  # Every row ended before _N, so the decode loop stopped early, after the last row's EOS.
  assert int(out.num_steps) == max(ends) < _N


@pytest.mark.parametrize('layout', ['gpt2', 'llama'])
def test_logprobs_match_float64_recompute(layout):
  model, ids, mask, out = _sampled(layout)
  ref = _np_log_softmax(_np_filter(_full_logits(model, ids, mask, out), **_SETTINGS[layout]))
  ref = np.take_along_axis(ref, out.tokens[..., None], -1)[..., 0]
  valid = out.mask.astype(bool)
  assert np.isfinite(ref[valid]).all()  # every sampled token is inside the top-k / top-p set
  np.testing.assert_allclose(out.logprobs, np.where(valid, ref, 0.0), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# top-k / top-p
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('temperature,top_k,top_p', [(0.8, 6, 1.0), (1.0, 0, 0.6)])
def test_topk_topp_frequencies(temperature, top_k, top_p):
  """Single-step distributions: 20k draws (one batch, max_new_tokens=1) against float64 probabilities."""
  model = _tiny('llama', scale=20.0)
  draws = 20_000
  ids = np.tile(np.array([[7, 21, 40, 3]], np.int32), (draws, 1))
  mask = np.ones_like(ids)
  out = sampling.generate(model, ids, mask, jax.random.key(4), max_new_tokens=1, temperature=temperature,
                          top_k=top_k, top_p=top_p, eos_token_id=EOS, pad_token_id=PAD)
  ref = _np_filter(_forward(model, ids[:1])[0, -1], temperature, top_k, top_p)
  allowed = np.isfinite(ref)
  probs = np.exp(_np_log_softmax(ref))
  assert 3 <= allowed.sum() <= 12, allowed.sum()  # a small set, so 20k draws pin the frequencies down
  tok = np.asarray(out.tokens)[:, 0]
  assert allowed[tok].all()
  freq = np.bincount(tok, minlength=probs.size) / draws
  tv = 0.5 * np.abs(freq - probs).sum()
  # Expected TV for <= 12 outcomes and 20k draws is < 0.01; 0.02 leaves a 2x margin (and the key is fixed).
  assert tv < 0.02, tv
  # The returned log-probs are those of the filtered distribution.
  np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], np.log(probs[tok]), atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# The draw: inverse CDF with one uniform per row
# ----------------------------------------------------------------------------------------------------

def test_inverse_cdf_exact_at_block_edges():
  """u on a grid against a float64 searchsorted; support at the block edges (V=300: blocks of 17, padded to 306)."""
  v, support = 300, np.array([0, 16, 17, 150, 298, 299])
  logits = np.full((v,), -np.inf, np.float32)
  logits[support] = [0.0, 1.0, -1.0, 0.5, -3.0, 2.0]
  p = np.exp(logits.astype(np.float64) - logits.max())
  p /= p.sum()
  cdf = np.cumsum(p)
  u = np.concatenate([np.linspace(0.0, 1.0, 2001)[:-1], [np.nextafter(np.float32(1), np.float32(0))]]).astype(np.float32)
  tok, logp = jax.jit(sampling.inverse_cdf)(jnp.asarray(np.tile(logits, (u.size, 1))), jnp.asarray(u))
  tok, logp = np.asarray(tok), np.asarray(logp)
  ref = np.searchsorted(cdf, u.astype(np.float64), side='right')
  clear = np.min(np.abs(u[:, None] - cdf[None, support]), axis=1) > 1e-6  # not on a boundary (rounding)
  assert clear.sum() > 1900
  np.testing.assert_array_equal(tok[clear], ref[clear])
  assert np.isin(tok, support).all()  # zero-mass tokens never, even at u = 0 and the largest u < 1
  assert tok[0] == 0 and tok[-1] == 299
  np.testing.assert_allclose(logp, np.log(p[tok]), atol=1e-6)


def test_draw_frequencies_large_vocab():
  """40k draws over 500 tokens (30% excluded) against float64 probabilities: the empirical CDF over token ids
  (what an inverse-CDF error would shift) and each token's frequency."""
  rng = np.random.default_rng(5)
  v, n = 500, 40_000
  logits = (1.5 * rng.standard_normal(v)).astype(np.float32)
  logits[rng.random(v) < 0.3] = -np.inf
  p = np.exp(_np_log_softmax(logits.astype(np.float64)))
  tok, logp = jax.jit(sampling.draw)(jax.random.key(6), jnp.asarray(np.tile(logits, (n, 1))))
  tok = np.asarray(tok)
  assert np.isfinite(logits[tok]).all()
  freq = np.bincount(tok, minlength=v) / n
  # Kolmogorov-Smirnov at level 1e-3: 1.95 / sqrt(n) (conservative for a discrete distribution).
  assert np.max(np.abs(np.cumsum(freq) - np.cumsum(p))) < 1.95 / np.sqrt(n)
  sd = np.sqrt(p * (1 - p) / n)
  assert np.all(np.abs(freq - p) < 5 * sd + 1e-12)  # 5 sigma per token
  np.testing.assert_allclose(np.asarray(logp), np.log(p[tok]), atol=1e-5)


@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, 5, 1.0), (0.5, 0, 0.7), (2.0, 12, 0.5), (1.0, 0, 1e-6),
                                                     (1.0, 200, 1.0), (1.0, 1, 0.3)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
  logits = np.random.default_rng(8).normal(size=(64, 100)).astype(np.float32) * 3
  got = np.asarray(jax.jit(functools.partial(sampling.filter_logits, temperature=temperature, top_k=top_k,
                                             top_p=top_p))(logits))
  ref = _np_filter(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
  assert (np.isfinite(got).sum(-1) >= 1).all()
  np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-6)
  if top_p < 1e-3 or top_k == 1:  # only the top token survives
    assert (np.isfinite(got).sum(-1) == 1).all()
