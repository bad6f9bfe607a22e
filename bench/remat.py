"""Rematerialisation x scanned layers: compile time, step time and the compiler's memory figures of the LM step.

For the yardstick (`preset('yardstick')`: 4 layers, d 256, V 4096) and the same width at 24 layers, and each of
`remat` none | full | dots_saveable x `scan_layers` off | on: the LM train step (`lm.jit_lm_step`: forward +
backward + AdamW, fp32, batch 16 x 128 tokens as bench/lm_step.py, state donated) is lowered and compiled
(timed: trace + lower + compile), then timed in rounds that interleave the six variants of a model (so a
change of load on this shared machine hits them alike): `--rounds` rounds of `--steps` steps each after one
warm-up step; the figure is the median step.

Memory is the compiler's own account of the compiled step (`compiled.memory_analysis()`): `temp` is the
scratch the step allocates beyond its arguments and outputs (activations kept for the backward pass and
workspace), `peak` = arguments + outputs + temp - donated aliases. On XLA:CPU these are the buffer
assignment's sizes, the figures an accelerator's compiler reports in the same way; they are not a measured RSS.

What it showed here (XLA:CPU, jax 0.10.2): with scan_layers, remat=full cuts the step's temp memory ~3x at 4
layers and ~6x at 24 (dots_saveable in between), and the scanned 24-layer step compiles in ~8 s against 36-65 s
unrolled. Without scan, remat leaves temp unchanged: the recomputation is in the program (optimization
barriers included) but XLA:CPU's scheduler runs it early, so every residual is live at once anyway. Remat
without scan is therefore no memory saving on this backend; pair it with scan_layers.

  /work/venv/bin/python -m bench.remat [--rounds 3] [--steps 3] [--layers 24]

Its last line is one JSON object: {"bench": "remat", "results": [{model, layers, remat, scan, compile_s,
step_ms, temp_bytes, peak_bytes, ...}], "load": ...}.
"""
from __future__ import annotations

import itertools
import statistics
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from bench import common
from jax_rlhf import sharding as shd
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset
from jax_rlhf.train import lm
from jax_rlhf.train import state as state_lib

B, T = 16, 128
OPT = ml_collections.ConfigDict(dict(lr=1e-4, schedule='constant', end_lr_frac=1.0, warmup_steps=0, b1=0.9,
                                     b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=0.0))
VARIANTS = list(itertools.product(('none', 'full', 'dots_saveable'), (False, True)))


def _init(cfg):
  """Parameters under jit (an eager nnx init compiles op by op); both layouts draw the same values."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1])()
  return nnx.merge(graphdef, params)


def _variant(cfg, mesh, batch, key, steps_total):
  tx = state_lib.make_optimizer(OPT, steps_total)
  graphdef, state, shardings = state_lib.place_state(_init(cfg), tx, mesh)
  step = lm.jit_lm_step(graphdef, tx, shardings, mesh)
  t = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  figures = {}
  if mem is not None:
    figures = dict(temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
                   output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes))
    figures['peak_bytes'] = (figures['argument_bytes'] + figures['output_bytes'] + figures['temp_bytes']
                             - figures['alias_bytes'])
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch, key)
    jax.block_until_ready(metrics)
    return float(metrics['loss'])

  return dict(compile_s=compile_s, **figures), run


def main():
  p = common.parser(__doc__)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--steps', type=int, default=3, help='timed steps per variant per round')
  p.add_argument('--layers', type=int, default=24, help='depth of the deep config (yardstick width)')
  args = p.parse_args()
  mesh = shd.make_mesh((1, 1, 1))
  tokens = common.random_tokens((B, T + 1), seed=0)
  ones = np.ones_like(tokens)
  batch = shd.put_batch({'tokens': tokens, 'attention_mask': ones, 'loss_mask': ones}, mesh)
  key = jax.random.key(0)
  results = []
  for name, layers in (('yardstick', 4), (f'yardstick-{args.layers}L', args.layers)):
    runs, losses = {}, {}
    for remat, scan in VARIANTS:
      cfg = preset('yardstick', num_layers=layers, remat=remat, scan_layers=scan)
      figures, run = _variant(cfg, mesh, batch, key, args.rounds * (args.steps + 1) + 2)
      losses[remat, scan] = run()  # warm-up (first run after compile)
      runs[remat, scan] = run
      results.append(dict(model=name, layers=layers, params=cfg.num_params(), remat=remat, scan=scan, **figures))
      print(f'{name} remat={remat:13s} scan={scan!s:5s} compile {figures["compile_s"]:6.2f}s  '
            f'temp {figures.get("temp_bytes", 0) / 2**20:8.1f} MiB  peak {figures.get("peak_bytes", 0) / 2**20:8.1f} MiB',
            flush=True)
    common.wait_quiet(args.quiet, args.quiet_wait)
    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
      for v in VARIANTS:
        for _ in range(args.steps):
          t = time.perf_counter()
          runs[v]()
          times[v].append(time.perf_counter() - t)
    ref = losses['none', False]
    for r in results:
      if r['model'] == name:
        v = (r['remat'], r['scan'])
        r['step_ms'] = statistics.median(times[v]) * 1e3
        r['min_ms'] = min(times[v]) * 1e3
        r['first_loss_diff'] = abs(losses[v] - ref)  # same init, same batch: the same first-step loss
        print(f'{name} remat={v[0]:13s} scan={v[1]!s:5s} step {r["step_ms"]:8.1f} ms (min {r["min_ms"]:.1f}); '
              f'first loss - plain {r["first_loss_diff"]:.2e}', flush=True)
  m = common.machine()
  print('\nmodel            remat          scan   compile_s  step_ms   temp_MiB   peak_MiB')
  for r in results:
    print(f'{r["model"]:16s} {r["remat"]:14s} {r["scan"]!s:5s} {r["compile_s"]:9.2f} {r["step_ms"]:8.1f} '
          f'{r.get("temp_bytes", 0) / 2**20:10.1f} {r.get("peak_bytes", 0) / 2**20:10.1f}')
  print(f'(jax {jax.__version__}, {m["backend"]}, load {m["load"]}; batch {B} x {T} tokens, fp32, AdamW)')
  common.emit({'bench': 'remat', 'batch': B, 'seq_len': T, 'results': results, 'load': m['load'], 'date': m['date'],
               'jax': jax.__version__})


if __name__ == '__main__':
  main()
