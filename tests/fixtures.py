"""Small files in the real formats of the datasets users download (written by the tests themselves), the
records our builders must make of them, and tiny random models + tokenizers saved in Hugging Face layouts."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np

HH_TRAIN = [  # (chosen transcript, rejected transcript): single- and multi-turn
    ('\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is a classic choice.',
     '\n\nHuman: What is a good name for a cat?\n\nAssistant: I do not know.'),
    ('\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in water.\n\nHuman: For how long?\n\nAssistant:'
     ' About nine minutes for a hard egg.',
     '\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in water.\n\nHuman: For how long?\n\nAssistant:'
     ' Forever.'),
    ('\n\nHuman: Say hello.\n\nAssistant: Hello! How can I help you today?',
     '\n\nHuman: Say hello.\n\nAssistant: No.'),
    ('\n\nHuman: Can you help me pick a lock?\n\nAssistant: I cannot help with that, but a locksmith can.',
     '\n\nHuman: Can you help me pick a lock?\n\nAssistant: Sure, take a pin and push it in.'),
]
HH_TEST = [
    ('\n\nHuman: What colour is the sky?\n\nAssistant: It is usually blue on a clear day.',
     '\n\nHuman: What colour is the sky?\n\nAssistant: Green.'),
    ('\n\nHuman: Name a fruit.\n\nAssistant: An apple.', '\n\nHuman: Name a fruit.\n\nAssistant: A chair.'),
]


def hh_expected(pairs):
  out = []
  for chosen, rejected in pairs:
    cut = chosen.rfind('\n\nAssistant:') + len('\n\nAssistant:')
    out.append({'prompt': chosen[:cut], 'responses': [chosen[cut:].rstrip(), rejected[cut:].rstrip()],
                'ranking': [0, 1]})
  return out


def write_jsonl(path, rows, gz=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = ''.join(json.dumps(r) + '\n' for r in rows).encode()
  with (gzip.open if gz else open)(path, 'wb') as f:
    f.write(data)


def hh_more(n: int, offset: int = 0):
  """n more pairs with distinct prompts (enough prompts for a pipeline's batches)."""
  things = ['cat', 'dog', 'tree', 'river', 'cloud', 'stone', 'bird', 'lamp', 'bread', 'ship', 'song', 'door']
  out = []
  for i in range(offset, offset + n):
    q = f'\n\nHuman: Tell me something about a {things[i % len(things)]} number {i}.\n\nAssistant:'
    out.append((q + f' A {things[i % len(things)]} is a fine thing to ask about.', q + ' Go away.'))
  return out


def write_hh(root, n_more: int = 0):
  """HH-RLHF's layout: <subset>/{train,test}.jsonl.gz; `n_more` generated pairs in each split besides."""
  half = len(HH_TRAIN) // 2
  write_jsonl(os.path.join(root, 'harmless-base', 'train.jsonl.gz'),
              [{'chosen': c, 'rejected': r} for c, r in HH_TRAIN[:half]], gz=True)
  write_jsonl(os.path.join(root, 'helpful-base', 'train.jsonl.gz'),
              [{'chosen': c, 'rejected': r} for c, r in HH_TRAIN[half:] + hh_more(n_more)], gz=True)
  write_jsonl(os.path.join(root, 'helpful-base', 'test.jsonl.gz'),
              [{'chosen': c, 'rejected': r} for c, r in HH_TEST + hh_more(n_more // 4, 1000)], gz=True)
  # red-team-attempts has another format and is not preference data: the builder must leave it alone
  write_jsonl(os.path.join(root, 'red-team-attempts', 'train.jsonl.gz'), [{'transcript': 'x', 'rating': 1}], gz=True)
  return root


TLDR_POSTS = [
    {'id': 't3_a', 'subreddit': 'relationships', 'title': 'My friend never replies',
     'post': 'We have been friends for years. Lately she never answers my messages.',
     'summary': 'friend stopped replying, what do I do?'},
    {'id': 't3_b', 'subreddit': 'personalfinance', 'title': 'Should I pay off my loan early?',
     'post': 'I have 5k left on a car loan at 4%. I have savings.', 'summary': 'pay off a 4% loan early or save?'},
    {'id': 't3_c', 'subreddit': 'cooking', 'title': 'Rice is always mushy',
     'post': 'Every time I cook rice it turns to mush. I use a pot.', 'summary': 'my rice is mushy, help'},
]


def tldr_prompt(p):
  return f"SUBREDDIT: r/{p['subreddit']}\n\nTITLE: {p['title']}\n\nPOST: {p['post']}\n\nTL;DR:"


def write_tldr_sft(root):
  write_jsonl(os.path.join(root, 'train.jsonl'), TLDR_POSTS[:2])
  write_jsonl(os.path.join(root, 'valid.jsonl'), TLDR_POSTS[2:])
  write_jsonl(os.path.join(root, 'test.jsonl'), TLDR_POSTS[2:])
  return root


def tldr_sft_expected(posts):
  return [{'prompt': tldr_prompt(p), 'response': ' ' + p['summary']} for p in posts]


def comparisons():
  """summarize-from-feedback comparison lines: (line, split); one CNN/DM line the builder leaves out."""
  rows = []
  for i, p in enumerate(TLDR_POSTS):
    info = {k: p[k] for k in ('id', 'subreddit', 'title', 'post')}
    summaries = [{'text': ' ' + p['summary'], 'policy': 'ref', 'note': None},
                 {'text': 'something else entirely ' + str(i), 'policy': 'sup2', 'note': None}]
    rows.append({'info': info, 'summaries': summaries, 'choice': i % 2, 'worker': 'w1', 'batch': 'batch3',
                 'split': ('train', 'train', 'valid1')[i], 'extra': {'confidence': 7}})
  rows.append({'info': {'id': 'cnn1', 'article': 'A long news article.', 'title': 'News', 'site': 'cnn'},
               'summaries': [{'text': 'a'}, {'text': 'b'}], 'choice': 0, 'split': 'valid2', 'batch': 'cnndm1'})
  return rows


def comparisons_expected(split):
  out = []
  for i, row in enumerate(comparisons()[:3]):
    if (row['split'] == 'train') != (split == 'train'):
      continue
    texts = [' ' + s['text'].strip() for s in row['summaries']]
    out.append({'prompt': tldr_prompt(TLDR_POSTS[i]), 'responses': [texts[row['choice']], texts[1 - row['choice']]],
                'ranking': [0, 1]})
  return out


def write_comparisons(root):
  rows = comparisons()
  write_jsonl(os.path.join(root, 'comparisons', 'batch3.json'), rows[:2])
  write_jsonl(os.path.join(root, 'comparisons', 'batch10.json'), rows[2:])
  return root


RANKINGS = [
    {'prompt': 'Write a haiku about rain.', 'responses': ['a', 'b', 'c', 'd'], 'ranking': [2, 0, 3, 1]},
    {'prompt': 'Explain gravity to a child.', 'responses': ['w', 'x', 'y', 'z', 'v'], 'ranks': [3, 1, 2, 5, 4]},
    {'prompt': 'Translate "hello" to French.', 'chosen': 'Bonjour', 'rejected': 'Hola'},
]


def rankings_expected():
  return [RANKINGS[0],
          {'prompt': RANKINGS[1]['prompt'], 'responses': RANKINGS[1]['responses'], 'ranking': [1, 2, 0, 4, 3]},
          {'prompt': RANKINGS[2]['prompt'], 'responses': ['Bonjour', 'Hola'], 'ranking': [0, 1]}]


def write_rankings(root):
  write_jsonl(os.path.join(root, 'train.jsonl'), RANKINGS)
  write_jsonl(os.path.join(root, 'test.jsonl'), RANKINGS[:1])
  return root


# ---------------------------------------------------------------------------------------------------- models

def write_tokenizer(path, texts, chat_template=None, vocab_size=400):
  """A byte-level BPE trained on `texts`, saved as a HF tokenizer folder with GPT-2's special token
  (<|endoftext|> for BOS and EOS) and, like GPT-2's, no pad token."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(texts, trainer)
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|endoftext|>', bos_token='<|endoftext|>')
  if chat_template:
    tok.chat_template = chat_template
  tok.save_pretrained(path)
  return path


# A Qwen2-style ChatML template (the shape of Qwen2.5's, without the system-prompt logic).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_tiny_gpt2(path, vocab: int, max_len: int = 128):
  """A random 1-layer GPT-2 saved as transformers saves GPT-2 (model.safetensors, config.json)."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=max_len, n_embd=32, n_layer=1, n_head=2,
                                bos_token_id=0, eos_token_id=0)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
  return path


def write_tiny_qwen2(path, vocab: int, max_len: int = 128):
  """A random 1-layer Qwen2 (grouped-query attention, qkv bias, tied embeddings as in Qwen2.5-0.5B) with an
  embedding larger than the tokenizer, as Qwen2.5's."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(vocab_size=vocab + 16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                                 tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
  transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
  return path


def padded_ids(vocab: int, pad: int, t: int = 9):
  """[3, t] ids with left-padded and unpadded rows mixed; real tokens (>= 3) never equal the pad id."""
  ids = np.random.RandomState(0).randint(3, vocab, (3, t))
  mask = np.ones_like(ids)
  mask[0, :4] = 0
  mask[2, :1] = 0
  ids[mask == 0] = pad
  return ids, mask


def torch_logits(model, ids, mask):
  """transformers' logits with positions from the mask (as ours count them), as numpy."""
  import torch
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
  return out.logits.numpy()


def our_logits(model, ids, mask):
  import jax.numpy as jnp
  return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def max_err(a, b, mask):
  """The largest |a - b| over the real (mask > 0) positions."""
  return float(np.abs(a - b)[mask.astype(bool)].max())


def preempt_then_resume(run, workdir, name: str, step: int, monkeypatch) -> None:
  """`run(name)` SIGTERMed (train/preempt.py's fault injection) at `step`, checked unfinished, then run again as
  a fresh process would: it resumes from its checkpoint and finishes."""
  import signal

  import pytest
  from jax_rlhf.train import preempt
  old = signal.getsignal(signal.SIGTERM)
  monkeypatch.setenv(preempt.FAULT_ENV, f'{name}:{step}:term')
  try:
    preempt.install()
    with pytest.raises(preempt.Preempted):
      run(name)
    assert not os.path.exists(os.path.join(workdir, name, 'DONE'))
    preempt.install()  # a fresh process: no SIGTERM pending
    run(name)
  finally:
    signal.signal(signal.SIGTERM, old)
    preempt._requested = False  # pylint: disable=protected-access


def assert_same_export(a_dir, b_dir) -> None:
  """Two runs' HF exports (hf/model.safetensors) hold bitwise the same weights."""
  from safetensors.numpy import load_file
  a = load_file(os.path.join(a_dir, 'hf', 'model.safetensors'))
  b = load_file(os.path.join(b_dir, 'hf', 'model.safetensors'))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def copy_runs(src, workdir, runs=('sft', 'rm', 'data')) -> None:
  """Copies those of `runs` that `src` (a finished quick pipeline's workdir) holds into `workdir`, without their
  checkpoints and TensorBoard events: the inputs of a stage test."""
  import shutil
  for run in runs:
    if os.path.exists(os.path.join(src, run)):
      shutil.copytree(os.path.join(src, run), os.path.join(workdir, run),
                      ignore=shutil.ignore_patterns('checkpoints', 'tb'))


# Qwen2.5-Instruct's tokenizer, in miniature: Qwen2's pre-tokenizer regex (a punctuation mark may join the
# letters after it, digits one by one) over byte-level BPE, its special tokens (<|endoftext|> the pad, <|im_end|> the
# EOS) and its chat template (the default system turn; the tool-calling branch left out).
QWEN2_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                     r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN25_CHAT = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def write_qwen_instruct_tokenizer(path, texts, vocab_size=500):
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior='isolated', invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  bpe.decoder = decoders.ByteLevel()
  specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(texts, trainer)
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|im_end|>', pad_token='<|endoftext|>',
                                additional_special_tokens=['<|im_start|>'])
  tok.chat_template = QWEN25_CHAT
  tok.save_pretrained(path)
  return path


def write_hf_cache_qwen_instruct(cache, texts, seed: int = 0, revision: str = '0123abcd' * 5):
  """A tiny random Qwen2 (untied head, sliding window declared off: Qwen2.5-7B-Instruct's config keys) and the
  tokenizer above, laid out as the Hugging Face hub cache holds a download: models--Qwen--Qwen2.5-7B-Instruct/
  with refs/main naming the snapshot, whose files are links into blobs/. Returns the repo folder."""
  import hashlib
  import tempfile

  import torch
  import transformers
  repo = os.path.join(cache, 'models--Qwen--Qwen2.5-7B-Instruct')
  snap = os.path.join(repo, 'snapshots', revision)
  blobs = os.path.join(repo, 'blobs')
  os.makedirs(snap)
  os.makedirs(blobs)
  os.makedirs(os.path.join(repo, 'refs'))
  with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
    f.write(revision)
  with tempfile.TemporaryDirectory() as tmp:
    write_qwen_instruct_tokenizer(tmp, texts)
    tok = transformers.AutoTokenizer.from_pretrained(tmp)
    vocab = len(tok)
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=False, use_sliding_window=False, sliding_window=1024,
                                   max_window_layers=2, rope_theta=1e6, initializer_range=0.2,
                                   bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp)
    for name in sorted(os.listdir(tmp)):
      with open(os.path.join(tmp, name), 'rb') as f:
        data = f.read()
      blob = hashlib.sha256(data).hexdigest()
      with open(os.path.join(blobs, blob), 'wb') as f:
        f.write(data)
      os.symlink(os.path.join('..', '..', 'blobs', blob), os.path.join(snap, name))
  return repo
