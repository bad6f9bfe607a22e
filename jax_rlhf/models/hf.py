"""Hugging Face folders <-> our models, for GPT-2, Llama (RoPE scalings linear, dynamic, llama3), Qwen2, Qwen3 and
Mistral, without torch.

    model = load_pretrained('path/to/hf_folder')          # Transformer; model(ids, attention_mask=m) -> logits
    rm = load_scalar_model('path/to/seq_cls_folder')      # ScalarModel from a *ForSequenceClassification folder
    rm = load_pretrained_body('path/to/lm_folder')        # ScalarModel: LM body + a fresh scalar head
    save_pretrained(model, 'out/hf', tokenizer=tok)       # config.json + model.safetensors (+ tokenizer files)

A folder holds `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`); weights
are read tensor by tensor with safetensors' numpy backend, so torch is never imported. Tensor names are
mapped per family (`_rules`): GPT-2's Conv1D weights are stored [in, out] and its tied `lm_head` is absent;
Llama/Qwen2 Linear weights are [out, in]; ours are q/k/v [D, H, Dh], o [H, Dh, D], MLP [in, out],
lm_head [D, V]; Qwen3's per-head `q_norm`/`k_norm` [Dh]. Names are accepted with or without the base-model
prefix (`transformer.` / `model.`).

Saving writes what `transformers.AutoModelForCausalLM` (LM) or `AutoModelForSequenceClassification`
(ScalarModel) loads with no missing or unexpected weights. A loaded model saves as its own family
(`TransformerConfig.hf_model_type`); a model built here maps by its features: gpt2 -> GPT2, llama with qk_norm
-> Qwen3, with qkv bias -> Qwen2, with a sliding window -> Mistral, else Llama.

Either block layout of our model (`scan_layers`: stacked on a leading 'layers' axis) loads and saves the same
HF folder: the name map is per layer, and the stacked layout is converted on the way (`stack_blocks`).

Not supported (one-line ValueError at load): RoPE scalings other than linear, dynamic and llama3 (yarn,
longrope), partial rotary, Qwen2/Qwen3 sliding-window layers (Mistral's single window is supported), and
attention/MLP biases that our llama layout has no place for.

Scalar models: HF's `score` is a Linear(D, 1) without bias. Our head computes
`(h . kernel + bias) * norm_gain + norm_bias`; it is saved folded: `score.weight = kernel * norm_gain` and the
constant `bias * norm_gain + norm_bias` goes to config.json as `jax_rlhf_score_bias` when it is not 0
(transformers ignores it, so HF's score differs from ours by that constant; `load_scalar_model` adds it
back, with norm_gain=1 and norm_bias=0). Note also that HF reads a sequence-classification score at the
last token that is not `pad_token_id`, while we read at the last token with attention_mask 1: they agree
when the pad id is distinct from every real token (EOS included).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf.models.heads import ScalarHead, ScalarModel
from jax_rlhf.models.transformer import Transformer, TransformerConfig, stack_blocks, unstack_blocks

SUPPORTED_MODEL_TYPES = ('gpt2', 'llama', 'qwen2', 'qwen3', 'mistral')
_PREFIX = {'gpt2': 'transformer.', 'llama': 'model.', 'qwen2': 'model.', 'qwen3': 'model.', 'mistral': 'model.'}
_ARCH_LM = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
            'qwen3': 'Qwen3ForCausalLM', 'mistral': 'MistralForCausalLM'}
_ARCH_SCALAR = {'gpt2': 'GPT2ForSequenceClassification', 'llama': 'LlamaForSequenceClassification',
                'qwen2': 'Qwen2ForSequenceClassification', 'qwen3': 'Qwen3ForSequenceClassification',
                'mistral': 'MistralForSequenceClassification'}
_ACTIVATIONS = {'gelu_new': 'gelu_new', 'gelu_pytorch_tanh': 'gelu_new', 'gelu': 'gelu', 'silu': 'silu',
                'swish': 'silu'}
# HF buffers that may sit in a weights file but are not parameters.
_IGNORED = re.compile(r'(^|\.)attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$')
SCORE_BIAS_KEY = 'jax_rlhf_score_bias'

PutFn = Callable[[np.ndarray, Any], jax.Array]  # (array, logical axis names or None) -> device array


# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------

def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def _rope(c: Mapping) -> dict:
  """Our RoPE fields from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (4.x).

  Supported: default, linear, dynamic (NTK) and llama3 scalings, one for all layers, full-width rotary.
  """
  params = c.get('rope_parameters') or c.get('rope_scaling') or {}
  if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
    raise ValueError(f'unsupported per-layer RoPE parameters {params!r}; only one RoPE for all layers is supported')
  kind = params.get('rope_type', params.get('type', 'default')) or 'default'
  if kind not in ('default', 'linear', 'dynamic', 'llama3'):
    raise ValueError(f'unsupported RoPE scaling {kind!r} ({params!r}); supported: default, linear, dynamic, llama3')
  if params.get('partial_rotary_factor', c.get('partial_rotary_factor', 1.0)) not in (None, 1, 1.0):
    raise ValueError('unsupported partial_rotary_factor; only full-width RoPE is supported')
  out = dict(rope_theta=float(params.get('rope_theta', c.get('rope_theta') or 10000.0)), rope_type=kind)
  if kind != 'default':
    out['rope_factor'] = float(params['factor'])
  if kind == 'llama3':
    out.update(rope_low_freq_factor=float(params['low_freq_factor']),
               rope_high_freq_factor=float(params['high_freq_factor']),
               rope_original_max_len=int(params['original_max_position_embeddings']))
  return out


def _rope_to_hf(cfg: TransformerConfig) -> dict:
  p = {'rope_type': cfg.rope_type, 'rope_theta': cfg.rope_theta}
  if cfg.rope_type != 'default':
    p['factor'] = cfg.rope_factor
  if cfg.rope_type == 'llama3':
    p.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
             original_max_position_embeddings=cfg.rope_original_max_len)
  return p


def config_from_hf(hf_config: Mapping | Any, **overrides) -> TransformerConfig:
  """A `TransformerConfig` from a HF config.json dict (or a transformers config object).

  `overrides` set our own fields on top (e.g. dropout_rate, dtype, param_dtype). Dropout is 0 unless
  overridden (HF's pdrop values are not carried over: the training config owns dropout).
  Raises ValueError, one line, for an unsupported model_type or feature.
  """
  c = dict(hf_config.to_dict() if hasattr(hf_config, 'to_dict') else hf_config)
  try:
    return _config_from_hf(c, overrides)
  except KeyError as e:
    raise ValueError(f'HF config of model_type {c.get("model_type")!r} lacks the field {e.args[0]!r}') from None


def _config_from_hf(c: dict, overrides: dict) -> TransformerConfig:
  mt = c.get('model_type')
  if mt not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f'unsupported model_type {mt!r}; supported: {", ".join(SUPPORTED_MODEL_TYPES)}')
  eos = _first(c.get('eos_token_id'))
  bos = _first(c.get('bos_token_id'))
  pad = _first(c.get('pad_token_id'))
  eos = 0 if eos is None else int(eos)
  ids = dict(eos_token_id=eos, bos_token_id=eos if bos is None else int(bos),
             pad_token_id=eos if pad is None else int(pad))  # no pad id in the config: the tokenizer decides
  act = c.get('activation_function' if mt == 'gpt2' else 'hidden_act', 'gelu_new' if mt == 'gpt2' else 'silu')
  if act not in _ACTIVATIONS:
    raise ValueError(f'unsupported {mt} activation {act!r}; supported: {", ".join(_ACTIVATIONS)}')
  if mt == 'gpt2':
    for key, ok in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                    ('add_cross_attention', False)):
      if c.get(key, ok) != ok:
        raise ValueError(f'unsupported gpt2 option {key}={c[key]!r}')
    kw = dict(vocab_size=c['vocab_size'], num_layers=c['n_layer'], num_heads=c['n_head'], embed_dim=c['n_embd'],
              mlp_dim=c.get('n_inner'), max_len=c.get('n_positions', 1024), layout='gpt2',
              norm_eps=c.get('layer_norm_epsilon', 1e-5), tie_embeddings=c.get('tie_word_embeddings', True))
  else:
    if c.get('mlp_bias'):
      raise ValueError(f'unsupported {mt} option mlp_bias=True (no MLP biases in the llama layout)')
    if mt in ('llama', 'qwen3', 'mistral') and c.get('attention_bias'):
      raise ValueError(f'unsupported {mt} option attention_bias=True (its o_proj bias has no place in our '
                       'llama layout; only q/k/v biases, as Qwen2, are supported)')
    if mt in ('qwen2', 'qwen3') and c.get('use_sliding_window') and c.get('sliding_window') is not None:
      n, window = c['num_hidden_layers'], c['sliding_window']
      types = c.get('layer_types') or ['sliding_attention' if i >= c.get('max_window_layers', 28) else 'full'
                                       for i in range(n)]
      if 'sliding_attention' in types and window < c.get('max_position_embeddings', 32768):
        raise ValueError(f'unsupported {mt} sliding-window attention (window {window} on some layers); '
                         'only full attention is supported for this family')
    if mt == 'mistral' and c.get('layer_types'):
      raise ValueError('unsupported mistral option layer_types (alternating attention); one window for all '
                       'layers is supported')
    kw = dict(vocab_size=c['vocab_size'], num_layers=c['num_hidden_layers'], num_heads=c['num_attention_heads'],
              num_kv_heads=c.get('num_key_value_heads') or c['num_attention_heads'], embed_dim=c['hidden_size'],
              mlp_dim=c['intermediate_size'], head_dim=c.get('head_dim'),
              max_len=c.get('max_position_embeddings', 2048), layout='llama',
              norm_eps=c.get('rms_norm_eps', 1e-6), **_rope(c), qkv_bias=mt == 'qwen2', qk_norm=mt == 'qwen3',
              sliding_window=c.get('sliding_window') if mt == 'mistral' else None,
              tie_embeddings=c.get('tie_word_embeddings', False))
  kw.update(activation=_ACTIVATIONS[act], initializer_range=c.get('initializer_range', 0.02), dropout_rate=0.0,
            hf_model_type=mt, **ids)
  kw.update(overrides)
  return TransformerConfig(**kw)


def model_type_of(cfg: TransformerConfig) -> str:
  """The HF family our config is saved as: the one it was loaded from when that family can hold it, else
  gpt2, qwen3 (llama layout with qk_norm), qwen2 (with qkv bias), mistral (with a sliding window) or llama."""
  if cfg.layout == 'gpt2':
    return 'gpt2'
  fits = {'qwen3': cfg.qk_norm and not cfg.qkv_bias and cfg.sliding_window is None,
          'qwen2': cfg.qkv_bias and not cfg.qk_norm and cfg.sliding_window is None,
          'mistral': not cfg.qkv_bias and not cfg.qk_norm,
          'llama': not cfg.qkv_bias and not cfg.qk_norm and cfg.sliding_window is None}
  if cfg.hf_model_type in fits and fits[cfg.hf_model_type]:
    return cfg.hf_model_type
  for mt in ('qwen3', 'qwen2', 'llama', 'mistral'):
    if fits[mt]:
      return mt
  raise ValueError(f'no HF family holds a llama-layout model with qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, '
                   f'sliding_window={cfg.sliding_window}')


def config_to_hf(cfg: TransformerConfig, *, scalar: bool = False, dtype: str | None = None) -> dict:
  """The config.json dict of a `*ForCausalLM` (or `*ForSequenceClassification` when `scalar`) model."""
  mt = model_type_of(cfg)
  dtype = str(jnp.dtype(dtype or cfg.param_dtype))
  act = cfg.activation
  if mt == 'gpt2':
    if cfg.kv_heads != cfg.num_heads or cfg.hdim * cfg.num_heads != cfg.embed_dim:
      raise ValueError('a gpt2-layout model saves as GPT-2 only with num_kv_heads == num_heads and '
                       'head_dim * num_heads == embed_dim')
    c = dict(vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.embed_dim, n_layer=cfg.num_layers,
             n_head=cfg.num_heads, n_inner=cfg.ffn_dim, activation_function=act,
             resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate, attn_pdrop=0.0,
             layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
             reorder_and_upcast_attn=False)
  else:
    if mt == 'llama' and cfg.embed_dim % cfg.num_heads:
      raise ValueError(f'HF Llama needs embed_dim ({cfg.embed_dim}) to be a multiple of num_heads ({cfg.num_heads})')
    c = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.ffn_dim,
             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
             head_dim=cfg.hdim, hidden_act=act, max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
             rope_theta=cfg.rope_theta, rope_parameters=_rope_to_hf(cfg), attention_dropout=0.0)
    if mt == 'llama':
      c.update(attention_bias=False, mlp_bias=False)
    elif mt == 'mistral':
      c.update(sliding_window=cfg.sliding_window)
    else:
      c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
      if mt == 'qwen3':
        c.update(attention_bias=False)
  arch = (_ARCH_SCALAR if scalar else _ARCH_LM)[mt]
  c.update(architectures=[arch], model_type=mt, tie_word_embeddings=cfg.tie_embeddings,
           initializer_range=cfg.initializer_range, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
           pad_token_id=cfg.pad_token_id, dtype=dtype, torch_dtype=dtype, use_cache=True)
  if scalar:
    c.update(id2label={'0': 'LABEL_0'}, label2id={'LABEL_0': 0}, problem_type='regression')
  return c


# ----------------------------------------------------------------------------------------------------
# Name maps: one rule per group of HF tensors <-> our parameters
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Rule:
  hf: tuple[str, ...]                   # canonical HF names (without the base prefix for body tensors)
  hf_shapes: tuple[tuple[int, ...], ...]
  ours: tuple[tuple, ...]               # our flat state paths
  to_ours: Callable                     # list of HF arrays -> list of our arrays
  to_hf: Callable                       # list of our arrays -> list of HF arrays


def _one(hf, shape, ours, f=lambda x: x, g=lambda x: x):
  return _Rule((hf,), (tuple(shape),), (ours,), lambda xs: [f(xs[0])], lambda ys: [g(ys[0])])


def _rules(cfg: TransformerConfig, *, lm_head: bool, scalar: bool) -> list[_Rule]:
  """The name map of one model. Body paths are relative to the Transformer; `scalar` adds ('head', ...)."""
  d, f, v, h, kv, dh = cfg.embed_dim, cfg.ffn_dim, cfg.vocab_size, cfg.num_heads, cfg.kv_heads, cfg.hdim
  t = np.transpose
  rules = []
  if cfg.layout == 'gpt2':
    rules += [_one('wte.weight', (v, d), ('wte',)), _one('wpe.weight', (cfg.max_len, d), ('wpe',))]
    for i in range(cfg.num_layers):
      p, o = f'h.{i}.', ('blocks', i)
      for hn, on in (('ln_1', 'ln1'), ('ln_2', 'ln2')):
        rules += [_one(p + hn + '.weight', (d,), o + (on, 'scale')), _one(p + hn + '.bias', (d,), o + (on, 'bias'))]
      rules += [
          _Rule((p + 'attn.c_attn.weight',), ((d, 3 * h * dh),), tuple(o + ('attn', n) for n in 'qkv'),
                lambda xs: [a.reshape(d, h, dh) for a in np.split(xs[0], 3, axis=-1)],
                lambda ys: [np.concatenate([a.reshape(d, h * dh) for a in ys], -1)]),
          _Rule((p + 'attn.c_attn.bias',), ((3 * h * dh,),), tuple(o + ('attn', n + '_bias') for n in 'qkv'),
                lambda xs: [a.reshape(h, dh) for a in np.split(xs[0], 3)],
                lambda ys: [np.concatenate([a.reshape(-1) for a in ys])]),
          _one(p + 'attn.c_proj.weight', (h * dh, d), o + ('attn', 'o'), lambda x: x.reshape(h, dh, d),
               lambda y: y.reshape(h * dh, d)),
          _one(p + 'attn.c_proj.bias', (d,), o + ('attn', 'o_bias')),
          _one(p + 'mlp.c_fc.weight', (d, f), o + ('mlp', 'fc')),
          _one(p + 'mlp.c_fc.bias', (f,), o + ('mlp', 'fc_bias')),
          _one(p + 'mlp.c_proj.weight', (f, d), o + ('mlp', 'proj')),
          _one(p + 'mlp.c_proj.bias', (d,), o + ('mlp', 'proj_bias')),
      ]
    rules += [_one('ln_f.weight', (d,), ('ln_f', 'scale')), _one('ln_f.bias', (d,), ('ln_f', 'bias'))]
  else:
    rules += [_one('embed_tokens.weight', (v, d), ('wte',))]
    for i in range(cfg.num_layers):
      p, o = f'layers.{i}.', ('blocks', i)
      rules += [_one(p + 'input_layernorm.weight', (d,), o + ('ln1', 'scale')),
                _one(p + 'post_attention_layernorm.weight', (d,), o + ('ln2', 'scale'))]
      for n, heads in (('q', h), ('k', kv), ('v', kv)):
        rules.append(_one(p + f'self_attn.{n}_proj.weight', (heads * dh, d), o + ('attn', n),
                          lambda x, heads=heads: t(x).reshape(d, heads, dh),
                          lambda y, heads=heads: t(y.reshape(d, heads * dh))))
        if cfg.qkv_bias:
          rules.append(_one(p + f'self_attn.{n}_proj.bias', (heads * dh,), o + ('attn', n + '_bias'),
                            lambda x, heads=heads: x.reshape(heads, dh), lambda y: y.reshape(-1)))
      if cfg.qk_norm:
        rules += [_one(p + f'self_attn.{n}_norm.weight', (dh,), o + ('attn', f'{n}_norm', 'scale')) for n in 'qk']
      rules += [
          _one(p + 'self_attn.o_proj.weight', (d, h * dh), o + ('attn', 'o'), lambda x: t(x).reshape(h, dh, d),
               lambda y: t(y.reshape(h * dh, d))),
          _one(p + 'mlp.gate_proj.weight', (f, d), o + ('mlp', 'gate'), t, t),
          _one(p + 'mlp.up_proj.weight', (f, d), o + ('mlp', 'up'), t, t),
          _one(p + 'mlp.down_proj.weight', (d, f), o + ('mlp', 'down'), t, t),
      ]
    rules += [_one('norm.weight', (d,), ('ln_f', 'scale'))]
  if scalar:
    rules = [dataclasses.replace(r, ours=tuple(('transformer',) + p for p in r.ours)) for r in rules]
    rules.append(_one('score.weight', (1, d), ('head', 'kernel'), lambda x: x[0], lambda y: y[None, :]))
  elif lm_head:
    rules.append(_one('lm_head.weight', (v, d), ('lm_head',), t, t))
  return rules


def _canonical(name: str, prefix: str) -> str:
  return name[len(prefix):] if name.startswith(prefix) else name


def hf_to_state(tensors: Mapping[str, np.ndarray], cfg: TransformerConfig, *, scalar: bool = False,
                lm_head: bool | None = None, source: str = 'the weights') -> dict[tuple, np.ndarray]:
  """HF tensors (any of the accepted names) -> {our flat state path: array}, in the HF dtype.

  `scalar`: a sequence-classification layout (body under ('transformer',), score -> ('head', 'kernel'));
  `lm_head`: whether an untied `lm_head.weight` is expected (default: not tied and not scalar; a present
  lm_head.weight that is not expected is ignored, as HF does for tied models).
  Raises ValueError (one line) listing missing and unexpected tensors, or a tensor of the wrong shape.
  """
  if lm_head is None:
    lm_head = not scalar and not cfg.tie_embeddings
  rules = _rules(cfg, lm_head=lm_head, scalar=scalar)
  prefix = _PREFIX[model_type_of(cfg)]
  names = {}
  for name in tensors:
    if _IGNORED.search(name):
      continue
    names.setdefault(_canonical(name, prefix), name)
  expected = {n for r in rules for n in r.hf}
  missing = sorted(expected - set(names))
  unexpected = sorted(n for n in set(names) - expected if not (n == 'lm_head.weight' and not lm_head))
  if missing or unexpected:
    def show(xs):
      return ', '.join(xs[:12]) + (f', ... ({len(xs)} in all)' if len(xs) > 12 else '') if xs else 'none'
    hint = ''
    if 'score.weight' in missing:
      hint = ' (an LM folder: use load_pretrained_body for a scalar model initialised from it)'
    elif 'score.weight' in unexpected:
      hint = ' (a sequence-classification folder: use load_scalar_model)'
    raise ValueError(f'{source} do not match a {model_type_of(cfg)} {"scalar model" if scalar else "LM"} of this '
                     f'config: missing: {show(missing)}; unexpected: {show(unexpected)}{hint}')
  out = {}
  for r in rules:
    xs = [tensors[names[n]] for n in r.hf]
    for n, x, s in zip(r.hf, xs, r.hf_shapes):
      if tuple(x.shape) != s:
        raise ValueError(f'{source}: tensor {names[n]} has shape {tuple(x.shape)}, this config expects {s}')
    out.update(zip(r.ours, r.to_ours(xs)))
  return out


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def state_to_hf(model: Transformer | ScalarModel, *, dtype: str | None = None) -> dict[str, np.ndarray]:
  """Our model -> {full HF tensor name: contiguous numpy array} as `save_pretrained` writes them.

  A ScalarModel's head is folded into `score.weight` (see the module docstring; the leftover constant is
  `scalar_bias(model)`). Arrays sharded over several processes are gathered (a collective: call on all).
  """
  scalar = isinstance(model, ScalarModel)
  body = model.transformer if scalar else model
  cfg = body.config
  if not scalar and not (body.has_lm_head or cfg.tie_embeddings):
    raise ValueError('this Transformer was built without an LM head (lm_head=False, untied); nothing to save as an LM')
  flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
  if cfg.scan_layers:
    flat = unstack_blocks(flat)
  if scalar:
    gain = _host(flat.pop(('head', 'norm_gain')))
    flat[('head', 'kernel')] = _host(flat[('head', 'kernel')]) * gain
  dt = jnp.dtype(dtype or cfg.param_dtype)
  prefix = _PREFIX[model_type_of(cfg)]
  out = {}
  for r in _rules(cfg, lm_head=body.has_lm_head, scalar=scalar):
    ys = [_host(flat[p]).astype(dt) for p in r.ours]
    for n, y in zip(r.hf, r.to_hf(ys)):
      full = n if n in ('lm_head.weight', 'score.weight') else prefix + n
      out[full] = np.ascontiguousarray(y)
  return out


def scalar_bias(model: ScalarModel) -> float:
  """The constant HF's bias-free `score` cannot hold: bias * norm_gain + norm_bias."""
  head = model.head
  return float(_host(head.bias[...]) * _host(head.norm_gain[...]) + _host(head.norm_bias[...]))


