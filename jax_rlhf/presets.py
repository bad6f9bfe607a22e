"""Presets for real models on real preference data: GPT-2 (124M), Qwen2.5-0.5B, Llama-3.2-1B, Qwen3-0.6B and
Qwen3-1.7B, with Anthropic HH-RLHF or
OpenAI's TL;DR (summarize-from-feedback), read from files the user downloaded. `configs/presets/*.py` call
`preset_config(model, data, arg)`; `arg` is a comma list:

  stage=<stage>      pretrain | sft | rm | ppo | eval | pipeline (default: pipeline; pretrain is skipped, SFT
                     starts from the model folder)
  model_dir=<dir>    the Hugging Face folder of the model (config.json, model.safetensors, tokenizer files)
  data_dir=<dir>     the downloaded dataset (for tldr, a folder with tldr_3_filtered/ and comparisons/)
  quick              tiny step counts and lengths (tests, smoke runs on fixtures)
  ai_judge           AI feedback: Qwen2.5-Instruct ranks the policy's own samples (label stage), and the RM (or
                     DPO) trains on its labels instead of the dataset's human rankings (`JUDGE` below)
  judge_dir=<dir>    the judge's folder (implies ai_judge): a Qwen2.5-Instruct snapshot, or its Hugging Face cache
                     folder (hub/models--Qwen--Qwen2.5-7B-Instruct, whose refs/main names the snapshot)
and the variants of jax_rlhf/variants.py (instructgpt, ptx=<coef>).

Hyperparameters: N+ (Huang et al. 2024, Pythia 1B-6.9B on TL;DR: SFT/RM/PPO lr 3e-6, SFT batch 128 for one
epoch, RM batch 64 for one epoch, PPO 512 episodes per batch, 4 epochs of 4 minibatches, beta 0.05,
temperature 0.7, 53 response tokens, missing-EOS penalty -1) and InstructGPT (RM lr 9e-6, PPO-ptx off here).
Scaled to smaller models: the learning rates are raised (GPT-2 124M: 1e-5 SFT and RM, 3e-6 PPO; Qwen2.5-0.5B:
5e-6 SFT and RM, 1e-6 PPO) and the batches sized for one GPU or a TPU v4-8 (gradient accumulation is not
needed at these sizes). The default step counts are about one epoch of each dataset.

Llama 3.x and Qwen3 (the families people align now): Tulu 3 (Lambert et al. 2024, arXiv 2411.15124, and
allenai/open-instruct docs/tulu3.md) on Llama-3.1-8B uses SFT lr 5e-6 (linear, 3% warm-up, batch 128), RM lr
3e-6 (one epoch), PPO (RLVR) lr 3e-7 with KL beta 0.05, DPO lr 5e-7. Our smaller models take those values
raised as above for the size: Llama-3.2-1B SFT 5e-6, RM 3e-6, PPO 5e-7; Qwen3-1.7B the same; Qwen3-0.6B the
Qwen2.5-0.5B values (5e-6, 5e-6, 1e-6). KL beta stays N+'s 0.05 (the same value as Tulu 3). All three keep
parameters in float32 and compute in bfloat16 like the presets above, sharded ZeRO-3 style (fsdp). Shapes:
`jax_rlhf.models.transformer_config.PRESETS` (from the models' config.json files on the Hugging Face hub); the
model itself is read from `model_dir` (its config.json wins).
"""
from __future__ import annotations

import os

import ml_collections

from jax_rlhf.config import STAGES, stage_config
from jax_rlhf.variants import apply_variants

