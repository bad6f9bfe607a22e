"""Shared pieces of the benchmarks: timing, the machine's matmul peak, the load, the PyTorch yardstick.

Every bench runs the yardstick's workload (/work/shared/peer: GPT-2 layout, 4 layers, 4 heads, width 256,
256 positions, vocab 4096, random weights, random token ids in [2, 4096)) and ends with ONE JSON line.
With `--peer` it then runs `/work/shared/peer/run.sh <name>` in the same process tree, after our own
timing (never concurrently), parses the peer's `summarize` lines and prints the ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_rlhf.metrics import cpu_model

PEER_RUN = os.environ.get('PEER_RUN', '/work/shared/peer/run.sh')
VOCAB = 4096
LOW_TOKEN = 2  # random ids in [2, VOCAB): never EOS (0) or pad (1), as the peer's prompts


# ----------------------------------------------------------------------------------------------------
# Machine state
# ----------------------------------------------------------------------------------------------------

def load_avg() -> str:
  """The 1/5/15-minute load averages, as `uptime` prints them (other jobs share this machine)."""
  one, five, fifteen = os.getloadavg()
  return f'{one:.2f}, {five:.2f}, {fifteen:.2f}'


def machine() -> dict:
  return {'date': datetime.datetime.now().isoformat(timespec='seconds'), 'load': load_avg(),
          'cpus': os.cpu_count(), 'cpu_model': cpu_model(), 'jax': jax.__version__, 'backend': jax.default_backend(),
          'devices': len(jax.devices())}


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

def stats(ts: list[float]) -> dict:
  """Median / min / max of wall times in seconds."""
  return {'median': statistics.median(ts), 'min': min(ts), 'max': max(ts), 'runs': len(ts)}


def time_runs(fn: Callable[[int], object], runs: int, warmup: int = 1) -> list[float]:
  """Wall time of `fn(i)` (which must block on its results) for `runs` calls after `warmup` calls."""
  for i in range(warmup):
    fn(-1 - i)
  ts = []
  for i in range(runs):
    t = time.perf_counter()
    fn(i)
    ts.append(time.perf_counter() - t)
  return ts


def fmt(s: dict, work: float | None = None, unit: str = 'tok/s') -> str:
  """The peer's `summarize` format, so both sides read alike."""
  out = f"time median {s['median'] * 1e3:.1f} ms (min {s['min'] * 1e3:.1f}, max {s['max'] * 1e3:.1f}) over {s['runs']} runs"
  if work:
    out += f"; {unit}: median {work / s['median']:.0f} (best {work / s['min']:.0f}, worst {work / s['max']:.0f})"
  return out


def matmul_peak_flops(n: int = 2048, runs: int = 10, dtype=jnp.float32) -> float:
  """This machine's JAX matmul peak: a jitted n^3 matmul, best of `runs`, counted as 2 n^3 FLOP.

  bfloat16: the product the model's bf16 projections use (`kernels.bf16_dot`: MKL's AMX GEMM where the CPU has
  it, else XLA's bf16 dot), bf16 in, fp32 out."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  if jnp.dtype(dtype) == jnp.bfloat16:
    from jax_rlhf import kernels
    mm = jax.jit(kernels.bf16_dot)
  else:
    mm = jax.jit(jnp.matmul)
  mm(a, b).block_until_ready()
  best = float('inf')
  for _ in range(runs):
    t = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def random_tokens(shape, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(LOW_TOKEN, VOCAB, shape).astype(np.int32)


def xla_flops(jitted, *args) -> float | None:
  """XLA's own FLOP count of a jitted function at these arguments (None if the backend gives none)."""
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
  except Exception:  # cost analysis is best-effort and backend-specific
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


# ----------------------------------------------------------------------------------------------------
# The PyTorch yardstick
# ----------------------------------------------------------------------------------------------------

_SUMMARY = re.compile(r'time median ([\d.]+) ms \(min ([\d.]+), max ([\d.]+)\) over (\d+) runs'
                      r'(?:; ([^:]+): median ([\d.]+))?')


def parse_summary(line: str) -> dict | None:
  """`time median X ms (min a, max b) over n runs[; unit: median Y ...]` -> seconds and rate."""
  m = _SUMMARY.search(line)
  if not m:
    return None
  out = {'median': float(m[1]) / 1e3, 'min': float(m[2]) / 1e3, 'max': float(m[3]) / 1e3, 'runs': int(m[4])}
  if m[6]:
    out['rate'] = float(m[6])
    out['unit'] = m[5].strip()
  return out


