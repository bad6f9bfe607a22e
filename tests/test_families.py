"""Model families beyond GPT-2/Llama/Qwen2 against transformers' PyTorch models on tiny random configs:
Llama with RoPE scalings (llama3, linear, dynamic NTK), Qwen3 (q/k RMSNorm, decoupled head_dim) and Mistral
(sliding window). Per family: logits on a left-padded batch (1e-4), greedy tokens against `generate`, and the
save/load round trip through transformers with no missing or unexpected weights.

The sequences are longer than the scalings' thresholds (dynamic: max_position_embeddings 8; llama3: the three
frequency bands all occur at original_max_position_embeddings 32 with head_dim 16; mistral: window 4), so
every scaling and the window change the logits (checked against the unscaled model).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from jax_rlhf import sampling  # pylint: disable=g-import-not-at-top
from jax_rlhf.models import hf, hf_config, layers, transformer_config  # pylint: disable=g-import-not-at-top
from fixtures import max_err, our_logits, padded_ids, torch_logits

V, PAD, EOS = 96, 0, 2
_SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
              initializer_range=0.2)  # wide greedy logit gaps (no near-ties between the two implementations)
FAMILIES = {
    'llama3': ('llama', dict(head_dim=16, rope_parameters=dict(
        rope_type='llama3', rope_theta=5000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    'linear': ('llama', dict(rope_parameters=dict(rope_type='linear', rope_theta=5000.0, factor=2.0))),
    'dynamic': ('llama', dict(max_position_embeddings=8,
                              rope_parameters=dict(rope_type='dynamic', rope_theta=5000.0, factor=3.0))),
    'qwen3': ('qwen3', dict(head_dim=12, tie_word_embeddings=True, rope_parameters=dict(rope_theta=5000.0))),
    'mistral': ('mistral', dict(sliding_window=4, rope_parameters=dict(rope_theta=5000.0))),
}


def _hf_config(name):
  model_type, kw = FAMILIES[name]
  cls = {'llama': transformers.LlamaConfig, 'qwen3': transformers.Qwen3Config,
         'mistral': transformers.MistralConfig}[model_type]
  return cls(**{**_SMALL, **kw})


def _randomise(model):
  """HF inits norms to 1: perturb them so that every norm mapping (q_norm/k_norm included) is exercised."""
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """{name: folder} of tiny random causal LMs saved by transformers (reload them for a fresh torch model:
  transformers' dynamic RoPE keeps state across calls)."""
  out = {}
  for i, name in enumerate(FAMILIES):
    torch.manual_seed(10 + i)
    model = _randomise(transformers.AutoModelForCausalLM.from_config(_hf_config(name)))
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = path
  return out


def _torch_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize('name', FAMILIES)
def test_logits_match_transformers(folders, name):
  model = hf.load_pretrained(folders[name])
  cfg = model.config
  expect = {'llama3': dict(rope_type='llama3', rope_factor=8.0, rope_original_max_len=32, hdim=16),
            'linear': dict(rope_type='linear', rope_factor=2.0),
            'dynamic': dict(rope_type='dynamic', rope_factor=3.0, max_len=8),
            'qwen3': dict(qk_norm=True, qkv_bias=False, hdim=12, tie_embeddings=True),
            'mistral': dict(sliding_window=4, rope_type='default')}[name]
  for k, v in expect.items():
    assert getattr(cfg, k) == v, (k, getattr(cfg, k))
  ids, mask = padded_ids(V, PAD, 11)
  ours = our_logits(model, ids, mask)
  assert max_err(ours, torch_logits(_torch_model(folders[name]), ids, mask), mask) < 1e-4
  # The family's feature changes the logits at this length (so the comparison above exercises it).
  plain = dict(rope_type='default', sliding_window=None) if name != 'qwen3' else {}
  if plain:
    base = hf.load_pretrained(folders[name], **plain)
    assert max_err(our_logits(base, ids, mask), ours, mask) > 1e-3


@pytest.mark.parametrize('name', FAMILIES)
def test_greedy_matches_transformers_generate(folders, name):
  ref = _torch_model(folders[name])
  ours = hf.load_pretrained(folders[name])
  ids, mask = padded_ids(V, PAD, 7)
  n = 10
  with torch.no_grad():
    seq = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                       max_new_tokens=n, eos_token_id=EOS, pad_token_id=PAD)
  new = seq[:, ids.shape[1]:].numpy()
  want = np.pad(new, ((0, 0), (0, n - new.shape[1])), constant_values=PAD)  # HF stops once all rows end
  assert len(np.unique(want)) > 3  # not one repeated token
  out = jax.device_get(sampling.generate(ours, ids, mask, jax.random.key(0), max_new_tokens=n, temperature=0.0,
                                         eos_token_id=EOS, pad_token_id=PAD))
  np.testing.assert_array_equal(out.tokens, want)


