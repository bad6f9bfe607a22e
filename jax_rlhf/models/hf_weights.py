"""The weights of a Hugging Face folder: each family's tensor names <-> our parameters, and safetensors files.

Tensor names are mapped per family (`_rules`): GPT-2's Conv1D weights are stored [in, out] and its tied
`lm_head` is absent; Llama/Qwen2 Linear weights are [out, in]; ours are q/k/v [D, H, Dh], o [H, Dh, D], MLP
[in, out], lm_head [D, V]; Qwen3's per-head `q_norm`/`k_norm` [Dh]. Names are accepted with or without the
base-model prefix (`transformer.` / `model.`). The map is per layer: a stacked model (`scan_layers`) is
unstacked on the way out (`unstack_blocks`).

`read_weights` reads a folder's tensors one by one with safetensors' numpy backend (`model.safetensors` or a
sharded index), so torch is never imported; `write_folder` is process 0's writer of a safetensors + JSON
folder (the HF export and the PEFT adapter export).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf.models.heads import ScalarModel
from jax_rlhf.models.hf_config import model_type_of
from jax_rlhf.models.transformer import Transformer, unstack_blocks
from jax_rlhf.models.transformer_config import TransformerConfig

_PREFIX = {'gpt2': 'transformer.', 'llama': 'model.', 'qwen2': 'model.', 'qwen3': 'model.', 'mistral': 'model.'}
# HF buffers that may sit in a weights file but are not parameters.
_IGNORED = re.compile(r'(^|\.)attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$')


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

  A ScalarModel's head is folded into `score.weight` (see jax_rlhf/models/hf.py; the leftover constant is
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