# ----------------------------------------------------------------------------------------------------
# Reading folders
# ----------------------------------------------------------------------------------------------------

class _LazyTensors(Mapping):
  """name -> numpy array, read on access from one or several safetensors files (numpy backend, no torch)."""

  def __init__(self, files: dict[str, str]):
    self._files = files
    self._handles = {}

  def __getitem__(self, name):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    f = self._files[name]
    if f not in self._handles:
      self._handles[f] = safe_open(f, framework='np')
    return self._handles[f].get_tensor(name)

  def __iter__(self):
    return iter(self._files)

  def __len__(self):
    return len(self._files)


def read_config(path: str | os.PathLike) -> dict:
  """config.json of a HF folder; FileNotFoundError (one line) when the folder or the file is missing."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'Hugging Face model folder not found: {path}')
  f = os.path.join(path, 'config.json')
  if not os.path.isfile(f):
    raise FileNotFoundError(f'no config.json in Hugging Face model folder {path}')
  with open(f) as fh:
    return json.load(fh)


def read_weights(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
  """All tensors of a HF folder (model.safetensors or a sharded index), read lazily with the numpy backend."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  single, index = os.path.join(path, 'model.safetensors'), os.path.join(path, 'model.safetensors.index.json')
  if os.path.isfile(single):
    with safe_open(single, framework='np') as h:
      return _LazyTensors({k: single for k in h.keys()})
  if os.path.isfile(index):
    with open(index) as fh:
      weight_map = json.load(fh)['weight_map']
    files = {k: os.path.join(path, v) for k, v in weight_map.items()}
    for f in sorted(set(files.values())):
      if not os.path.isfile(f):
        raise FileNotFoundError(f'weights shard {f} named in {index} is missing')
    return _LazyTensors(files)
  note = ' (found pytorch_model.bin: convert it to safetensors)' if os.path.exists(
      os.path.join(path, 'pytorch_model.bin')) else ''
  raise FileNotFoundError(f'no model.safetensors or model.safetensors.index.json in {path}{note}')


