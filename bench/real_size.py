"""A real-size run: random-init GPT-2 124M through every training stage of the `gpt2_hh` preset, a few steps each.

`configs/presets/gpt2_hh.py` (GPT-2 on Anthropic HH-RLHF) as a user runs it, with two substitutions: the model
folder is a random-init GPT-2 124M (`preset('gpt2')`: 12 layers, d 768, V 50,257, tied head; written by
`hf.save_pretrained` in the HF layout, so SFT loads it exactly as it loads `gpt2`), and the data folder is a
synthetic file in HH-RLHF's format (`helpful-base/{train,test}.jsonl.gz`, {"chosen", "rejected"} dialogues of
"\\n\\nHuman: ... \\n\\nAssistant: ..." turns) with a byte-level BPE trained on it (GPT-2's special token, a pad
added by the preset). Each stage runs as its own process (`python -m jax_rlhf.main --config
configs/presets/gpt2_hh.py:stage=S,model_dir=...,data_dir=...`) with the preset's hyperparameters and its
model (bf16 compute, fp32 parameters), for `--steps` steps and smaller batches and lengths (`--batch`,
`--prompt_len`, `--response_len`; the preset's 128 x 384-token batches take minutes per step on 2 CPU cores):

  sft   from the HF folder (the preset's init=hf)                    step: batch x (P + R) tokens
  rm    on the file's rankings (K = 2), from SFT                     step: batch x 2 x (P + R) tokens
  ppo   policy/reference from SFT, reward and value from the RM      iteration: batch x (P + R) tokens (generation,
        (the preset's path: 4 models; 4 epochs x 2 minibatches)      scoring by 4 models, policy + value updates)
  dpo   offline pairwise DPO on the file's rankings, from SFT        step: batch x 2 x (P + R) tokens
  grpo  G samples per prompt, the RM's reward                        iteration: batch x G x (P + R) tokens

The label stage is not on this path: its judge is the embedded task's labeler, and HH brings its own rankings.
Step times come from each stage's metrics.jsonl (logged every step): the times between consecutive records,
i.e. steps 2..n (step 1, which compiles, has no record before it); `step_s` is their median and tokens/s = the
tokens above / step_s; peak RSS is the stage process's own (`os.wait4`'s ru_maxrss). The stage's wall time includes
start-up, loading, compiles, checkpoints and the HF export.

  /work/venv/bin/python -m bench.real_size [--steps 3] [--batch 8] [--prompt_len 64] [--response_len 32]
      [--model gpt2] [--workdir DIR] [--stages sft,rm,ppo,dpo,grpo]

Its last line is one JSON object: {"bench": "real_size", "model", "params", "stages": {stage: {wall_s,
timed_steps, step_s, min_step_s, tokens_per_step, tokens_per_s, peak_rss_mib}}, "load", ...}.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('sft', 'rm', 'ppo', 'dpo', 'grpo')

TOPICS = ['cat', 'garden', 'bicycle', 'recipe', 'tax form', 'lighthouse', 'violin', 'volcano', 'library', 'river',
          'chess opening', 'train ticket', 'tomato plant', 'password', 'telescope', 'museum']
ASKS = ['How do I take care of a {t}?', 'Can you tell me something interesting about a {t}?',
        'What should I know before buying a {t}?', 'Why does my {t} keep breaking?',
        'Write two sentences about a {t}.', 'Is a {t} a good gift for my brother?']
GOOD = ['Sure. A {t} needs regular attention: check it every week and ask an expert when something looks wrong.',
        'Here is one fact: a {t} has a long history, and people have written whole books about it.',
        'Think about your budget, where you will keep the {t}, and how much time you can give it.',
        'It may be wear and tear. Look at the parts that move the most and replace the worn ones.']
BAD = ['I do not know.', 'No.', 'A {t} is a kind of fish that lives on the moon.', 'Why would you want that?']


def synthetic_hh(root: str, n_train: int, n_test: int, seed: int = 0) -> str:
  """HH-RLHF's layout and format: helpful-base/{train,test}.jsonl.gz of {"chosen", "rejected"}, each a whole
  dialogue; some with a second turn. Returns root."""
  import random
  rng = random.Random(seed)

  def dialogue(i):
    t = TOPICS[i % len(TOPICS)] + f' number {i}'
    head = f'\n\nHuman: {rng.choice(ASKS).format(t=t)}\n\nAssistant:'
    if rng.random() < 0.3:  # a two-turn dialogue: the first answer is part of the prompt
      head += f' {rng.choice(GOOD).format(t=t)}\n\nHuman: Thanks. Anything else?\n\nAssistant:'
    return {'chosen': head + ' ' + rng.choice(GOOD).format(t=t), 'rejected': head + ' ' + rng.choice(BAD).format(t=t)}

  for split, n, off in (('train', n_train, 0), ('test', n_test, 100000)):
    path = os.path.join(root, 'helpful-base', f'{split}.jsonl.gz')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, 'wt') as f:
      for i in range(n):
        f.write(json.dumps(dialogue(off + i)) + '\n')
  return root


def write_tokenizer(path: str, data_root: str, vocab_size: int) -> str:
  """A byte-level BPE on the synthetic dialogues with GPT-2's special token (<|endoftext|> as BOS and EOS, no
  pad), as GPT-2's tokenizer folder is."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  texts = []
  with gzip.open(os.path.join(data_root, 'helpful-base', 'train.jsonl.gz'), 'rt') as f:
    for line in f:
      r = json.loads(line)
      texts += [r['chosen'], r['rejected']]
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|endoftext|>', bos_token='<|endoftext|>')
  tok.save_pretrained(path)
  return path


