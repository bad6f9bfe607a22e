"""LoRA: low-rank adapters on the decoder's projections (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", eq. 3: h = W0 x + (alpha / r) B A x).

`add(model, LoRAConfig(rank, alpha, dropout, targets))` attaches one `Adapter` per targeted projection
(q, k, v, o, gate, up, down; GPT-2's c_fc / c_proj are up / down) to an existing `Transformer` or `ScalarModel`
(random init or loaded weights, either block layout). Each adapter holds A [*in, r] (PEFT's init:
U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and B [r, *out] (zeros), both `LoRAParam`; the projection
(`layers.project`) adds scale * dropout(x) A B to the frozen x W0, scale = alpha / r. With B = 0 the
adapted model computes the base model's values exactly (x W0 + 0).

What trains: `trainable` is the filter `train.state.split_model` uses when a model carries adapters: the
`LoRAParam`s, plus a ScalarModel's head (reward and value models); every base weight goes to the state's
non-trained part. One copy of the base then serves policy and reference: `reference_graphdef` is the policy's
graphdef with every adapter switched off (a static flag), merged with the policy's own state, so PPO, DPO and
GRPO run the reference forward on the policy's base weights, with no second copy and no adapter matmuls.

Export: `merged(model)` folds scale * A B into W0 and returns a plain model (what `hf.save_pretrained` writes:
a plain HF folder); `save_peft` writes a PEFT adapter folder (adapter_config.json + adapter_model.safetensors,
the key names and layout `peft.PeftModel.from_pretrained` reads) for a causal LM of either layout (GPT-2's
fused c_attn holds q, k, v as one adapter of rank n r, exactly). Sharding: the rank axis has the logical name
'lora' (rule: replicated); A and B keep the base weight's logical names on their other axes.

Not qwix: it finds a layer's weight by intercepting `dot_general` / `einsum` on the module's own parameters,
while our projections run through `matmuls.dense`'s custom VJP (and MKL's custom call on a CPU). Tried on
qwix 0.1.8: it attached adapters to the MLP and the tied embedding only (attention weights are reshaped before
the product), and differentiating them failed (UnexpectedTracerError: they are closed over inside the custom
VJP, whose backward returns cotangents for x and W alone).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf.models import matmuls, transformer, transformer_config
from jax_rlhf.models.hf_weights import write_folder

TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
EXPORTS = ('merged', 'peft')
RANK_AXIS = 'lora'  # the rank dimension's logical name (jax_rlhf.sharding rules: replicated)


class LoRAParam(nnx.Param):
  """An adapter matrix (A or B): the only parameters a LoRA run trains (with a scalar model's head)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 0                      # 0: LoRA off (full fine-tuning)
  alpha: float = 16.0                # scale = alpha / rank
  dropout: float = 0.0               # on the adapter's input, only when a dropout key is given (training)
  targets: tuple[str, ...] = ('all',)  # 'all': every projection of the layout
  export: str = 'merged'             # merged: plain HF folder | peft: also a PEFT adapter folder

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f'model.lora.rank must be >= 0, got {self.rank}')
    bad = [t for t in self.targets if t not in TARGETS + ('all',)]
    if bad or (self.rank and not self.targets):
      raise ValueError(f'model.lora.targets must be all or a non-empty subset of {",".join(TARGETS)}, got '
                       f'{",".join(self.targets)}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'model.lora.dropout must be in [0, 1), got {self.dropout}')
    if self.export not in EXPORTS:
      raise ValueError(f'model.lora.export must be one of {EXPORTS}, got {self.export!r}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, lora_cfg) -> 'LoRAConfig':
    """From the `model.lora` ConfigDict (targets: a list, or a comma-separated string)."""
    if lora_cfg is None:
      return cls()
    targets = lora_cfg.get('targets', cls.targets)
    if isinstance(targets, str):
      targets = [t.strip() for t in targets.split(',') if t.strip()]
    return cls(rank=int(lora_cfg.get('rank', 0)), alpha=float(lora_cfg.get('alpha', cls.alpha)),
               dropout=float(lora_cfg.get('dropout', 0.0)), targets=tuple(targets),
               export=str(lora_cfg.get('export', 'merged')))


class Adapter(nnx.Module):
  """delta(x) = scale * dropout(x) A B for one projection; x [..., prod(in)] -> [..., prod(out)].

  a: [*lead, *in, r], b: [*lead, r, *out] (lead: the stacked blocks' [L] axis in the scanned layout, which
  the scan slices off before the call). `enabled` is static (part of the graphdef): the reference's
  graphdef has it off.
  """

  def __init__(self, a, b, a_axes, b_axes, n_in: int, scale: float, dropout: float):
    self.a = LoRAParam(a, out_sharding=tuple(a_axes), eager_sharding=False)
    self.b = LoRAParam(b, out_sharding=tuple(b_axes), eager_sharding=False)
    self.n_in = n_in        # how many leading (non-stacked) axes of a are input axes
    self.scale = scale
    self.dropout = dropout
    self.enabled = True

  def __call__(self, x, dropout_key=None):
    dt = x.dtype
    a, b = self.a[...].astype(dt), self.b[...].astype(dt)
    r = a.shape[-1]
    a2, b2 = a.reshape(-1, r), b.reshape(r, -1)
    if self.dropout > 0 and dropout_key is not None:
      keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dt)
    return matmuls.dense(matmuls.dense(x, a2), b2) * jnp.asarray(self.scale, dt)


# ----------------------------------------------------------------------------------------------------
# Attaching, finding and switching adapters
# ----------------------------------------------------------------------------------------------------

def _body(model) -> transformer.Transformer:
  return model.transformer if hasattr(model, 'transformer') else model


def _weights(cfg: transformer_config.TransformerConfig) -> dict[str, tuple[str, str, int]]:
  """target -> (submodule of the block, base weight attribute, number of input axes of that weight)."""
  if cfg.layout == 'gpt2':
    return {'q': ('attn', 'q', 1), 'k': ('attn', 'k', 1), 'v': ('attn', 'v', 1), 'o': ('attn', 'o', 2),
            'up': ('mlp', 'fc', 1), 'down': ('mlp', 'proj', 1)}
  return {'q': ('attn', 'q', 1), 'k': ('attn', 'k', 1), 'v': ('attn', 'v', 1), 'o': ('attn', 'o', 2),
          'gate': ('mlp', 'gate', 1), 'up': ('mlp', 'up', 1), 'down': ('mlp', 'down', 1)}


def _blocks(body) -> list:
  return [body.blocks] if body.config.scan_layers else list(body.blocks)


def add(model, lcfg: LoRAConfig, seed: int = 0):
  """Attach adapters to `model` (a Transformer or ScalarModel) in place; returns it. rank 0: unchanged.

  Draws A from its own key (seed), so the base weights and any other init are unaffected."""
  if not lcfg.rank:
    return model
  body = _body(model)
  cfg = body.config
  table = _weights(cfg)
  targets = tuple(table) if 'all' in lcfg.targets else lcfg.targets
  missing = [t for t in targets if t not in table]
  if missing:
    raise ValueError(f'model.lora.targets {missing} do not exist in the {cfg.layout} layout (it has {tuple(table)})')
  if adapters(model):
    raise ValueError('this model already has LoRA adapters')
  key = jax.random.key(seed + 7919)
  r = lcfg.rank
  for i, block in enumerate(_blocks(body)):
    for j, t in enumerate(targets):
      sub, wname, n_in = table[t]
      owner = getattr(block, sub)
      w = getattr(owner, wname)
      axes = tuple(w.get_metadata().get('out_sharding') or (None,) * w.ndim)
      lead = 1 if cfg.scan_layers else 0
      shape = w.shape
      lead_shape, in_shape, out_shape = shape[:lead], shape[lead:lead + n_in], shape[lead + n_in:]
      fan_in = int(np.prod(in_shape))
      bound = 1.0 / math.sqrt(fan_in)
      pdt = jnp.dtype(cfg.param_dtype)
      a = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, i), j), lead_shape + in_shape + (r,),
                             jnp.float32, -bound, bound).astype(pdt)
      b = jnp.zeros(lead_shape + (r,) + out_shape, pdt)
      a_axes = axes[:lead + n_in] + (RANK_AXIS,)
      b_axes = axes[:lead] + (RANK_AXIS,) + axes[lead + n_in:]
      setattr(owner, f'lora_{t}', Adapter(a, b, a_axes, b_axes, n_in, lcfg.scale, lcfg.dropout))
  body.lora_dropout = lcfg.dropout
  return model


