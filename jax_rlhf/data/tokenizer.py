"""Prompt formatting for a real tokenizer: its chat template when it has one, and the prompt-length check.

With `data.chat_template='auto'` and a tokenizer that has a chat template (Qwen2.5-Instruct and the like),
a prompt is rendered as chat messages with the generation prompt appended; an HH-RLHF transcript
("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:") becomes its alternating user/assistant
turns. Responses are left as they are (the stage appends EOS). Without a template, prompts pass unchanged
(GPT-2 reads HH transcripts and TL;DR queries as plain text, as in N+).
"""
from __future__ import annotations

import re

from jax_rlhf.data import records

_TURN = re.compile(r'\n\n(Human|Assistant):')


def to_messages(prompt: str) -> list[dict[str, str]]:
  """An HH-style transcript -> chat messages (the trailing empty assistant turn dropped); else one user turn."""
  parts = _TURN.split(prompt)
  if len(parts) < 3 or parts[0].strip():
    return [{'role': 'user', 'content': prompt}]
  messages = []
  for speaker, text in zip(parts[1::2], parts[2::2]):
    messages.append({'role': 'user' if speaker == 'Human' else 'assistant', 'content': text.strip()})
  if messages and messages[-1]['role'] == 'assistant' and not messages[-1]['content']:
    messages.pop()
  return messages or [{'role': 'user', 'content': prompt}]


def uses_chat_template(tokenizer, mode: str) -> bool:
  if mode not in ('auto', 'off'):
    raise ValueError(f"data.chat_template must be 'auto' or 'off', got {mode!r}")
  return mode == 'auto' and bool(getattr(tokenizer, 'chat_template', None))


def format_prompt(tokenizer, prompt: str, mode: str = 'auto') -> str:
  if not uses_chat_template(tokenizer, mode):
    return prompt
  return tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=False)


def format_records(tokenizer, recs: list[dict], mode: str = 'auto') -> list[dict]:
  """Records with their prompt formatted (text records unchanged)."""
  if not uses_chat_template(tokenizer, mode):
    return recs
  return [{**r, 'prompt': format_prompt(tokenizer, r['prompt'], mode)} if 'prompt' in r else r for r in recs]


def prompt_lengths(tokenizer, recs: list[dict]) -> list[int]:
  prompts = [r['prompt'] for r in recs]
  if not prompts:
    return []
  return [len(x) for x in tokenizer(prompts, add_special_tokens=False)['input_ids']]


def check_prompt_lengths(tokenizer, recs: list[dict], origins: list[str], max_len: int, on_error: str
                         ) -> tuple[list[int], list[str]]:
  """With prompt cutting off: (indices of records whose prompt fits max_len tokens, error messages of those
  that do not). on_error='raise' raises RecordError('file:line: ...') on the first that does not fit."""
  keep, errors = [], []
  for i, n in enumerate(prompt_lengths(tokenizer, recs)):
    if n <= max_len:
      keep.append(i)
      continue
    msg = f'{origins[i]}: prompt has {n} tokens, more than data.max_prompt_len={max_len} (data.cut_prompts=False)'
    if on_error == 'raise':
      raise records.RecordError(msg)
    errors.append(msg)
  return keep, errors