MODELS = {
    'gpt2': dict(dir='~/models/gpt2', dtype='bfloat16', sft_lr=1e-5, rm_lr=1e-5, ppo_lr=3e-6, mesh=dict(data=-1, fsdp=1)),
    'qwen2.5-0.5b': dict(dir='~/models/Qwen2.5-0.5B', dtype='bfloat16', sft_lr=5e-6, rm_lr=5e-6, ppo_lr=1e-6,
                         mesh=dict(data=1, fsdp=-1)),  # ZeRO-3 style: parameters and Adam state sharded
    # Llama 3.2 1B (base): rope_type llama3 (factor 32), GQA 32/8 heads, tied embeddings. Tulu 3's rates.
    'llama-3.2-1b': dict(dir='~/models/Llama-3.2-1B', dtype='bfloat16', sft_lr=5e-6, rm_lr=3e-6, ppo_lr=5e-7,
                         mesh=dict(data=1, fsdp=-1)),
    # Qwen3 0.6B (base): q/k RMSNorm, head_dim 128 decoupled from width 1024, tied embeddings.
    'qwen3-0.6b': dict(dir='~/models/Qwen3-0.6B-Base', dtype='bfloat16', sft_lr=5e-6, rm_lr=5e-6, ppo_lr=1e-6,
                       mesh=dict(data=1, fsdp=-1)),
    # Qwen3 1.7B (base): as 0.6B at width 2048; between Qwen2.5-0.5B's and Tulu 3's 8B rates.
    'qwen3-1.7b': dict(dir='~/models/Qwen3-1.7B-Base', dtype='bfloat16', sft_lr=5e-6, rm_lr=3e-6, ppo_lr=5e-7,
                       mesh=dict(data=1, fsdp=-1)),
}
DATA = {
    # HH-RLHF: SFT on the chosen responses (a ranking source gives its best response), RM on the pairs, PPO
    # on the prompts. Transcripts are long: the prompt keeps its last 256 tokens (cut from the left).
    'hh': dict(dir='~/data/hh-rlhf', demonstrations='hh_rlhf:{d}', rankings='hh_rlhf:{d}', prompts='hh_rlhf:{d}',
               max_prompt_len=256, max_response_len=128, sft_steps=1250, rm_epochs=1, ppo_iterations=300),
    # TL;DR: N+'s 512-token queries, 53-token responses; SFT on tldr_3_filtered (116k), RM on the 93k
    # comparisons, PPO on the SFT set's queries.
    'tldr': dict(dir='~/data/tldr', demonstrations='tldr_sft:{d}/tldr_3_filtered',
                 rankings='tldr_comparisons:{d}', prompts='tldr_sft:{d}/tldr_3_filtered',
                 max_prompt_len=512, max_response_len=53, sft_steps=900, rm_epochs=1, ppo_iterations=900),
}


# AI feedback (RLAIF, Lee et al. 2023, arXiv 2309.00267; Constitutional AI, Bai et al. 2022b): an
# instruction-tuned LM labels comparisons of the policy's samples. Qwen2.5-Instruct: every size (0.5B-72B)
# shares the tokenizer and the ChatML chat template this question is written for; 7B by default (RLAIF: the AI
# labeler's agreement with humans grows with its size), 1.5B or 3B where memory is short. The question goes in
# as the user turn and asks for one letter; the answer prefix is empty, so the token read is the first of the
# assistant's reply (right after '<|im_start|>assistant\n'), where an instruction-tuned model puts the letter it
# was asked for. (A prefix must not end in a character Qwen's pre-tokenizer joins to the letter after it:
# after '\n(' the text '(A' is one token, and 'A' alone is never seen there.) K = 4 samples per prompt
# (InstructGPT's fewest): 6 pairs, 12 judge passes per prompt with swap-and-average. Samples at the PPO
# temperature (0.7), so the RM learns the distribution PPO samples from. A request longer than judge_max_len
# tokens loses its oldest turns.
JUDGE = dict(
    dir='~/.cache/huggingface/hub/models--Qwen--Qwen2.5-7B-Instruct',
    template=('You are comparing two responses of an AI assistant to the same request.\n{principle}\n\n'
              '[Request]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n'
              'Which response is better? Answer with one letter: A or B.'),
    answer_prefix='', options=('A', 'B'), k=4, max_len=1024, batch_size=16)


