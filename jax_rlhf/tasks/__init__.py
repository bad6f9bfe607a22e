"""Embedded tasks: a world that writes its data files and judges responses in place of human labelers.

`get_task(config)` gives the task `config.task.name` names (None when the name is empty: every source then
comes from `data.*`). Code outside this package reaches a task only through the `Task` protocol below, never
by its name. A task's knobs are the other fields of `config.task`, a plain dict the task validates.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

# The data roles and splits a task's files can stand for, as (role, split) -> file name in `write_files`'s index.
FILE_ROLES = {('demonstrations', 'train'): 'sft_train', ('demonstrations', 'eval'): 'sft_eval',
              ('prompts', 'train'): 'prompts_train', ('prompts', 'eval'): 'prompts_eval',
              ('pretrain', 'train'): 'pretrain_train', ('pretrain', 'eval'): 'pretrain_eval'}


class Task(Protocol):
  """What the pipeline needs from an embedded task (prompts are the task's own text, responses decoded text)."""

  name: str

  def tokenizer_path(self) -> str:
    """The task's tokenizer folder (used when `data.tokenizer` is empty)."""

  def write_files(self, out_dir: str) -> dict[str, str]:
    """Write the task's JSONL files into `out_dir`; returns {file name: path} with the names of FILE_ROLES."""

  # Optional: the knobs that only set how many records a prefix-stable stream writes (a larger value appends
  # records and changes none). A workdir whose files were written with smaller ones gets them rewritten
  # (`train.common.task_files`); any other knob change there is an error.
  file_sizes: tuple[str, ...] = ()

  def gold_score(self, prompt: str, response: str) -> float:
    """The labeler's exact score of `response` to `prompt`, in [0, 1] (never seen in training)."""

  def rank(self, prompt: str, responses: Sequence[str], rng: np.random.Generator) -> list[int]:
    """Indices of `responses`, best first, as one (noisy) labeler orders them."""

  def category(self, prompt: str) -> str:
    """The prompt's category (a row of the eval table)."""

  def subcategory(self, prompt: str) -> str:
    """The prompt's subcategory (finer rows: the helpful task's name, known/unknown, safe/unsafe)."""

  def verify(self, prompt: str, response: str) -> float | None:
    """1.0 or 0.0 where the answer can be checked exactly (a verifiable reward), None where it cannot."""


def get_task(config) -> Task | None:
  """The task of `config.task` (its `name` and knobs), or None when `task.name` is empty.

  A name that is no task, or a knob the task does not have, raises `TaskError` (one line naming it)."""
  t = config.task.to_dict() if hasattr(config.task, 'to_dict') else dict(config.task)
  name = t.pop('name', '')
  if not name:
    return None
  if name not in TASKS:
    raise TaskError(f'unknown task {name!r} (task.name); embedded tasks: {", ".join(sorted(TASKS))}, or \'\' '
                    f'to read every source from data.*')
  return TASKS[name](t)


class TaskError(ValueError):
  """A bad task name or knob (the caller turns it into a one-line user error)."""


def check_knobs(task: str, knobs: Mapping[str, Any], known: Sequence[str]) -> None:
  """A TaskError naming the first knob `task` does not have (and the nearest one it does)."""
  for k in knobs:
    if k not in known:
      near = difflib.get_close_matches(k, known, n=1)
      hint = f'; did you mean task.{near[0]}?' if near else ''
      raise TaskError(f'task {task} has no knob {k}{hint}')


def _instruct_world(knobs: Mapping[str, Any]) -> Task:
  from jax_rlhf.tasks import instruct_world
  return instruct_world.InstructWorldTask(knobs)


TASKS = {'instruct_world': _instruct_world}
