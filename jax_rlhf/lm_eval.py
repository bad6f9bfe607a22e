"""Our JAX model as an lm-evaluation-harness backend, and a thin command over `lm_eval.simple_evaluate`.

    python -m jax_rlhf.lm_eval --model W/ppo/hf --tasks hellaswag,arc_easy --output W/eval/lm_eval.json
    python -m jax_rlhf.lm_eval --model W/sft/hf --tasks my_task --include_path tasks/ --limit 100

`JaxLM` is an `lm_eval.api.model.TemplateLM`: lm-eval's own code turns each (context, continuation) into
tokens as its `hf` backend does (`_encode_pair`; an empty context is the BOS/EOS prefix token), and our side
serves
  loglikelihood          `loglikelihoods.Loglikelihoods`: one jitted forward over [B, L] rows, sorted and bucketed
                         by length, log-softmax in float32, the continuation's tokens summed, greedy flag
  loglikelihood_rolling  lm-eval's disjoint rolling windows of max_length tokens (as hf), through the same
  generate_until         `sampling.generate` (KV cache; greedy unless the task asks for do_sample), contexts cut
                         from the left to max_length - max_gen_toks, then cut at the first stop string
On a mesh (`mesh=`) each batch is split over ('data', 'fsdp'). lm-eval is the optional `eval` extra
(`pip install 'jax_rlhf[eval]'`); nothing here is on the training path. Tasks read their datasets through
HF `datasets` (its cache, or a local task YAML with `dataset_path: json`); nothing is fetched by us.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from jax_rlhf.benchmarks import loglikelihoods
from jax_rlhf.train.common import UserError

try:
  from lm_eval.api.model import TemplateLM
  _HAVE_LM_EVAL = True
except ImportError:  # the optional extra is missing: JaxLM is unavailable, `evaluate` says how to install it
  TemplateLM, _HAVE_LM_EVAL = object, False

INSTALL = "lm-evaluation-harness is not installed: pip install 'jax_rlhf[eval]' (lm-eval==0.4.13, accelerate)"


class JaxLM(TemplateLM):
  """lm-eval backend on our `Transformer` (an nnx module or a (graphdef, state) pair) and its HF tokenizer:
  `JaxLM(model=m, tokenizer=tok)` or `JaxLM(pretrained='W/ppo/hf')`, then `lm_eval.simple_evaluate(model=lm, ...)`.
  (Not registered under a name: registering one at import would stop lm-eval from loading its own backends.)
  """

  def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size: int | str = 32,
               max_length: int | None = None, seed: int = 0, mesh=None, dtype: str | None = None, **_):
    if not _HAVE_LM_EVAL:
      raise UserError(INSTALL)
    super().__init__()
    if pretrained is not None:
      model, tokenizer = load(pretrained, dtype=dtype)
    if model is None or tokenizer is None:
      raise ValueError('JaxLM needs pretrained=FOLDER, or model= and tokenizer=')
    self.graphdef, self.state = nnx.split(model) if isinstance(model, nnx.Module) else tuple(model)
    self.tokenizer = tokenizer
    self.config = nnx.merge(self.graphdef, self.state).config
    self._max_length = int(max_length or self.config.max_len)
    self._batch_size = int(batch_size) if str(batch_size) != 'auto' else 32
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    self.scorer = loglikelihoods.Loglikelihoods((self.graphdef, self.state), batch_size=self._batch_size,
                                                max_length=self._max_length, mesh=mesh, pad_id=self.pad_id)
    self.mesh = mesh
    self.key = jax.random.key(seed)
    self.counts = collections.Counter()  # requests served, by kind
    self.seconds = collections.Counter()  # wall time spent, by kind

  # ---- what TemplateLM asks of a backend
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    return loglikelihoods.prefix_token_id(self.tokenizer)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return 256

  @property
  def tokenizer_name(self) -> str:
    return getattr(self.tokenizer, 'name_or_path', 'jax_rlhf').replace('/', '__')

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs) -> list[int]:
    ids = loglikelihoods.tok_encode(self.tokenizer, string, add_special_tokens)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    t0 = time.perf_counter()
    out = self.scorer([(ctx, cont) for _, ctx, cont in requests])
    for (key, _, _), r in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, r)
    self.counts['loglikelihood'] += len(requests)
    self.seconds['loglikelihood'] += time.perf_counter() - t0
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of each whole string, over lm-eval's disjoint windows of max_length tokens (the first
    conditioned on the prefix token), as its hf backend."""
    from lm_eval import utils
    t0 = time.perf_counter()
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((ctx, cont))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, self.scorer(windows)):
      totals[i] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    self.counts['loglikelihood_rolling'] += len(requests)
    self.seconds['loglikelihood_rolling'] += time.perf_counter() - t0
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, when the task's gen_kwargs say do_sample) continuations, cut at the stop strings."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from jax_rlhf import sampling
    from jax_rlhf.data import batches
    t0 = time.perf_counter()
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    groups = collections.defaultdict(list)
    for i, req in enumerate(requests):
      groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
    out: list[str] = [''] * len(requests)
    for n_group, idx in enumerate(groups.values()):
      kw = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
      until = handle_stop_sequences(kw.pop('until', None), eos=eos)
      n_new = int(kw.pop('max_gen_toks'))
      greedy = not kw.get('do_sample') or float(kw.get('temperature') or 0.0) == 0.0
      max_ctx = self.max_length - n_new
      if max_ctx < 1:
        raise UserError(f'max_gen_toks {n_new} leaves no room for a context in max_length {self.max_length}')
      ctxs = [self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx) for i in idx]
      order = sorted(range(len(idx)), key=lambda j: -len(ctxs[j]))
      for b, s in enumerate(range(0, len(order), self._batch_size)):
        chunk = order[s:s + self._batch_size]
        rows = [ctxs[j] for j in chunk] + [[self.pad_id]] * (self._batch_size - len(chunk))
        length = loglikelihoods.length_bucket(max(map(len, rows)), max_ctx)
        inp, att = batches.pad_left(rows, length, self.pad_id)
        res = sampling.generate(
            (self.graphdef, self.state), inp, att, jax.random.fold_in(jax.random.fold_in(self.key, n_group), b),
            max_new_tokens=n_new, temperature=0.0 if greedy else float(kw.get('temperature', 1.0)),
            top_k=int(kw.get('top_k') or 0), top_p=float(kw.get('top_p') or 1.0),
            eos_token_id=self.eot_token_id, pad_token_id=self.pad_id)
        toks, mask = np.asarray(res.tokens), np.asarray(res.mask)
        for r, j in enumerate(chunk):
          text = self.tok_decode([int(t) for t, m in zip(toks[r], mask[r]) if m])
          out[idx[j]] = postprocess_generated_text(text, until, None)
    for req, text in zip(requests, out):
      self.cache_hook.add_partial('generate_until', req.args, text)
    self.counts['generate_until'] += len(requests)
    self.seconds['generate_until'] += time.perf_counter() - t0
    return out


