"""A Hugging Face `config.json` <-> our `TransformerConfig`, for GPT-2, Llama (RoPE scalings linear, dynamic,
llama3), Qwen2, Qwen3 and Mistral.

A loaded model saves as its own family (`TransformerConfig.hf_model_type`); a model built here maps by its
features (`model_type_of`): gpt2 -> GPT2, llama with qk_norm -> Qwen3, with qkv bias -> Qwen2, with a sliding
window -> Mistral, else Llama.

Not supported (one-line ValueError at load): RoPE scalings other than linear, dynamic and llama3 (yarn,
longrope), partial rotary, Qwen2/Qwen3 sliding-window layers (Mistral's single window is supported), and
attention/MLP biases that our llama layout has no place for.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jax_rlhf.models.transformer_config import TransformerConfig

SUPPORTED_MODEL_TYPES = ('gpt2', 'llama', 'qwen2', 'qwen3', 'mistral')
_ARCH_LM = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
            'qwen3': 'Qwen3ForCausalLM', 'mistral': 'MistralForCausalLM'}
_ARCH_SCALAR = {'gpt2': 'GPT2ForSequenceClassification', 'llama': 'LlamaForSequenceClassification',
                'qwen2': 'Qwen2ForSequenceClassification', 'qwen3': 'Qwen3ForSequenceClassification',
                'mistral': 'MistralForSequenceClassification'}
_ACTIVATIONS = {'gelu_new': 'gelu_new', 'gelu_pytorch_tanh': 'gelu_new', 'gelu': 'gelu', 'silu': 'silu',
                'swish': 'silu'}
SCORE_BIAS_KEY = 'jax_rlhf_score_bias'


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