def adapters(model) -> list[tuple[tuple, Adapter]]:
  """(path, Adapter) of every adapter of the model, in graph order."""
  return [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, Adapter)]


def target_of(path) -> str:
  """The target (q, ..., down) of an adapter's graph path (its last key is lora_<target>)."""
  return str(path[-1])[len('lora_'):]


def has_adapters(model) -> bool:
  return any(True for _ in adapters(model))


def trainable(path, x) -> bool:
  """The filter of what a model with adapters trains: adapter matrices and a scalar model's head."""
  return isinstance(x, LoRAParam) or (isinstance(x, nnx.Param) and len(path) > 0 and path[0] == 'head')


def set_enabled(model, on: bool):
  for _, ad in adapters(model):
    ad.enabled = on
  return model


def reference_graphdef(model):
  """The graphdef of `model` with every adapter off: merged with the adapted model's own state it computes
  the base model (the frozen reference) from the same arrays. Leaves `model` as it was. A model without
  adapters has no base to share: ValueError."""
  if not has_adapters(model):
    raise ValueError('no reference model was given and the policy has no LoRA adapters to switch off')
  set_enabled(model, False)
  try:
    return nnx.graphdef(model)
  finally:
    set_enabled(model, True)


# ----------------------------------------------------------------------------------------------------
# Export: merged weights, and the PEFT adapter folder
# ----------------------------------------------------------------------------------------------------

