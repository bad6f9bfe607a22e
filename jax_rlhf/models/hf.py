"""Hugging Face folders <-> our models, for GPT-2, Llama (RoPE scalings linear, dynamic, llama3), Qwen2, Qwen3 and
Mistral, without torch.

    model = load_pretrained('path/to/hf_folder')          # Transformer; model(ids, attention_mask=m) -> logits
    rm = load_scalar_model('path/to/seq_cls_folder')      # ScalarModel from a *ForSequenceClassification folder
    rm = load_pretrained_body('path/to/lm_folder')        # ScalarModel: LM body + a fresh scalar head
    save_pretrained(model, 'out/hf', tokenizer=tok)       # config.json + model.safetensors (+ tokenizer files)

A folder holds `config.json` (mapped to our `TransformerConfig` by jax_rlhf/models/hf_config.py, which lists
what is not supported) and `model.safetensors` (or a sharded `model.safetensors.index.json`), whose tensors
jax_rlhf/models/hf_weights.py reads with safetensors' numpy backend, so torch is never imported, and maps per
family to our parameters.

Saving writes what `transformers.AutoModelForCausalLM` (LM) or `AutoModelForSequenceClassification`
(ScalarModel) loads with no missing or unexpected weights. A loaded model saves as its own family
(`TransformerConfig.hf_model_type`); a model built here maps by its features: gpt2 -> GPT2, llama with qk_norm
-> Qwen3, with qkv bias -> Qwen2, with a sliding window -> Mistral, else Llama.

Either block layout of our model (`scan_layers`: stacked on a leading 'layers' axis) loads and saves the same
HF folder: the name map is per layer, and the stacked layout is converted on the way (`stack_blocks`).

Scalar models: HF's `score` is a Linear(D, 1) without bias. Our head computes
`(h . kernel + bias) * norm_gain + norm_bias`; it is saved folded: `score.weight = kernel * norm_gain` and the
constant `bias * norm_gain + norm_bias` goes to config.json as `jax_rlhf_score_bias` when it is not 0
(transformers ignores it, so HF's score differs from ours by that constant; `load_scalar_model` adds it
back, with norm_gain=1 and norm_bias=0). Note also that HF reads a sequence-classification score at the
last token that is not `pad_token_id`, while we read at the last token with attention_mask 1: they agree
when the pad id is distinct from every real token (EOS included).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf.models import lora
from jax_rlhf.models.heads import ScalarHead, ScalarModel
from jax_rlhf.models.hf_config import SCORE_BIAS_KEY, config_from_hf, config_to_hf, read_config
from jax_rlhf.models.hf_weights import hf_to_state, read_weights, scalar_bias, state_to_hf, write_folder
from jax_rlhf.models.transformer import Transformer, stack_blocks
from jax_rlhf.models.transformer_config import TransformerConfig

PutFn = Callable[[np.ndarray, Any], jax.Array]  # (array, logical axis names or None) -> device array


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


def save_pretrained(model: Transformer | ScalarModel, path: str | os.PathLike, *, tokenizer=None,
                    dtype: str | None = None) -> str:
  """Write `path/config.json` + `path/model.safetensors` (+ the tokenizer's files) that transformers loads.

  A Transformer saves as `*ForCausalLM`, a ScalarModel as `*ForSequenceClassification` (num_labels 1); LoRA
  adapters are merged into the weights first (`lora.merged`).
  dtype: the stored dtype (default the model's param_dtype). Call on every process of a multi-process run
  (sharded arrays are gathered); only process 0 writes. Returns the path.
  """
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