def run_peer(name: str) -> tuple[str, dict[str, dict]]:
  """Run `run.sh <name>`; returns (its output, {line label: parsed summary}).

  Labels: the text before ': time median' with the torch details cut off, e.g. 'generate', 'rollout',
  'update x1', 'PPO iteration', 'SFT step fp32'.
  """
  print(f'[peer] running {PEER_RUN} {name} (first use builds its venv: a minute or two) ...', flush=True)
  t = time.perf_counter()
  proc = subprocess.run([PEER_RUN, name], capture_output=True, text=True)
  text = proc.stdout + proc.stderr
  if proc.returncode != 0:
    raise RuntimeError(f'peer run.sh {name} failed (rc {proc.returncode}):\n{text[-3000:]}')
  print(f'[peer] done in {time.perf_counter() - t:.0f}s; its lines:')
  found = {}
  for line in text.splitlines():
    print('[peer]   ' + line)
    s = parse_summary(line)
    if s is None:
      continue
    head = line.split(': time median')[0].strip()
    if head.startswith('generate B='):
      label = 'generate'
    elif head.startswith('SFT step'):
      label = 'SFT step ' + head.split()[2]  # fp32 | bf16
    elif head.startswith('PPO iteration'):
      label = 'PPO iteration'
    else:
      label = head
    found[label] = s
  return text, found


def compare_with_peer(args, result: dict, ours: dict, run_name: str, label: str) -> tuple[dict, dict]:
  """Run the peer's `run.sh <run_name>` (after waiting for a quiet minute if asked) and add its rate and
  ours/theirs to `result` (tokens/s based). Returns (all parsed peer lines, the `label` line)."""
  wait_quiet(args.quiet, args.quiet_wait)
  peer_load = load1()
  _, peer = run_peer(run_name)
  p = peer[label]
  result['peer_tokens_per_s'] = p['rate']
  result['ratio'] = result['tokens_per_s'] / p['rate']
  result['ratio_best'] = p['min'] / ours['min']
  result['peer_load_before'] = peer_load
  result['load_after_peer'] = load_avg()
  return peer, p


def contention_note(ours: dict, theirs: dict, load_before: float) -> str | None:
  """A warning when the run was contended: ratios of medians are then unreliable.

  Torch's OpenMP threads degrade far more than XLA's under oversubscription (its medians grow 10-30x at
  load 4-6 on this 2-core machine), so a contended median ratio flatters us; the ratio of the best runs is
  the better estimate then, and a quiet rerun (`--quiet 1.0`) the real answer.
  """
  spread = max(ours['max'] / ours['min'], theirs['max'] / theirs['min'])
  if load_before < 1.5 and spread < 1.5:
    return None
  return (f'WARNING: contended run (1-min load {load_before:.2f} before timing, worst max/min spread {spread:.1f}): '
          f'the median ratio is unreliable; see ratio_best (best run vs best run) and rerun with --quiet 1.0')


# ----------------------------------------------------------------------------------------------------
# Command line and output
# ----------------------------------------------------------------------------------------------------

def flag_contention(result: dict, ours: dict, theirs: dict, load: float) -> None:
  """Mark `result` as contended and print why, when the load or the spread of either side says so."""
  note = contention_note(ours, theirs, load)
  if note:
    result['contended'] = True
    print(note)


def parser(doc: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--peer', action='store_true', help='also run the PyTorch yardstick and print ours/theirs')
  p.add_argument('--quiet', type=float, default=0.0, metavar='LOAD',
                 help='before timing, wait (at most --quiet-wait s) until the 1-minute load average is below LOAD')
  p.add_argument('--quiet-wait', type=float, default=600.0, metavar='S')
  return p


def add_dtype_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """`--dtype float32|bfloat16` for the benches that train (lm_step, ppo_iteration)."""
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                 help='compute dtype (parameters stay fp32); bfloat16 runs the projections on the CPU\'s AMX '
                      'through MKL where it has one (jax_rlhf.kernels), and compares with the peer\'s bf16 runs')
  return p


def wait_quiet(max_load: float, max_wait_s: float) -> None:
  """Other jobs share this 2-core machine; optionally wait for a quieter minute before timing."""
  if max_load <= 0:
    return
  t0 = time.time()
  while os.getloadavg()[0] >= max_load and time.time() - t0 < max_wait_s:
    time.sleep(10)
  state = 'reached' if os.getloadavg()[0] < max_load else 'NOT reached (timing anyway)'
  print(f'[quiet] load < {max_load} {state} after {time.time() - t0:.0f}s: load {load_avg()}', flush=True)


def load1() -> float:
  return os.getloadavg()[0]


def emit(result: dict) -> None:
  """The bench's last line: one JSON object."""
  def clean(x):
    if isinstance(x, float):
      return float(f'{x:.6g}')
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    return x
  print(json.dumps(clean(result)), flush=True)
