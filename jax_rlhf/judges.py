"""Who ranks the label stage's samples (`label.judge`): the task's labeler, a reward model, or an AI judge.

A judge is called with the prompts, the K responses of each and a numpy Generator, and returns one dict per
prompt: {'ranking': response indices, best first} and, for the lm: judge, {'prefs': K x K, P(i beats j)}, the
soft labels the RM (a soft Bradley-Terry target, `losses.soft_ranking_loss`) and DPO (per-pair label
smoothing) can train on.

  task     the task's noisy labeler (instruct_world: ~73% inter-labeler agreement), the stand-in for humans.
  rm:RUN   the reward model of that run of the workdir scores every response; the ranking is by score
           (self-labelling: a new round's rankings come from the last RM).
  lm:PATH  a causal LM folder (its own tokenizer; a snapshot folder, or a Hugging Face cache folder
           models--ORG--NAME whose refs/main names the snapshot) is asked which of two responses is better,
           under a principle drawn at random per comparison from a constitution file (Constitutional AI, Bai et
           al. 2022b, section 4.1). Its preference is the softmax over the two option tokens' logits at the answer
           position, averaged over both orders of the responses (RLAIF, Lee et al. 2023, section 2.2:
           "position bias" is cancelled by swapping). A K-way ranking comes from all C(K,2) pairs by a
           Bradley-Terry fit to the soft preferences (`label.judge_rank=bt`) or by expected win counts (wins).

Judges are given the prompts as their source wrote them (an HH transcript, a task prompt); the rm: judge scores
them as the RM was trained, through the policy tokenizer's chat template when it has one.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf.train import common

CONSTITUTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'constitution.txt')


class TaskJudge:
  """The task's labeler."""

  def __init__(self, config):
    self.task = common.get_task(config)
    if self.task is None:
      raise common.UserError('label.judge=task needs an embedded task (task.name is empty)')

  def __call__(self, prompts: Sequence[str], groups: Sequence[Sequence[str]], rng) -> list[dict]:
    return [{'ranking': [int(i) for i in self.task.rank(p, list(g), rng)]} for p, g in zip(prompts, groups)]