def delta_weight(ad: Adapter) -> jax.Array:
  """scale * A B in float32, in the base weight's shape (with a stacked [L] axis where the adapter has it)."""
  a = ad.a[...].astype(jnp.float32)
  b = ad.b[...].astype(jnp.float32)
  r = a.shape[-1]
  lead = a.ndim - 1 - ad.n_in
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  a2 = a.reshape(a.shape[:lead] + (-1, r))
  b2 = b.reshape(b.shape[:lead] + (r, -1))
  d = jnp.einsum('...ir,...ro->...io', a2, b2) * ad.scale
  return d.reshape(a.shape[:lead] + in_shape + out_shape)


def merged(model):
  """A copy of `model` with every adapter folded into its base weight (W0 + scale A B, computed in float32,
  stored in the weight's dtype) and removed: a plain model that computes the adapted one's values."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new Variables over the same arrays
  body = _body(copy)
  table = _weights(body.config)
  for block in _blocks(body):
    for t, (sub, wname, _) in table.items():
      owner = getattr(block, sub)
      ad = getattr(owner, f'lora_{t}', None)
      if ad is None:
        continue
      w = getattr(owner, wname)
      w.set_value((w[...].astype(jnp.float32) + delta_weight(ad)).astype(w.dtype))
      delattr(owner, f'lora_{t}')
  if 'lora_dropout' in vars(body):
    del body.lora_dropout
  return copy


# transformers' module names of the projections, per target (PEFT's target_modules). GPT-2's q, k, v are one
# fused Conv1D (attn.c_attn) and its two c_proj differ only by their parent, hence the two-part names.
_PEFT_MODULES = {
    'llama': {'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj', 'o': 'self_attn.o_proj',
              'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj', 'down': 'mlp.down_proj'},
    'gpt2': {'q': 'attn.c_attn', 'k': 'attn.c_attn', 'v': 'attn.c_attn', 'o': 'attn.c_proj', 'up': 'mlp.c_fc',
             'down': 'mlp.c_proj'},
}
_PEFT_PREFIX = {'llama': 'base_model.model.model.layers.', 'gpt2': 'base_model.model.transformer.h.'}


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x, np.float32)


def _layer_adapters(model) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """{layer: {target: (A [in, r], B [r, out])}}: 2-D float32 host arrays, either block layout."""
  scan = _body(model).config.scan_layers
  out: dict = {}
  for path, ad in adapters(model):
    a, b = _host(ad.a[...]), _host(ad.b[...])
    r = a.shape[-1]
    for i, ai, bi in ([(i, a[i], b[i]) for i in range(a.shape[0])] if scan else [(path[1], a, b)]):
      out.setdefault(int(i), {})[target_of(path)] = (ai.reshape(-1, r), bi.reshape(r, -1))
  return out


def peft_tensors(model) -> dict[str, np.ndarray]:
  """{PEFT key: array} of a causal LM's adapters, as `peft.get_peft_model_state_dict` names them:
  `base_model.model.<layers>.<i>.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r] (torch Linear
  layout). Our A [*in, r] / B [r, *out] are flattened and transposed. GPT-2's fused c_attn gets one adapter of
  rank n r for the n of q, k, v targeted: A the n A's stacked, B block-diagonal (each target's B in its third
  of the output), which with scale n alpha / (n r) (`peft_config`'s rank and alpha patterns) is exactly the
  sum of the n adapters."""
  body = _body(model)
  layout = body.config.layout
  if hasattr(model, 'transformer'):
    raise ValueError('the PEFT adapter export covers causal LMs (a scalar model exports merged: use '
                     'model.lora.export=merged)')
  names, out = _PEFT_MODULES[layout], {}
  for i, layer in sorted(_layer_adapters(model).items()):
    pre = f'{_PEFT_PREFIX[layout]}{i}.'
    qkv = [t for t in 'qkv' if t in layer] if layout == 'gpt2' else []
    for t, (a, b) in layer.items():
      if t not in qkv:
        out[f'{pre}{names[t]}.lora_A.weight'] = np.ascontiguousarray(a.T)
        out[f'{pre}{names[t]}.lora_B.weight'] = np.ascontiguousarray(b.T)
    if qkv:
      r, width = layer[qkv[0]][0].shape[1], layer[qkv[0]][1].shape[1]  # q, k and v have one width in GPT-2
      b_cat = np.zeros((3 * width, len(qkv) * r), np.float32)
      for j, t in enumerate(qkv):
        o = 'qkv'.index(t)
        b_cat[o * width:(o + 1) * width, j * r:(j + 1) * r] = layer[t][1].T
      out[f'{pre}attn.c_attn.lora_A.weight'] = np.ascontiguousarray(np.concatenate([layer[t][0].T for t in qkv]))
      out[f'{pre}attn.c_attn.lora_B.weight'] = b_cat
  return out


def peft_config(model, lcfg: LoRAConfig, base_model: str) -> dict[str, Any]:
  """adapter_config.json of `peft_tensors(model)` (peft's LoraConfig fields)."""
  layout = _body(model).config.layout
  targets = {target_of(p) for p, _ in adapters(model)}
  rank_pattern, alpha_pattern = {}, {}
  n_qkv = len(targets & {'q', 'k', 'v'})
  if layout == 'gpt2' and n_qkv > 1:
    rank_pattern['attn.c_attn'] = n_qkv * lcfg.rank
    alpha_pattern['attn.c_attn'] = n_qkv * lcfg.alpha
  return {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': os.fspath(base_model),
      'r': lcfg.rank, 'lora_alpha': lcfg.alpha, 'lora_dropout': lcfg.dropout, 'bias': 'none',
      'target_modules': sorted({_PEFT_MODULES[layout][t] for t in targets}),
      'fan_in_fan_out': layout == 'gpt2',  # GPT-2's Conv1D stores its weights [in, out]
      'use_rslora': False, 'use_dora': False, 'init_lora_weights': True, 'inference_mode': True,
      'modules_to_save': None, 'layers_to_transform': None, 'rank_pattern': rank_pattern,
      'alpha_pattern': alpha_pattern, 'revision': None,
  }


def save_peft(model, path: str, lcfg: LoRAConfig, base_model: str, *, dtype: str = 'float32') -> str:
  """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for `model`'s adapters on
  the base model folder `base_model` (an HF folder with the weights the adapters were trained on), which
  `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), path)` loads. Call on
  every process (sharded adapters are gathered); process 0 writes."""
  tensors = {k: v.astype(dtype) for k, v in peft_tensors(model).items()}
  write_folder(path, tensors, 'adapter_model.safetensors', peft_config(model, lcfg, base_model),
               'adapter_config.json')
  return path


def num_adapter_params(model) -> int:
  return int(sum(ad.a.size + ad.b.size for _, ad in adapters(model)))
