"""How long a checkpoint save and a restore take, and how much of the save blocks training (async orbax).

  python -m bench.checkpoint [--presets demo,gpt2] [--dir /tmp/ckpt_bench] [--repeats 3]

For each model preset (random weights, float32) it builds the train state the SFT stage checkpoints (params +
AdamW moments, i.e. 3x the parameters) on one device, then times with `jax_rlhf.train.checkpoint.Checkpointer`:
  save_blocking_s  what `save` costs the training loop (async: the device-to-host copy, then it returns)
  save_total_s     until the checkpoint is on disk and renamed into place (wait_until_finished)
  restore_s        restoring it into the live state's structure and shardings
and ends with ONE JSON line. Best of --repeats for each figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
from flax import nnx

from jax_rlhf import sharding as shd
from jax_rlhf.config import base_config
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import preset
from jax_rlhf.train import checkpoint
from jax_rlhf.train import state as state_lib


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def bench(name: str, root: str, repeats: int) -> dict:
  cfg = preset(name)
  c = base_config()
  tx = state_lib.make_optimizer(c.sft.optimizer, 100)
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, _ = state_lib.create_state(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), tx, mesh)
  jax.block_until_ready(state)
  out = {'preset': name, 'params': state_lib.num_params(state.params),
         'state_arrays_bytes': int(sum(x.nbytes for x in jax.tree.leaves(state)))}
  best = {'save_blocking_s': float('inf'), 'save_total_s': float('inf'), 'restore_s': float('inf')}
  for r in range(repeats):
    d = os.path.join(root, f'{name}-{r}')
    shutil.rmtree(d, ignore_errors=True)
    ckpt = checkpoint.Checkpointer(d, keep=2, async_save=True)
    t0 = time.perf_counter()
    ckpt.save(1, state, {'step': 1})
    t1 = time.perf_counter()
    ckpt.wait()
    t2 = time.perf_counter()
    restored, _ = ckpt.restore(state)
    jax.block_until_ready(restored)
    t3 = time.perf_counter()
    best['save_blocking_s'] = min(best['save_blocking_s'], t1 - t0)
    best['save_total_s'] = min(best['save_total_s'], t2 - t0)
    best['restore_s'] = min(best['restore_s'], t3 - t2)
    out['checkpoint_bytes'] = directory_bytes(d)
    ckpt.close()
    shutil.rmtree(d, ignore_errors=True)
  out.update({k: round(v, 3) for k, v in best.items()})
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--presets', default='demo,gpt2')
  ap.add_argument('--dir', default='/tmp/jax_rlhf_ckpt_bench')
  ap.add_argument('--repeats', type=int, default=3)
  args = ap.parse_args()
  results = [bench(p, args.dir, args.repeats) for p in args.presets.split(',')]
  print(json.dumps({'load': ' '.join(f'{x:.2f}' for x in os.getloadavg()), 'results': results}))


if __name__ == '__main__':
  main()