def _build(abstract: nnx.Module, arrays: dict[tuple, Any], put_fn: PutFn | None) -> nnx.Module:
  """Fill an abstract (eval_shape) module with `arrays`, each cast to the dtype the module declares."""
  put = put_fn or (lambda x, _: jnp.asarray(x))
  if abstract.config.scan_layers:  # the per-layer arrays of the name map -> the stacked blocks
    arrays = stack_blocks(arrays, abstract.config.num_layers)
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  left = sorted('/'.join(map(str, p)) for p, _ in flat if p not in arrays)
  if left:
    raise ValueError(f'no value for parameters: {", ".join(left)}')
  for p, var in flat:
    old = var.get_value()
    x = np.asarray(arrays.pop(p))
    if tuple(x.shape) != tuple(old.shape):
      raise ValueError(f'parameter {"/".join(map(str, p))}: got shape {x.shape}, the model has {old.shape}')
    var.set_value(put(x.astype(old.dtype), var.get_metadata().get('out_sharding')))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _cfg(path, dtype, param_dtype, overrides) -> tuple[dict, TransformerConfig]:
  hf_cfg = read_config(path)
  param_dtype = param_dtype or 'float32'
  cfg = config_from_hf(hf_cfg, param_dtype=str(jnp.dtype(param_dtype)),
                       dtype=str(jnp.dtype(dtype or param_dtype)), **overrides)
  return hf_cfg, cfg


