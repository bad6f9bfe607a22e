"""Hugging Face folders <-> our models: logits against transformers' PyTorch models, round trips, errors.

Tiny random-init models built locally by transformers + torch (the reference only; the library never
imports torch). Positions on both sides come from the mask, and only real tokens are compared.
"""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from jax_rlhf.models import hf, hf_config  # pylint: disable=g-import-not-at-top
from fixtures import max_err, our_logits, padded_ids, torch_logits

V, PAD = 96, 0
FAMILIES = ('gpt2', 'llama', 'qwen2')


def _hf_config(family, **kw):
  ids = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
  if family == 'gpt2':
    return transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4, **ids, **kw)
  small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, **ids, **kw)
  if family == 'llama':
    return transformers.LlamaConfig(**small)
  return transformers.Qwen2Config(**small)


def _randomise(model):
  """HF inits biases to 0 and norms to 1: perturb them so that every mapping is exercised."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias'):
        p.normal_(0.0, 0.05)
      elif p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope='module')
def hf_models(tmp_path_factory):
  """{family: (folder, torch model)}: tiny random causal LMs saved with transformers."""
  out = {}
  for i, family in enumerate(FAMILIES):
    torch.manual_seed(i)
    model = _randomise(transformers.AutoModelForCausalLM.from_config(_hf_config(family)))
    path = str(tmp_path_factory.mktemp(family))
    model.save_pretrained(path)
    out[family] = (path, model)
  return out


@pytest.mark.parametrize('family', FAMILIES)
def test_logits_match_transformers(hf_models, family):
  path, ref = hf_models[family]
  model = hf.load_pretrained(path)
  cfg = model.config
  if family != 'gpt2':
    assert cfg.kv_heads < cfg.num_heads and cfg.rope_theta == 5000.0  # grouped-query attention exercised
    assert cfg.qkv_bias == (family == 'qwen2')
  ids, mask = padded_ids(V, PAD)
  ours = our_logits(model, ids, mask)
  assert ours.shape == (3, 9, V)
  assert max_err(ours, torch_logits(ref, ids, mask), mask) < 1e-4


@pytest.mark.parametrize('family', FAMILIES)
def test_save_round_trip_through_transformers(hf_models, family, tmp_path):
  path, _ = hf_models[family]
  model = hf.load_pretrained(path)
  ids, mask = padded_ids(V, PAD)
  ours = our_logits(model, ids, mask)
  tokenizer = None
  if family == 'gpt2':
    tokenizers = pytest.importorskip('tokenizers')
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({'<pad>': 0, '<unk>': 1, 'a': 2}, unk_token='<unk>'))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', unk_token='<unk>')
  out = hf.save_pretrained(model, tmp_path / 'hf', tokenizer=tokenizer)
  cfg = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert cfg['model_type'] == family and cfg['architectures'] == [hf_config._ARCH_LM[family]]
  assert cfg['dtype'] == 'float32' and cfg['pad_token_id'] == PAD and cfg['eos_token_id'] == 2
  back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  assert max_err(torch_logits(back.eval(), ids, mask), ours, mask) < 1e-4
  np.testing.assert_array_equal(our_logits(hf.load_pretrained(out), ids, mask), ours)
  if tokenizer is not None:
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == 0


def test_sharded_index_folder(hf_models, tmp_path):
  path, _ = hf_models['llama']
  tensors = safetensors.numpy.load_file(os.path.join(path, 'model.safetensors'))
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[::2], 'model-00002-of-00002.safetensors': names[1::2]}
  for f, ns in shards.items():
    safetensors.numpy.save_file({n: tensors[n] for n in ns}, str(tmp_path / f), metadata={'format': 'pt'})
  index = {'metadata': {}, 'weight_map': {n: f for f, ns in shards.items() for n in ns}}
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(index))
  (tmp_path / 'config.json').write_text(open(os.path.join(path, 'config.json')).read())
  ids, mask = padded_ids(V, PAD)
  np.testing.assert_array_equal(our_logits(hf.load_pretrained(tmp_path), ids, mask),
                                our_logits(hf.load_pretrained(path), ids, mask))
  os.remove(tmp_path / 'model-00002-of-00002.safetensors')
  with pytest.raises(FileNotFoundError, match='model-00002-of-00002.safetensors'):
    hf.load_pretrained(tmp_path)


def test_loading_does_not_import_torch(hf_models):
  path, _ = hf_models['qwen2']
  code = ('import sys, numpy as np\n'
          'from jax_rlhf.models import hf\n'
          f'm = hf.load_pretrained({path!r})\n'
          'assert m(np.ones((1, 4), np.int32)).shape == (1, 4, %d)\n'
          "print('torch' in sys.modules, 'transformers' in sys.modules)\n" % V)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ['False', 'False'], r.stdout


def _one_line_error(exc_type, fn, *needles):
  with pytest.raises(exc_type) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg.strip(), msg
  for n in needles:
    assert n in msg, msg
  return msg


def test_clear_errors(hf_models, tmp_path):
  _one_line_error(ValueError, lambda: hf_config.config_from_hf({'model_type': 'bert'}), "'bert'",
                  'gpt2, llama, qwen2, qwen3, mistral')
  missing = str(tmp_path / 'nowhere')
  _one_line_error(FileNotFoundError, lambda: hf.load_pretrained(missing), missing)
  (tmp_path / 'empty').mkdir()
  _one_line_error(FileNotFoundError, lambda: hf.load_pretrained(tmp_path / 'empty'), 'config.json',
                  str(tmp_path / 'empty'))
  no_weights = tmp_path / 'no_weights'
  no_weights.mkdir()
  (no_weights / 'config.json').write_text(open(os.path.join(hf_models['gpt2'][0], 'config.json')).read())
  _one_line_error(FileNotFoundError, lambda: hf.load_pretrained(no_weights), 'model.safetensors', str(no_weights))
  bert = tmp_path / 'bert'
  bert.mkdir()
  (bert / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
  _one_line_error(ValueError, lambda: hf.load_pretrained(bert), 'bert', 'supported')


def test_unsupported_features_and_bad_tensors(hf_models, tmp_path):
  llama = _hf_config('llama').to_dict()
  _one_line_error(ValueError, lambda: hf_config.config_from_hf({**llama, 'rope_parameters': None,
                                                                 'rope_scaling': {'type': 'yarn', 'factor': 2.0}}),
                  'yarn')
  _one_line_error(ValueError, lambda: hf_config.config_from_hf({**llama, 'attention_bias': True}), 'attention_bias')
  qwen = _hf_config('qwen2').to_dict()
  _one_line_error(ValueError, lambda: hf_config.config_from_hf({**qwen, 'use_sliding_window': True,
                                                                 'sliding_window': 8, 'max_window_layers': 0,
                                                                 'layer_types': None}), 'sliding')
  cfg = hf_config.config_from_hf({**qwen, 'eos_token_id': [7, 2], 'tie_word_embeddings': True})
  assert cfg.eos_token_id == 7 and cfg.tie_embeddings and cfg.qkv_bias and cfg.num_kv_heads == 2
  # A file with one tensor missing and one unknown: both named in one line.
  path, _ = hf_models['gpt2']
  tensors = safetensors.numpy.load_file(os.path.join(path, 'model.safetensors'))
  tensors['transformer.h.0.attn.bias'] = np.zeros((1, 1, 4, 4), np.float32)  # an HF buffer: ignored
  tensors['transformer.extra.weight'] = tensors.pop('transformer.h.1.mlp.c_fc.bias')
  safetensors.numpy.save_file(tensors, str(tmp_path / 'model.safetensors'))
  (tmp_path / 'config.json').write_text(open(os.path.join(path, 'config.json')).read())
  _one_line_error(ValueError, lambda: hf.load_pretrained(tmp_path), 'missing: h.1.mlp.c_fc.bias',
                  'unexpected: extra.weight')


def test_scalar_model_matches_sequence_classification(tmp_path):
  torch.manual_seed(3)
  cfg = _hf_config('gpt2')
  cfg.num_labels = 1
  ref = _randomise(transformers.AutoModelForSequenceClassification.from_config(cfg))
  ref.save_pretrained(tmp_path / 'rm')
  rm = hf.load_scalar_model(tmp_path / 'rm')
  ids, mask = padded_ids(V, PAD)
  mask[1, 6:] = 0  # one right-padded row too
  ids[mask == 0] = PAD
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)

  def torch_score(model):
    with torch.no_grad():
      return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(pos)).logits.numpy()[:, 0]

  ours = np.asarray(rm.score(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(ours, torch_score(ref), atol=1e-4)

  # Save with a normalisation: the gain folds into score.weight, the constant goes to the config.
  rm.head.norm_gain[...] = jnp.asarray(2.0)
  rm.head.norm_bias[...] = jnp.asarray(0.25)
  rm.head.bias[...] = jnp.asarray(0.1)
  ours = np.asarray(rm.score(jnp.asarray(ids), jnp.asarray(mask)))
  hf.save_pretrained(rm, tmp_path / 'out')
  saved = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert saved['architectures'] == ['GPT2ForSequenceClassification']
  assert saved[hf_config.SCORE_BIAS_KEY] == pytest.approx(0.45)
  back, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / 'out',
                                                                             output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and back.config.num_labels == 1, info
  np.testing.assert_allclose(torch_score(back.eval()) + saved[hf_config.SCORE_BIAS_KEY], ours, atol=1e-4)
  again = hf.load_scalar_model(tmp_path / 'out')
  np.testing.assert_allclose(np.asarray(again.score(jnp.asarray(ids), jnp.asarray(mask))), ours, atol=1e-5)
  _one_line_error(ValueError, lambda: hf.load_pretrained(tmp_path / 'out'), 'score.weight', 'load_scalar_model')


def test_body_from_lm_and_bfloat16(hf_models, tmp_path):
  path, _ = hf_models['llama']
  placed = {}

  def put_fn(x, axes):  # where a caller would device_put with a NamedSharding from the logical names
    placed[x.shape] = axes
    return jnp.asarray(x)

  lm = hf.load_pretrained(path, put_fn=put_fn)
  assert placed[(V, 32)] == ('vocab', 'embed') and placed[(32, 2, 8)] == ('embed', 'heads', 'kv')
  rm = hf.load_pretrained_body(path, seed=1)
  ids, mask = padded_ids(V, PAD)
  h_lm, _ = lm.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
  h_rm, _ = rm.transformer.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(h_lm), np.asarray(h_rm))
  assert float(rm.head.bias[...]) == 0.0 and rm.head.kernel[...].shape == (32,)
  _one_line_error(ValueError, lambda: hf.load_scalar_model(path), 'score.weight', 'load_pretrained_body')
  # Stored in bfloat16: the config says so, transformers and we read it back.
  hf.save_pretrained(lm, tmp_path / 'bf16', dtype='bfloat16')
  assert json.loads((tmp_path / 'bf16' / 'config.json').read_text())['dtype'] == 'bfloat16'
  bf = hf.load_pretrained(tmp_path / 'bf16', param_dtype='bfloat16')
  assert bf.wte[...].dtype == jnp.bfloat16 and bf.config.dtype == 'bfloat16'
  f32 = hf.load_pretrained(tmp_path / 'bf16')
  assert f32.wte[...].dtype == jnp.float32
  assert max_err(our_logits(f32, ids, mask), our_logits(lm, ids, mask), mask) < 0.05