def load(path: str, dtype: str | None = None):
  """(Transformer, tokenizer) from an HF folder of ours (W/<stage>/hf) or a real checkpoint with its tokenizer."""
  from transformers import AutoTokenizer
  from jax_rlhf.models import hf
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise UserError(f'model folder {path} does not exist')
  try:
    model = hf.load_pretrained(path, dtype=dtype, param_dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise UserError(f'{path}: {str(e).splitlines()[0]}') from None
  return model, tok


def evaluate(model, tokenizer, tasks: Sequence[str], *, include_path: str | None = None, limit: int | None = None,
             num_fewshot: int | None = None, batch_size: int = 32, seed: int = 0, mesh=None,
             include_defaults: bool = True, **kwargs) -> dict:
  """`lm_eval.simple_evaluate` on `JaxLM(model, tokenizer)`: its results dict (per task `results[task]`), plus
  `jax_rlhf`: requests served and seconds per request kind. Unknown task names are a UserError.
  include_defaults=False: only the tasks under include_path (lm-eval indexes its thousands of own task files
  otherwise, ~10 s)."""
  if not _HAVE_LM_EVAL:
    raise UserError(INSTALL)
  import lm_eval
  from lm_eval.tasks import TaskManager
  if include_path and not os.path.isdir(os.path.expanduser(include_path)):
    raise UserError(f'lm-eval task folder {include_path} does not exist')
  manager = TaskManager(include_path=os.path.expanduser(include_path) if include_path else None,
                        include_defaults=include_defaults)
  unknown = [t for t in tasks if not manager.match_tasks([t])]
  if unknown:
    raise UserError(f'unknown lm-eval task(s): {", ".join(unknown)} (a local task needs --include_path / '
                    'eval.lm_eval_include)')
  lm = JaxLM(model=model, tokenizer=tokenizer, batch_size=batch_size, seed=seed, mesh=mesh)
  t0 = time.perf_counter()
  res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0, random_seed=seed,
                                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, **kwargs)
  res['jax_rlhf'] = {'wall_s': time.perf_counter() - t0, 'requests': dict(lm.counts),
                     'seconds': dict(lm.seconds)}
  return res


def task_metrics(res: dict) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} of a simple_evaluate result: its 'metric,filter' entries, the ',none' filter suffix
  dropped, stderr entries and bookkeeping (alias, sample_len) left out."""
  out = {}
  for task, ms in (res.get('results') or {}).items():
    vals = {}
    for k, v in ms.items():
      name, comma, filt = k.partition(',')
      if comma and isinstance(v, (int, float)) and not isinstance(v, bool) and 'stderr' not in name:
        vals[name if filt in ('', 'none') else f'{name},{filt}'] = float(v)
    out[task] = vals
  return out


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m jax_rlhf.lm_eval', description=__doc__.split('\n\n')[0])
  p.add_argument('--model', required=True, help='HF folder (W/<stage>/hf or a checkpoint with its tokenizer)')
  p.add_argument('--tasks', required=True, help='comma-separated lm-eval task names')
  p.add_argument('--output', help='JSON file for the results (default: print only)')
  p.add_argument('--include_path', help='a folder of local task YAMLs')
  p.add_argument('--limit', type=int, help='documents per task (default: all)')
  p.add_argument('--num_fewshot', type=int)
  p.add_argument('--batch_size', type=int, default=32, help='rows per jitted call')
  p.add_argument('--dtype', default=None, help='float32 (default) or bfloat16')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--local_only', action='store_true', help="only --include_path's tasks (skip lm-eval's index)")
  args = p.parse_args(argv)
  try:
    model, tok = load(args.model, args.dtype)
    res = evaluate(model, tok, [t for t in args.tasks.split(',') if t], include_path=args.include_path,
                   limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, seed=args.seed,
                   include_defaults=not args.local_only)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  metrics = task_metrics(res)
  for task, ms in metrics.items():
    print(task + ': ' + ', '.join(f'{k} {v:.4f}' for k, v in ms.items()))
  info = res['jax_rlhf']
  print(f'[lm_eval] {sum(info["requests"].values())} requests in {info["wall_s"]:.1f} s')
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, 'w') as f:
      json.dump({'model': os.path.abspath(args.model), 'tasks': metrics, 'results': res.get('results'),
                 'versions': res.get('versions'), 'n-samples': res.get('n-samples'), 'jax_rlhf': info},
                f, indent=1, default=str)
  return 0


if __name__ == '__main__':
  sys.exit(main())