@pytest.mark.parametrize('name', FAMILIES)
def test_save_round_trip_through_transformers(folders, name, tmp_path):
  model = hf.load_pretrained(folders[name])
  ids, mask = padded_ids(V, PAD, 11)
  ours = our_logits(model, ids, mask)
  out = hf.save_pretrained(model, tmp_path / 'hf')
  saved = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  model_type = FAMILIES[name][0]
  assert saved['model_type'] == model_type and saved['architectures'] == [hf_config._ARCH_LM[model_type]]
  assert saved['dtype'] == 'float32'
  back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  want_rope = dict(FAMILIES[name][1]['rope_parameters'])
  want_rope.setdefault('rope_type', 'default')
  assert {k: back.config.rope_parameters[k] for k in want_rope} == want_rope
  assert max_err(torch_logits(back.eval(), ids, mask), ours, mask) < 1e-4
  np.testing.assert_array_equal(our_logits(hf.load_pretrained(out), ids, mask), ours)


def test_features_pick_the_family_and_refusals():
  base = transformer_config.preset('demo')
  assert hf_config.model_type_of(base) == 'llama'
  assert hf_config.model_type_of(base.replace(qk_norm=True)) == 'qwen3'
  assert hf_config.model_type_of(base.replace(sliding_window=64)) == 'mistral'
  assert hf_config.model_type_of(base.replace(qkv_bias=True)) == 'qwen2'
  assert hf_config.model_type_of(base.replace(hf_model_type='mistral')) == 'mistral'  # a window-less Mistral stays one
  assert hf_config.model_type_of(base.replace(hf_model_type='qwen3')) == 'llama'  # qwen3 without q/k norms cannot be
  with pytest.raises(ValueError, match='no HF family'):
    hf_config.model_type_of(base.replace(qk_norm=True, qkv_bias=True))
  llama = _hf_config('linear').to_dict()
  for params, needle in ((dict(rope_type='yarn', factor=4.0, rope_theta=1e4), 'yarn'),
                         (dict(rope_type='longrope', rope_theta=1e4), 'longrope')):
    with pytest.raises(ValueError, match=needle) as e:
      hf_config.config_from_hf({**llama, 'rope_parameters': params})
    assert '\n' not in str(e.value)
  # transformers 4.x spelling: rope_scaling with 'type', theta at the top level
  cfg = hf_config.config_from_hf({**llama, 'rope_parameters': None, 'rope_theta': 500000.0,
                                  'rope_scaling': {'type': 'linear', 'factor': 4.0}})
  assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ('linear', 4.0, 500000.0)
  qwen3 = _hf_config('qwen3').to_dict()
  with pytest.raises(ValueError, match='qwen3 sliding-window'):
    hf_config.config_from_hf({**qwen3, 'use_sliding_window': True, 'sliding_window': 8, 'max_window_layers': 0,
                              'layer_types': None})
  with pytest.raises(ValueError, match='llama layout only'):
    transformer_config.preset('tiny', qk_norm=True)
  with pytest.raises(ValueError, match='rope_type'):
    transformer_config.preset('demo', rope_type='yarn')