def ai_judge(c: ml_collections.ConfigDict, judge_dir: str) -> None:
  """Label with the Qwen2.5-Instruct judge in `judge_dir` (`JUDGE`); the RM and DPO read the label run's
  rankings (data.rankings cleared), so the plan makes the label run."""
  c.label.update(judge='lm:' + judge_dir, judge_template=JUDGE['template'], judge_answer_prefix=JUDGE['answer_prefix'],
                 judge_options=JUDGE['options'], k_min=JUDGE['k'], k_max=JUDGE['k'], temperature=c.ppo.temperature,
                 judge_max_len=JUDGE['max_len'], judge_batch_size=JUDGE['batch_size'])
  c.data.rankings = ''


def preset_config(model: str, data: str, arg: str | None = None) -> ml_collections.ConfigDict:
  m, d = MODELS[model], DATA[data]
  stage, model_dir, data_dir, judge_dir, rest = 'pipeline', m['dir'], d['dir'], '', []
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key == 'stage' and value:
      stage = value
    elif key == 'model_dir' and value:
      model_dir = value
    elif key == 'data_dir' and value:
      data_dir = value
    elif key == 'judge_dir' and value:
      judge_dir = value
    elif item == 'ai_judge':
      judge_dir = judge_dir or JUDGE['dir']
    else:
      rest.append(item)
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage!r}; stages: {STAGES}')
  c = stage_config(stage)
  c.task.name = ''  # no embedded task: every source comes from data.*
  c.model.path = model_dir
  c.model.dtype = m['dtype']
  c.mesh.update(m['mesh'])
  c.data.update(tokenizer=model_dir, pad_token='<|pad|>', max_prompt_len=d['max_prompt_len'],
                max_response_len=d['max_response_len'], seq_len=d['max_prompt_len'] + d['max_response_len'],
                tfds_dir=os.path.join('~', 'tensorflow_datasets'), chat_template='auto')
  for role in ('demonstrations', 'rankings', 'prompts'):
    c.data[role] = d[role].format(d=data_dir.rstrip('/'))
  c.log_every = 10
  c.checkpoint.every = 100

  c.sft.update(init='hf', steps=d['sft_steps'], batch_size=128, eval_every=250, dropout=0.0)
  c.sft.optimizer.update(lr=m['sft_lr'], schedule='cosine', end_lr_frac=0.1, warmup_steps=20)
  c.rm.update(epochs=d['rm_epochs'], batch_size=64, normalize=True, normalize_gain=False)
  c.rm.optimizer.update(lr=m['rm_lr'], schedule='cosine', end_lr_frac=0.1, warmup_steps=20)
  c.ppo.update(iterations=d['ppo_iterations'], batch_size=512, ppo_epochs=4, num_minibatches=4, temperature=0.7,
               max_new_tokens=d['max_response_len'], missing_eos_penalty=-1.0)
  c.ppo.kl.update(coef=0.05, adaptive=False)
  c.ppo.policy_optimizer.update(lr=m['ppo_lr'], schedule='linear')
  c.ppo.value_optimizer.update(lr=m['ppo_lr'], schedule='linear')
  c.eval.update(temperature=0.7, max_new_tokens=d['max_response_len'], batch_size=64, max_prompts=1024)
  if judge_dir:
    ai_judge(c, judge_dir)
  if 'quick' in rest:
    rest.remove('quick')
    _quick(c)
  return apply_variants(c, ','.join(rest))


def _quick(c: ml_collections.ConfigDict) -> None:
  """Tiny runs on fixture files with a tiny random model (tests): every path of the preset, in seconds."""
  c.progress = False
  c.log_every = 2
  c.checkpoint.update(every=2, async_save=False)
  c.mesh.update(data=-1, fsdp=1)
  c.model.dtype = 'float32'
  c.data.update(max_prompt_len=48, max_response_len=12, seq_len=60, eval_fraction=0.25)
  c.sft.update(steps=4, batch_size=8, eval_every=2)
  c.sft.optimizer.lr = c.rm.optimizer.lr = 1e-3  # so that a few steps visibly move a tiny random model
  c.ppo.policy_optimizer.lr = c.ppo.value_optimizer.lr = 1e-3
  c.rm.update(epochs=2, batch_size=8)
  c.ppo.update(iterations=2, batch_size=8, num_minibatches=1, max_new_tokens=12)
  c.eval.update(batch_size=8, max_new_tokens=12, max_prompts=8)