def load_pretrained(path: str | os.PathLike, *, dtype=None, param_dtype=None, put_fn: PutFn | None = None,
                    **config_overrides) -> Transformer:
  """A `Transformer` (with its LM head) from a HF causal-LM folder.

  param_dtype: parameter storage (default float32, whatever the file holds); dtype: compute dtype (default
  param_dtype). put_fn(array, logical_axis_names) places each parameter (default: jnp.asarray on the
  default device); pass one that device_puts with a NamedSharding to load straight onto a mesh.
  config_overrides: our config fields (e.g. dropout_rate=0.1).
  """
  _, cfg = _cfg(path, dtype, param_dtype, config_overrides)
  arrays = hf_to_state(read_weights(path), cfg, source=f'weights in {os.fspath(path)}')
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return _build(abstract, arrays, put_fn)


def load_scalar_model(path: str | os.PathLike, *, dtype=None, param_dtype=None, put_fn: PutFn | None = None,
                      **config_overrides) -> ScalarModel:
  """A `ScalarModel` from a HF *ForSequenceClassification folder (score.weight [1, D]).

  The head gets kernel = score.weight, bias = config's `jax_rlhf_score_bias` (0 if absent), norm_gain 1,
  norm_bias 0. The head stays float32.
  """
  hf_cfg, cfg = _cfg(path, dtype, param_dtype, config_overrides)
  arrays = hf_to_state(read_weights(path), cfg, scalar=True, source=f'weights in {os.fspath(path)}')
  arrays[('head', 'kernel')] = np.asarray(arrays[('head', 'kernel')], np.float32)
  arrays[('head', 'bias')] = np.asarray(hf_cfg.get(SCORE_BIAS_KEY, 0.0), np.float32)
  arrays[('head', 'norm_gain')] = np.ones((), np.float32)
  arrays[('head', 'norm_bias')] = np.zeros((), np.float32)
  abstract = nnx.eval_shape(lambda: ScalarModel(cfg, rngs=nnx.Rngs(0)))
  return _build(abstract, arrays, put_fn)


