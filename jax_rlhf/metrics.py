"""Process-0 metric writers: `metrics.jsonl`, TensorBoard event files (tensorboardX) and a progress bar.

Metrics are flat dicts of scalars. Device values are copied to the host only here, at log time.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
  out = {}
  for k, v in jax.device_get(dict(metrics)).items():
    v = np.asarray(v)
    out[k] = float(v) if v.size == 1 else float(v.mean())
  return out


class MetricsWriter:
  """Appends to `<dir>/metrics.jsonl`, writes TensorBoard scalars, and drives a tqdm bar on stderr.

  `show` names the figures that go on the progress bar (e.g. loss, accuracy, score, kl, tokens/s).
  Resuming appends: a resumed run's metrics.jsonl continues the interrupted one's.
  """

  def __init__(self, directory: str, *, total_steps: int, desc: str, initial_step: int = 0,
               show: tuple[str, ...] = ('loss',), enabled: bool | None = None, progress: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.show = show
    self.directory = directory
    self._bar = None
    self._tb = None
    self._file = None
    if not self.enabled:
      return
    os.makedirs(directory, exist_ok=True)
    self._file = open(os.path.join(directory, 'metrics.jsonl'), 'a')
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(directory, 'tb'))
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      self._tb = None
    if progress:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, file=sys.stderr, dynamic_ncols=True,
                       leave=True, mininterval=1.0, disable=not sys.stderr.isatty() and os.environ.get('CI') == 'true')

  def write(self, step: int, metrics: Mapping[str, Any], *, split: str = 'train') -> dict[str, float]:
    host = to_host(metrics)
    if not self.enabled:
      return host
    record = {'step': int(step), 'split': split, 'time': round(time.time(), 3), **host}
    self._file.write(json.dumps(record, allow_nan=True) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in host.items():
        if math.isfinite(v):
          self._tb.add_scalar(f'{split}/{k}', v, int(step))
    if self._bar is not None and split == 'train':
      self._bar.set_postfix({k: f'{host[k]:.4g}' for k in self.show if k in host}, refresh=False)
    return host

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def cpu_model() -> str:
  """The host CPU's model name from /proc/cpuinfo ('' where there is none). XLA:CPU compiles for the host's
  instruction set, so fp32 runs are bitwise reproducible on one CPU model, not across models."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''