def write_model(path: str, preset: str, eos_id: int) -> int:
  """A random-init model of `preset` saved as a HF folder (GPT-2's token ids set to the tokenizer's EOS);
  returns its parameter count. Initialised under jit (an eager nnx init compiles op by op)."""
  import jax
  from flax import nnx

  from jax_rlhf.models import hf
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.models.transformer_config import preset as make_preset
  cfg = make_preset(preset, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1])()
  model = nnx.merge(graphdef, state)
  hf.save_pretrained(model, path)
  return cfg.num_params()


def stage_flags(stage: str, args) -> list[str]:
  """The preset's config, cut to a few steps at --batch x (--prompt_len + --response_len)."""
  b, p, r, n = args.batch, args.prompt_len, args.response_len, args.steps
  common = [f'--config.data.max_prompt_len={p}', f'--config.data.max_response_len={r}',
            f'--config.data.seq_len={p + r}',
            '--config.log_every=1', '--config.progress=false', f'--config.checkpoint.every={10 * n}',
            '--config.checkpoint.async_save=false', f'--config.model.scan_layers={args.scan_layers}',
            f'--config.model.remat={args.remat}']
  per = {
      'sft': [f'--config.sft.steps={n}', f'--config.sft.batch_size={b}', f'--config.sft.eval_every={10 * n}'],
      'rm': [f'--config.rm.batch_size={b}', '--config.rm.epochs=1'],  # one epoch of n_train rankings = n steps
      'ppo': [f'--config.ppo.iterations={n}', f'--config.ppo.batch_size={b}',
              f'--config.ppo.num_minibatches={args.ppo_minibatches}',
              f'--config.ppo.ppo_epochs={args.ppo_epochs}', f'--config.ppo.max_new_tokens={r}',
              '--config.ppo.snapshot_every=0'],
      'dpo': [f'--config.dpo.steps={n}', f'--config.dpo.batch_size={b}', f'--config.dpo.eval_every={10 * n}'],
      'grpo': [f'--config.grpo.iterations={n}', f'--config.grpo.prompts_per_step={max(b // args.group, 1)}',
               f'--config.grpo.num_generations={args.group}', f'--config.grpo.max_new_tokens={r}'],
  }
  return common + per[stage]