def load_pretrained_body(path: str | os.PathLike, *, seed: int = 0, dtype=None, param_dtype=None,
                         put_fn: PutFn | None = None, **config_overrides) -> ScalarModel:
  """A `ScalarModel` whose body comes from a HF causal-LM folder and whose head is freshly initialised
  (N(0, 1/sqrt(d+1)), bias 0, from `seed`). The folder's LM head, if any, is ignored."""
  _, cfg = _cfg(path, dtype, param_dtype, config_overrides)
  arrays = hf_to_state(read_weights(path), cfg, lm_head=False, source=f'weights in {os.fspath(path)}')
  arrays = {('transformer',) + p: x for p, x in arrays.items()}
  head = ScalarHead(cfg, rngs=nnx.Rngs(seed))
  for p, var in nnx.to_flat_state(nnx.state(head)):
    arrays[('head',) + p] = np.asarray(var.get_value())
  abstract = nnx.eval_shape(lambda: ScalarModel(cfg, rngs=nnx.Rngs(0)))
  return _build(abstract, arrays, put_fn)


# ----------------------------------------------------------------------------------------------------
# Writing folders
# ----------------------------------------------------------------------------------------------------

def save_pretrained(model: Transformer | ScalarModel, path: str | os.PathLike, *, tokenizer=None,
                    dtype: str | None = None) -> str:
  """Write `path/config.json` + `path/model.safetensors` (+ the tokenizer's files) that transformers loads.

  A Transformer saves as `*ForCausalLM`, a ScalarModel as `*ForSequenceClassification` (num_labels 1); LoRA
  adapters are merged into the weights first (`lora.merged`).
  dtype: the stored dtype (default the model's param_dtype). Call on every process of a multi-process run
  (sharded arrays are gathered); only process 0 writes. Returns the path.
  """
  from jax_rlhf.models import lora  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if lora.has_adapters(model):  # LoRA: the adapters folded into the base weights, a plain HF folder
    model = lora.merged(model)
  scalar = isinstance(model, ScalarModel)
  cfg = model.config
  tensors = state_to_hf(model, dtype=dtype)
  hf_cfg = config_to_hf(cfg, scalar=scalar, dtype=dtype)
  if scalar:
    b = scalar_bias(model)
    if b != 0.0:
      hf_cfg[SCORE_BIAS_KEY] = b
  if write_folder(path, tensors, 'model.safetensors', hf_cfg, 'config.json') and tokenizer is not None:
    tokenizer.save_pretrained(path)
  return path


def write_folder(path, tensors: dict, weights_name: str, config: dict, config_name: str) -> bool:
  """Process 0 writes `tensors` (safetensors, torch's metadata) and `config` (JSON) into the folder `path`, as
  transformers and peft read them; False on every other process (it writes nothing)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return False
  os.makedirs(path, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(path, weights_name), metadata={'format': 'pt'})
  with open(os.path.join(path, config_name), 'w') as fh:
    json.dump(config, fh, indent=2, sort_keys=True)
  return True