def test_llama3_frequencies_match_transformers():
  """The three bands of Llama 3.1's scaling, at the real model's settings (head_dim 64, theta 500000)."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top
  c = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, max_position_embeddings=131072,
                               rope_parameters=dict(rope_type='llama3', rope_theta=500000.0, factor=32.0,
                                                    low_freq_factor=1.0, high_freq_factor=4.0,
                                                    original_max_position_embeddings=8192))
  want, _ = ROPE_INIT_FUNCTIONS['llama3'](c, 'cpu')
  cfg = hf_config.config_from_hf(c)
  got = np.asarray(layers.rope_inv_freq(cfg))
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
  plain = np.asarray(layers.rope_inv_freq(cfg.replace(rope_type='default')))
  assert (got == plain).any() and (got == plain / 32).any() and ((got != plain) & (got != plain / 32)).any()


@pytest.mark.parametrize('name,count', [('llama-3.2-1b', 1_235_814_400), ('qwen3-0.6b', 596_049_920),
                                        ('qwen3-1.7b', 1_720_574_976)])
def test_real_size_presets_match_transformers(name, count):
  """Our shape presets, saved as config.json, build transformers models (on the meta device: no memory) with
  the published parameter count and ours; they default to float32."""
  cfg = transformer_config.preset(name)
  assert cfg.dtype == cfg.param_dtype == 'float32'
  hf_cfg = hf_config.config_to_hf(cfg)
  config = transformers.AutoConfig.for_model(**hf_cfg)
  with torch.device('meta'):
    model = transformers.AutoModelForCausalLM.from_config(config)
  assert type(model).__name__ == hf_config._ARCH_LM[cfg.hf_model_type]
  n = sum(p.numel() for p in model.parameters())
  assert n == cfg.num_params() == count
  assert hf_config.config_from_hf(hf_cfg) == cfg


@pytest.mark.parametrize('name', ['llama3_2_1b', 'qwen3_0_6b', 'qwen3_1_7b'])
def test_preset_config_files(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for data in ('hh', 'tldr'):
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, 'configs', 'presets', f'{name}_{data}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config('stage=ppo')
    assert c.stage == 'ppo' and c.sft.init == 'hf' and c.model.path.startswith('~/models/')
    assert c.model.param_dtype == 'float32' and c.mesh.fsdp == -1
    assert c.sft.optimizer.lr == 5e-6 and c.ppo.kl.coef == 0.05
    assert 1e-7 <= c.ppo.policy_optimizer.lr <= 1e-6


def test_scanned_layout_loads_and_saves_the_same_folder(folders, tmp_path):
  """scan_layers: the HF name map stacks on the way in and unstacks on the way out (LM and scalar model)."""
  path = folders['qwen3']
  ids, mask = padded_ids(V, PAD, 11)
  plain = hf.load_pretrained(path)
  scanned = hf.load_pretrained(path, scan_layers=True, remat='full')
  assert scanned.blocks.attn.q_norm.scale[...].shape == (2, 12)
  np.testing.assert_allclose(our_logits(scanned, ids, mask), our_logits(plain, ids, mask), atol=1e-5)
  hf.save_pretrained(scanned, tmp_path / 'out')
  back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert max_err(torch_logits(back.eval(), ids, mask), our_logits(plain, ids, mask), mask) < 1e-4
  assert 'scan_layers' not in json.loads((tmp_path / 'out' / 'config.json').read_text())
  rm = hf.load_pretrained_body(path, scan_layers=True)
  rm_plain = hf.load_pretrained_body(path)
  np.testing.assert_allclose(np.asarray(rm.score(jnp.asarray(ids), jnp.asarray(mask))),
                             np.asarray(rm_plain.score(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-5)
  hf.save_pretrained(rm, tmp_path / 'rm')
  again = hf.load_scalar_model(tmp_path / 'rm', scan_layers=True)
  np.testing.assert_allclose(np.asarray(again.score(jnp.asarray(ids), jnp.asarray(mask))),
                             np.asarray(rm_plain.score(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-5)