def tokens_per_step(stage: str, args) -> int:
  length = args.prompt_len + args.response_len
  return {'sft': args.batch * length, 'rm': args.batch * 2 * length, 'ppo': args.batch * length,
          'dpo': args.batch * 2 * length, 'grpo': max(args.batch // args.group, 1) * args.group * length}[stage]


def step_times(run_dir: str) -> list[float]:
  """Seconds between consecutive training records of metrics.jsonl (logged every step): the wall times of
  steps 2..n (the first record is written after step 1, compile included)."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  recs = [json.loads(line) for line in open(path)]
  recs = [r for r in recs if r.get('split', 'train') == 'train']
  times = sorted({(r['step'], r['time']) for r in recs})
  by_step = {}
  for step, t in times:
    by_step.setdefault(step, t)
  steps = sorted(by_step)
  return [by_step[b] - by_step[a] for a, b in zip(steps, steps[1:])]


def run_stage(stage: str, args, model_dir: str, data_dir: str, workdir: str) -> dict:
  config = f'configs/presets/gpt2_hh.py:stage={stage},model_dir={model_dir},data_dir={data_dir}'
  cmd = [sys.executable, '-m', 'jax_rlhf.main', '--config', config, '--workdir', workdir,
         f'--config.data.tfds_dir={os.path.join(workdir, "tfds")}', *stage_flags(stage, args)]
  log = open(os.path.join(workdir, f'{stage}.log'), 'w')
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t
  proc.returncode = os.waitstatus_to_exitcode(status)
  log.close()
  if proc.returncode:
    tail = open(os.path.join(workdir, f'{stage}.log')).read()[-3000:]
    raise SystemExit(f'{stage} failed (exit {proc.returncode}): {" ".join(cmd)}\n{tail}')
  dts = step_times(os.path.join(workdir, stage))
  step_s = statistics.median(dts) if dts else None
  n_tok = tokens_per_step(stage, args)
  return dict(wall_s=wall, timed_steps=len(dts), step_s=step_s, min_step_s=min(dts) if dts else None,
              tokens_per_step=n_tok, tokens_per_s=n_tok / step_s if step_s else None,
              peak_rss_mib=usage.ru_maxrss / 1024)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='gpt2', help='model preset of the random init (tiny for a smoke run)')
  p.add_argument('--steps', type=int, default=3, help='steps (iterations) per stage')
  p.add_argument('--batch', type=int, default=8, help='sequences (rankings, prompts) per step')
  p.add_argument('--group', type=int, default=4, help='GRPO samples per prompt')
  p.add_argument('--ppo_epochs', type=int, default=4, help="PPO epochs per iteration (the preset's 4)")
  p.add_argument('--ppo_minibatches', type=int, default=2, help="PPO minibatches per epoch (the preset's 4)")
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--response_len', type=int, default=32)
  p.add_argument('--n_train', type=int, default=0,
                 help='synthetic HH dialogues in the train split; 0: steps x batch (the RM trains one epoch)')
  p.add_argument('--vocab', type=int, default=8000, help='BPE vocabulary (the model keeps its own, larger)')
  p.add_argument('--scan_layers', default='true', choices=('true', 'false'))
  p.add_argument('--remat', default='none', choices=('none', 'full', 'dots_saveable'))
  p.add_argument('--stages', default=','.join(STAGES))
  p.add_argument('--workdir', default='', help='keep the runs here (default: a temporary folder)')
  args = p.parse_args()
  stages = [s for s in args.stages.split(',') if s]
  unknown = set(stages) - set(STAGES)
  if unknown:
    p.error(f'unknown stages {sorted(unknown)}; known: {",".join(STAGES)}')
  args.n_train = args.n_train or args.steps * args.batch
  root = args.workdir or tempfile.mkdtemp(prefix='real_size_')
  os.makedirs(root, exist_ok=True)
  data_dir = synthetic_hh(os.path.join(root, 'hh'), args.n_train, max(args.n_train // 8, 16))
  model_dir = write_tokenizer(os.path.join(root, 'model'), data_dir, args.vocab)
  from transformers import AutoTokenizer
  eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
  params = write_model(model_dir, args.model, eos)
  workdir = os.path.join(root, 'W')
  os.makedirs(workdir, exist_ok=True)
  print(f'random-init {args.model} ({params:,} parameters) in {model_dir}; synthetic HH in {data_dir}', flush=True)
  results = {}
  for stage in stages:
    r = results[stage] = run_stage(stage, args, model_dir, data_dir, workdir)
    fmt = lambda x, f: '-' if x is None else format(x, f)  # noqa: E731
    print(f'{stage:5s} wall {r["wall_s"]:7.1f} s  step {fmt(r["step_s"], ".2f")} s (median of {r["timed_steps"]})  '
          f'{fmt(r["tokens_per_s"], ",.0f")} tok/s  peak RSS {r["peak_rss_mib"]:,.0f} MiB', flush=True)
  load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
  print(f'(batch {args.batch}, prompt {args.prompt_len} + response {args.response_len} tokens, {args.steps} steps '
        f'each, scan_layers {args.scan_layers}, remat {args.remat}; load {load}; {os.cpu_count()} CPUs)')
  out = {'bench': 'real_size', 'model': args.model, 'params': params, 'batch': args.batch,
         'group': args.group, 'ppo_epochs': args.ppo_epochs, 'ppo_minibatches': args.ppo_minibatches,
         'prompt_len': args.prompt_len, 'response_len': args.response_len, 'steps': args.steps,
         'scan_layers': args.scan_layers == 'true', 'remat': args.remat, 'stages': results, 'load': load,
         'cpus': os.cpu_count(), 'date': time.strftime('%Y-%m-%dT%H:%M:%S')}
  common.emit(out)


if __name__ == '__main__':
  main()