class RMJudge:
  """A reward model run of the workdir ranks each prompt's responses by its score (ties: lower index first)."""

  def __init__(self, config, workdir: str, run: str, needed_by: str):
    from jax_rlhf.models import hf
    d = common.require_stage(workdir, run, needed_by)
    self.config, self.tok = config, common.load_tokenizer(config)
    self.model = hf.load_scalar_model(os.path.join(d, 'hf'), dtype=config.model.dtype,
                                      param_dtype=config.model.param_dtype)
    self.score = jax.jit(lambda m, t, a: m.score(t, a))

  def scores(self, prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """The RM's score of every response, as the RM stage sees a ranking record (prompt + response + EOS)."""
    from jax_rlhf.data import batches
    from jax_rlhf.data import tokenizer as tok_lib
    dc = self.config.data
    recs = [{'prompt': tok_lib.format_prompt(self.tok, p, dc.chat_template), 'responses': list(g),
             'ranking': list(range(len(g)))} for p, g in zip(prompts, groups)]
    k = max(len(g) for g in groups)
    arrays, _ = batches.rankings(self.tok, recs, dc.max_prompt_len, dc.max_response_len, k)
    tokens = arrays['tokens'].reshape(-1, arrays['tokens'].shape[-1])
    att = arrays['attention_mask'].reshape(tokens.shape)
    bs = self.config.label.batch_size
    out = np.concatenate([np.asarray(self.score(self.model, tokens[s:s + bs], att[s:s + bs]))
                          for s in range(0, len(tokens), bs)]).reshape(len(recs), k)
    return [row[:len(g)] for row, g in zip(out, groups)]

  def __call__(self, prompts, groups, rng) -> list[dict]:
    del rng
    return [{'ranking': [int(i) for i in np.argsort(-s, kind='stable')]} for s in self.scores(prompts, groups)]


def model_folder(path: str, what: str) -> str:
  """The model folder `path` names: itself when it holds config.json; for a Hugging Face cache folder
  (hub/models--ORG--NAME, as `huggingface-cli download ORG/NAME` leaves it), the snapshot its refs/main names,
  or its only snapshot. Anything else is a UserError naming `what` (the config field)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(os.path.join(path, 'config.json')):
    return path
  snapshots = os.path.join(path, 'snapshots')
  if os.path.isdir(snapshots):
    ref = os.path.join(path, 'refs', 'main')
    if os.path.isfile(ref):
      with open(ref) as f:
        rev = f.read().strip()
      if os.path.isfile(os.path.join(snapshots, rev, 'config.json')):
        return os.path.join(snapshots, rev)
    found = sorted(d for d in os.listdir(snapshots) if os.path.isfile(os.path.join(snapshots, d, 'config.json')))
    if len(found) == 1:
      return os.path.join(snapshots, found[0])
    if found:
      raise common.UserError(f'{what}: {path} holds {len(found)} snapshots and no refs/main naming one of them; '
                             f'name the snapshot folder ({os.path.join(snapshots, found[0])}, ...)')
  if not os.path.isdir(path):
    raise common.UserError(f'{what}: no such model folder {path}')
  raise common.UserError(f'{what}: {path} holds no config.json (a model folder, or a Hugging Face cache folder '
                         f'models--ORG--NAME with snapshots/)')


def read_constitution(path: str) -> list[str]:
  """The principles of a constitution file: one per non-empty line (lines starting with # are comments)."""
  if not os.path.isfile(path):
    raise common.UserError(f'label.constitution: {path} does not exist (one principle per line)')
  with open(path) as f:
    lines = [line.strip() for line in f]
  principles = [line for line in lines if line and not line.startswith('#')]
  if not principles:
    raise common.UserError(f'label.constitution: {path} holds no principle (one per line)')
  return principles


def judge_prompt(tok, template: str, answer_prefix: str, prompt: str, a: str, b: str, principle: str,
                 chat_template: str = 'auto') -> str:
  """The text the judge reads before its answer token: `template` filled in, as the user turn of the
  tokenizer's chat template when it has one (and `chat_template` is auto), then `answer_prefix`."""
  from jax_rlhf.data import tokenizer as tok_lib
  question = template.format(principle=principle, prompt=prompt.strip(), a=a, b=b)
  if tok_lib.uses_chat_template(tok, chat_template):
    question = tok.apply_chat_template([{'role': 'user', 'content': question}], add_generation_prompt=True,
                                       tokenize=False)
  return question + answer_prefix


def sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def bradley_terry(prefs: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
  """Strengths s [K] maximising sum_{i != j} P_ij log sigmoid(s_i - s_j) - l2/2 |s|^2 (Bradley & Terry 1952,
  with soft outcomes P_ij = P(i beats j); the small ridge keeps s finite when a P_ij is 0 or 1). Newton's
  method in float64 (the objective is concave); without the ridge s is fixed up to a shift and keeps mean 0."""
  p = np.asarray(prefs, np.float64)
  k = p.shape[0]
  off = ~np.eye(k, dtype=bool)
  s = np.zeros(k)
  for _ in range(iters):
    q = sigmoid(s[:, None] - s[None, :])  # model P(i beats j)
    grad = np.where(off, p - q, 0.0).sum(1) - l2 * s
    w = np.where(off, q * (1 - q), 0.0)  # both terms (i, j) and (j, i) of the pair give w_ij
    hess = 2 * w - np.diag(2 * w.sum(1)) - l2 * np.eye(k)
    step = np.linalg.lstsq(hess, grad, rcond=None)[0]  # without the ridge, the minimum-norm step (mean kept)
    s = s - step
    if np.max(np.abs(step)) < 1e-12:
      break
  return s


def ranking_from_prefs(prefs: np.ndarray, how: str = 'bt') -> list[int]:
  """A K-way ranking (indices, best first; ties keep index order) from pairwise preferences: by a
  Bradley-Terry fit (bt) or by expected win counts sum_j P_ij (wins)."""
  p = np.asarray(prefs, np.float64)
  if how == 'bt':
    s = bradley_terry(p)
  elif how == 'wins':
    s = np.where(~np.eye(len(p), dtype=bool), p, 0.0).sum(1)
  else:
    raise common.UserError(f'label.judge_rank must be bt or wins, got {how!r}')
  return [int(i) for i in np.argsort(-s, kind='stable')]


class LMJudge:
  """A causal LM asked, per pair, which response is better under a random principle; swap-and-average."""

  def __init__(self, config, path: str):
    from transformers import AutoTokenizer
    lc = config.label
    self.config, self.lc = config, lc
    path = self.path = model_folder(path, f'label.judge=lm:{path}')  # a missing folder: one line
    self.tok = AutoTokenizer.from_pretrained(path)
    # frozen: its parameters in model.frozen_dtype (bfloat16 halves a 7B judge's memory), compute in model.dtype
    self.model = common.load_lm(path, config, param_dtype=config.model.frozen_dtype)
    self.principles = read_constitution(lc.constitution or CONSTITUTION)
    if len(lc.judge_options) != 2:
      raise common.UserError(f'label.judge_options must be two option tokens, got {tuple(lc.judge_options)}')
    ids = []
    for opt in lc.judge_options:
      got = self.tok.encode(opt, add_special_tokens=False)
      if len(got) != 1:
        raise common.UserError(f'label.judge_options: {opt!r} is {len(got)} tokens of the judge tokenizer in '
                               f'{path}, not one')
      ids.append(got[0])
    if ids[0] == ids[1]:
      raise common.UserError(f'label.judge_options {tuple(lc.judge_options)} are the same token')
    for field in ('{principle}', '{prompt}', '{a}', '{b}'):
      if field not in lc.judge_template:
        raise common.UserError(f'label.judge_template must hold {field}')
    self.option_ids = np.asarray(ids, np.int32)
    self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0)
    self.cut = 0  # judge texts cut from the left to judge_max_len (their request could not absorb the excess)
    self.shortened = 0  # judge texts whose request was cut from the left to fit judge_max_len
    graphdef, state = nnx.split(self.model)

    def last_logits(state, tokens, mask):  # left-padded rows: the last position predicts the answer token
      return nnx.merge(graphdef, state)(tokens, mask)[:, -1, :]
    self._state = state
    self._last = jax.jit(last_logits)

  def texts(self, prompt: str, first: str, second: str, principle: str) -> str:
    """The judge's text for one order of a pair. Longer than judge_max_len tokens: the request loses its first
    tokens (the conversation's oldest turns, as the policy's prompt is cut), so that the instructions, the
    responses and the answer position stay whole."""
    lc = self.lc
    text = judge_prompt(self.tok, lc.judge_template, lc.judge_answer_prefix, prompt, first, second, principle,
                        self.config.data.chat_template)
    over = len(self._ids(text)) - lc.judge_max_len
    if over <= 0:
      return text
    ids = self.tok.encode(prompt.strip(), add_special_tokens=False)
    drop = over + 1  # the marker takes a token or more
    while drop < len(ids):  # re-tokenised text can differ by a token or two at the seams: cut until it fits
      cut = judge_prompt(self.tok, lc.judge_template, lc.judge_answer_prefix, '...' + self.tok.decode(ids[drop:]),
                         first, second, principle, self.config.data.chat_template)
      over = len(self._ids(cut)) - lc.judge_max_len
      if over <= 0:
        self.shortened += 1
        return cut
      drop += over
    return text  # the request cannot absorb the excess: option_logits cuts the text from the left (counted)

  def _ids(self, text: str) -> list[int]:
    return self.tok(text, add_special_tokens=not _chat(self.tok, self.config.data.chat_template))['input_ids']

  def option_logits(self, texts: Sequence[str]) -> np.ndarray:
    """The two option tokens' logits at the answer position of each judge text: [n, 2] float64."""
    lc = self.lc
    add_special = not _chat(self.tok, self.config.data.chat_template)
    out = []
    for s in range(0, len(texts), lc.judge_batch_size):
      chunk = list(texts[s:s + lc.judge_batch_size])
      rows = [list(x) for x in self.tok(chunk, add_special_tokens=add_special)['input_ids']]
      for i, r in enumerate(rows):
        if len(r) > lc.judge_max_len:
          rows[i] = r[len(r) - lc.judge_max_len:]
          self.cut += 1
      length = -(-max(len(r) for r in rows) // 32) * 32  # few compiled shapes
      n = lc.judge_batch_size if len(texts) > lc.judge_batch_size else len(chunk)
      tokens = np.full((n, length), self.pad, np.int32)
      mask = np.zeros((n, length), np.int32)
      for i, r in enumerate(rows):
        tokens[i, length - len(r):], mask[i, length - len(r):] = r, 1
      mask[len(rows):, -1] = 1  # padding rows: one real token, so no row is all padding
      logits = np.asarray(self._last(self._state, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)
      out.append(logits[:len(rows)][:, self.option_ids])
    return np.concatenate(out) if out else np.zeros((0, 2))

  def pair_preferences(self, prompt: str, pairs: Sequence[tuple[str, str]], principles: Sequence[str]
                       ) -> np.ndarray:
    """P(x beats y) for each pair (x, y), swap-and-averaged: for the canonical order (u, v) of the two texts,

      p_uv = 1/2 [ softmax(logits | A=u, B=v)_A + softmax(logits | A=v, B=u)_B ]

    and P(x beats y) = p_uv when x = u, 1 - p_uv when x = v (so P(x > y) + P(y > x) = 1 exactly, whatever the
    order the pair comes in); identical texts are 1/2. A constant preference for one position (the same logit
    added to option A in both orders) moves both terms oppositely and cancels to first order."""
    texts, canon = [], []
    for (x, y), principle in zip(pairs, principles):
      u, v = (x, y) if x <= y else (y, x)
      canon.append(x == u)
      if x != y:
        texts += [self.texts(prompt, u, v, principle), self.texts(prompt, v, u, principle)]
    logits = self.option_logits(texts).reshape(-1, 2, 2)  # [pairs, order, option]
    d = logits[:, :, 0] - logits[:, :, 1]  # logit(A) - logit(B), per order
    p_uv = 0.5 * (sigmoid(d[:, 0]) + sigmoid(-d[:, 1]))  # 2-way softmax = sigmoid of the logit difference
    out, it = np.empty(len(pairs)), iter(p_uv)
    for n, ((x, y), is_u) in enumerate(zip(pairs, canon)):
      p = next(it) if x != y else 0.5
      out[n] = p if is_u else 1.0 - p
    return out

  def __call__(self, prompts, groups, rng) -> list[dict]:
    out = []
    for prompt, group in zip(prompts, groups):
      k = len(group)
      idx = [(i, j) for i in range(k) for j in range(i + 1, k)]
      principles = [self.principles[int(rng.integers(len(self.principles)))] for _ in idx]
      p = self.pair_preferences(prompt, [(group[i], group[j]) for i, j in idx], principles)
      prefs = np.full((k, k), 0.5)
      for (i, j), pij in zip(idx, p):
        prefs[i, j], prefs[j, i] = pij, 1.0 - pij
      out.append({'ranking': ranking_from_prefs(prefs, self.lc.judge_rank), 'prefs': prefs.tolist()})
    return out


def _chat(tok, mode) -> bool:
  from jax_rlhf.data import tokenizer as tok_lib
  return tok_lib.uses_chat_template(tok, mode)


def soft_labels(recs: list[dict], k_max: int) -> np.ndarray:
  """P(i beats j) [N, k_max, k_max] of ranking records: a judge's soft 'prefs' where a record has them, else
  the hard labels of its ranking (1 when i is ranked above j, 0 below; 0.5 on the diagonal and padding)."""
  out = np.full((len(recs), k_max, k_max), 0.5, np.float32)
  for n, r in enumerate(recs):
    k = len(r['responses'])
    if 'prefs' in r:
      out[n, :k, :k] = np.asarray(r['prefs'], np.float32)
    else:
      pos = np.empty(k, np.int64)
      pos[np.asarray(r['ranking'])] = np.arange(k)
      out[n, :k, :k] = np.where(pos[:, None] < pos[None, :], 1.0, np.where(pos[:, None] > pos[None, :], 0.0, 0.5))
  return out


def get_judge(config, workdir: str, needed_by: str = 'label'):
  """The judge `label.judge` names: task | rm:RUN | lm:PATH; any other is a UserError naming them."""
  name = config.label.judge
  kind, _, arg = name.partition(':')
  if kind == 'task' and not arg:
    return TaskJudge(config)
  if kind == 'rm' and arg:
    return RMJudge(config, workdir, arg, needed_by)
  if kind == 'lm' and arg:
    if config.label.judge_rank not in ('bt', 'wins'):
      raise common.UserError(f'label.judge_rank must be bt or wins, got {config.label.judge_rank!r}')
    return LMJudge(config, arg)
  raise common.UserError(f'label.judge={name!r} is no judge; judges: task, rm:RUN (a reward model run of the '
                         f'workdir), lm:PATH (a causal LM folder)')
