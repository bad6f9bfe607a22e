"""configs/presets on fixtures: tiny random GPT-2 and Qwen2 models saved in the real HF layouts, tokenizers
with GPT-2's special tokens (no pad) and a Qwen-style chat template, the preset configs' data paths, chat
formatting, SFT packing, and (slow) the whole pipeline on the HH-RLHF fixture with a tiny GPT-2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fixtures
from jax_rlhf.data import batches
from jax_rlhf.data import tokenizer as tok_lib
from jax_rlhf.presets import preset_config
from jax_rlhf.train import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {'gpt2_hh': ('gpt2', 'hh'), 'gpt2_tldr': ('gpt2', 'tldr'), 'qwen2_5_0_5b_hh': ('qwen2.5-0.5b', 'hh'),
           'qwen2_5_0_5b_tldr': ('qwen2.5-0.5b', 'tldr')}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('presets')
  hh = fixtures.write_hh(str(root / 'hh'), n_more=40)
  tldr = root / 'tldr'
  fixtures.write_tldr_sft(str(tldr / 'tldr_3_filtered'))
  fixtures.write_comparisons(str(tldr))
  texts = [c + r for c, r in fixtures.HH_TRAIN + fixtures.hh_more(40)]
  texts += [r['prompt'] + r['response'] for r in fixtures.tldr_sft_expected(fixtures.TLDR_POSTS)]
  gpt2 = fixtures.write_tokenizer(str(root / 'gpt2'), texts)
  qwen = fixtures.write_tokenizer(str(root / 'qwen'), texts, chat_template=fixtures.CHATML)
  from transformers import AutoTokenizer
  fixtures.write_tiny_gpt2(gpt2, len(AutoTokenizer.from_pretrained(gpt2)))
  fixtures.write_tiny_qwen2(qwen, len(AutoTokenizer.from_pretrained(qwen)))
  return {'hh': hh, 'tldr': str(tldr), 'gpt2': gpt2, 'qwen2.5-0.5b': qwen, 'tfds': str(root / 'tfds'),
          'root': root}


def config_for(name, files, arg='quick'):
  model, data = PRESETS[name]
  c = preset_config(model, data, f'{arg},model_dir={files[model]},data_dir={files[data]}')
  c.data.tfds_dir = files['tfds']
  return c


def test_preset_files_name_real_models_and_datasets():
  import importlib.util
  for name, (model, data) in PRESETS.items():
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', 'presets', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config('stage=rm')
    assert c.stage == 'rm' and c.sft.init == 'hf' and c.task.name == ''
    assert c.model.path == c.data.tokenizer and c.data.pad_token
    scheme = 'hh_rlhf' if data == 'hh' else 'tldr_comparisons'
    assert c.data.rankings.startswith(scheme + ':'), c.data.rankings
    assert c.data.max_prompt_len + c.data.max_response_len <= (1024 if model == 'gpt2' else 32768)
    assert c.ppo.kl.coef == 0.05 and c.ppo.temperature == 0.7  # N+
  with pytest.raises(ValueError, match='unknown config variant'):
    preset_config('gpt2', 'hh', 'model_dri=x')


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_preset_data_paths_on_fixtures(name, files):
  """What each stage reads under the preset: tokenizer with an added pad, the model (embedding grown to the
  tokenizer when needed), formatted and batched demonstrations, rankings and prompts."""
  c = config_for(name, files)
  model_name, data = PRESETS[name]
  tok = common.load_tokenizer(c)
  assert tok.pad_token == '<|pad|>' and tok.pad_token_id != tok.eos_token_id
  w = str(files['root'] / f'W_{name}')
  demos = common.records_for(c, w, 'demonstrations', 'train', tok)
  ranks = common.records_for(c, w, 'rankings', 'eval', tok)
  prompts = common.records_for(c, w, 'prompts', 'train', tok)
  chat = model_name != 'gpt2'
  for r in demos + ranks + prompts:
    assert r['prompt'].startswith('<|im_start|>user\n') == chat
    assert r['prompt'].endswith('<|im_start|>assistant\n' if chat else ('Assistant:' if data == 'hh' else 'TL;DR:'))
  if data == 'tldr':
    assert demos[0]['response'] == ' ' + fixtures.TLDR_POSTS[0]['summary']
    assert len(ranks) == len(fixtures.comparisons_expected('validation'))
  arr, cut = batches.demonstrations(tok, demos, c.data.max_prompt_len, c.data.max_response_len)
  assert cut.total == len(demos)
  model = common.load_lm(c.model.path, c, tok)
  assert model.config.vocab_size >= len(tok)
  logits = model(arr['tokens'][:2], arr['attention_mask'][:2])
  assert logits.shape[-1] == model.config.vocab_size and np.isfinite(np.asarray(logits)).all()


def test_checker_reads_a_preset_config(files, capsys):
  from jax_rlhf.data import __main__ as cli
  cfg = f'configs/presets/gpt2_tldr.py:quick,model_dir={files["gpt2"]},data_dir={files["tldr"]}'
  status = cli.main([f'tldr_comparisons:{files["tldr"]}', '--kind', 'ranking', '--config', os.path.join(ROOT, cfg),
                     '--tfds_dir', files['tfds']])
  out = capsys.readouterr().out
  assert status == 0, out
  n = len(fixtures.comparisons_expected('train'))
  assert f'({"all"} split, ranking records): {n} records, 0 bad' in out
  assert '| limit 48: ' in out and '| limit 12: ' in out  # the quick preset's context


def test_hh_transcripts_become_chat_turns():
  prompt = '\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in water.\n\nHuman: For how long?\n\nAssistant:'
  assert tok_lib.to_messages(prompt) == [{'role': 'user', 'content': 'How do I boil an egg?'},
                                         {'role': 'assistant', 'content': 'Put it in water.'},
                                         {'role': 'user', 'content': 'For how long?'}]
  assert tok_lib.to_messages('SUBREDDIT: r/x\n\nTL;DR:') == [{'role': 'user', 'content': 'SUBREDDIT: r/x\n\nTL;DR:'}]


def test_added_pad_grows_the_embedding_with_the_mean_row(files):
  c = config_for('gpt2_hh', files)
  tok = common.load_tokenizer(c)
  raw = common.load_lm(c.model.path, c)
  grown = common.load_lm(c.model.path, c, tok)
  old, new = np.asarray(raw.wte[...]), np.asarray(grown.wte[...])
  assert new.shape[0] == len(tok) == old.shape[0] + 1
  np.testing.assert_array_equal(new[:-1], old)
  np.testing.assert_allclose(new[-1], old.mean(0), rtol=1e-6)


def test_sft_packing_keeps_every_token_and_its_loss_mask():
  arrays = {'tokens': np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [6, 7, 8, 9, 0]]),
            'attention_mask': np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]),
            'loss_mask': np.array([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0]])}
  packed = batches.pack(arrays, 4)
  assert packed['tokens'].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9 is the incomplete remainder
  assert packed['loss_mask'].tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]
  assert packed['attention_mask'].all()


@pytest.mark.slow
def test_pipeline_on_hh_rlhf_with_a_tiny_gpt2_completes_every_stage(files):
  """configs/presets/gpt2_hh.py:quick end to end (SFT from the HF folder, RM, PPO, eval judged by the RM), with
  one bad HH line skipped and counted (data.on_error=skip)."""
  path = os.path.join(files['hh'], 'helpful-base', 'train.jsonl.gz')
  import gzip
  with gzip.open(path, 'rb') as f:
    data = f.read()
  with gzip.open(path, 'wb') as f:
    f.write(data + b'{"chosen": "no assistant turn", "rejected": "x"}\n')
  w = files['root'] / 'W'
  cfg = f'configs/presets/gpt2_hh.py:quick,model_dir={files["gpt2"]},data_dir={files["hh"]}'
  cmd = [sys.executable, '-m', 'jax_rlhf.main', '--config', cfg, '--workdir', str(w),
         f'--config.data.tfds_dir={files["tfds"]}', '--config.data.on_error=skip']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert not (w / 'pretrain').exists()  # SFT starts from the model folder
  assert not (w / 'label').exists()  # the RM reads data.rankings: no label run
  for stage in ('sft', 'rm', 'ppo', 'eval'):
    assert (w / stage / 'DONE').is_file(), stage
  for stage in ('sft', 'rm', 'ppo'):
    assert (w / stage / 'hf' / 'model.safetensors').is_file(), stage
  sft_done = json.loads((w / 'sft' / 'DONE').read_text())
  assert sft_done['data/skipped/demonstrations'] == 1
  assert json.loads((w / 'rm' / 'DONE').read_text())['data/skipped/rankings'] == 1
  assert 'skipped 1 bad records' in proc.stdout and f'{path}:' in proc.stdout
  info = [json.loads(line) for line in (w / 'sft' / 'metrics.jsonl').read_text().splitlines()][0]
  assert info['split'] == 'info' and info['data/skipped/demonstrations'] == 1
  results = json.loads((w / 'eval' / 'results.json').read_text())['models']
  assert results['ppo']['win_rate_judge'] == 'rm' and results['ppo']['gold_score'] is None
  assert np.isfinite(results['ppo']['rm_score']) and np.isfinite(results['ppo']['kl_to_ref'])
  report = (w / 'eval' / 'report.md').read_text()  # written without a labeler: gold cells are '-'
  assert '## Results' in report and 'Best-of-n' not in report
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(w / 'ppo' / 'hf')
  tok = transformers.AutoTokenizer.from_pretrained(w / 'ppo' / 'hf')
  assert model.config.vocab_size == len(tok) and tok.pad_token == '<|pad|>'
