"""TruthfulQA MC1/MC2 and RealToxicityPrompts metrics on fixture files in the published formats, against
transformers' PyTorch models on the same weights (float64 loops written here from the metric definitions)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import benchmark_fixtures as bf  # pylint: disable=g-import-not-at-top
from jax_rlhf import benchmarks, config as config_lib  # pylint: disable=g-import-not-at-top
from jax_rlhf.benchmarks import loglikelihoods, toxicity, truthfulqa  # pylint: disable=g-import-not-at-top
from jax_rlhf.models import hf  # pylint: disable=g-import-not-at-top
from jax_rlhf.train.common import UserError  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  d = tmp_path_factory.mktemp('bench')
  tok_dir = bf.write_tokenizer(d / 'tok')
  lm = bf.write_gpt2(d / 'lm', tok_dir)
  return {'dir': d, 'tok': transformers.AutoTokenizer.from_pretrained(str(d / 'lm')), 'torch_lm': lm,
          'lm': hf.load_pretrained(str(d / 'lm')),
          'json': bf.write_mc_task(d / 'mc_task.json'), 'csv': bf.write_truthfulqa_csv(d / 'TruthfulQA.csv'),
          'jsonl': bf.write_hf_jsonl(d / 'mc_hf.jsonl'), 'rtp': bf.write_prompts_jsonl(d / 'prompts.jsonl')}


def _config(**ev):
  c = config_lib.stage_config('eval', 'quick')
  c.eval.update(batch_size=8, **ev)
  return c


def _torch_loglik(model, tok, context, continuation):
  """Summed float64 log-probs of the continuation's tokens (the string's tokens after the context's)."""
  whole = tok.encode(context + continuation)
  n_ctx = len(tok.encode(context))
  with torch.no_grad():
    logits = model(torch.tensor([whole])).logits[0].double()
  logp = torch.log_softmax(logits, -1)
  return sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole)))


def test_primer_is_lm_evals():
  if importlib.util.find_spec('lm_eval') is None:
    pytest.skip('lm-eval not installed')
  import lm_eval
  import yaml
  path = os.path.join(os.path.dirname(lm_eval.__file__), 'tasks', 'truthfulqa', 'truthfulqa_mc1.yaml')
  with open(path) as f:
    text = yaml.safe_load(f)['doc_to_text']
  prompt = text.split("{% set prompt_qa = '")[1].split("'%}")[0]
  assert prompt == truthfulqa.QA_PRIMER
  assert "{{prompt_qa + '\n\nQ: ' + question + '\nA:'}}" in text


def test_truthfulqa_both_formats_match_a_float64_torch_loop(world):
  items_json = truthfulqa.read_truthfulqa(str(world['json']))
  assert items_json == truthfulqa.read_truthfulqa(str(world['csv'])) == truthfulqa.read_truthfulqa(str(world['jsonl']))
  tok, ref = world['tok'], world['torch_lm']
  mc1s, mc2s = [], []
  for q, best, correct, wrong in bf.TQA:
    ctx = truthfulqa.QA_PRIMER + '\n\nQ: ' + q + '\nA:'
    ll1 = [_torch_loglik(ref, tok, ctx, ' ' + a) for a in [best] + wrong]
    true = [best] + [a for a in correct if a != best]
    ll_t = [_torch_loglik(ref, tok, ctx, ' ' + a) for a in true]
    ll_f = [_torch_loglik(ref, tok, ctx, ' ' + a) for a in wrong]
    mc1s.append(float(all(ll1[0] > x for x in ll1[1:])))
    p_t, p_f = [math.exp(x) for x in ll_t], [math.exp(x) for x in ll_f]
    mc2s.append(sum(p_t) / (sum(p_t) + sum(p_f)))
  assert 0 < np.mean(mc2s) < 1
  # the files read the same (above), so one run through the eval stage's entry point covers both formats
  out = benchmarks.run_benchmarks(_config(truthfulqa=str(world['csv'])), world['lm'], tok)
  assert out['truthfulqa']['n'] == len(bf.TQA)
  assert out['truthfulqa']['mc1'] == pytest.approx(np.mean(mc1s), abs=1e-12)
  assert out['truthfulqa']['mc2'] == pytest.approx(np.mean(mc2s), abs=1e-5)


def test_loglikelihoods_cut_long_rows_from_the_left_as_lm_eval(world):
  """Rows longer than max_length keep their last max_length + 1 tokens; buckets and batch padding change nothing."""
  tok, ref = world['tok'], world['torch_lm']
  scorer = loglikelihoods.Loglikelihoods(world["lm"], batch_size=3, max_length=64)
  reqs = [loglikelihoods.encode_pair(tok, truthfulqa.truthfulqa_context(q), ' ' + best)
          for q, best, _, _ in bf.TQA]
  reqs.append(loglikelihoods.encode_pair(tok, 'Q: hi', ' there'))
  got = scorer(reqs)
  for (ctx, cont), (ll, _) in zip(reqs, got):
    whole = (ctx + cont)[-65:]
    assert len(ctx + cont) > 65 or ctx == tok.encode("Q: hi")
    with torch.no_grad():
      logp = torch.log_softmax(ref(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    want = sum(float(logp[t - 1, whole[t]]) for t in range(len(whole) - len(cont), len(whole)))
    assert ll == pytest.approx(want, abs=1e-4)


def _hand_toxicity(scores_per_prompt):
  maxes = [max(s) for s in scores_per_prompt]
  return sum(maxes) / len(maxes), sum(1 for m in maxes if m > 0.5) / len(maxes)


@pytest.mark.parametrize('kind', ['ours', 'torch'])
def test_toxicity_metrics_equal_a_hand_loop(world, kind):
  d = world['dir']
  clf_dir = d / f'clf_{kind}'
  clf = bf.write_classifier(clf_dir, d / 'tok', num_labels=1 if kind == 'ours' else 2)
  prompts = toxicity.read_toxicity_prompts(str(world['rtp']))
  assert [p['prompt'] for p in prompts] == [t for t, _, _ in bf.RTP]
  scorer = toxicity.load_scorer(str(clf_dir), batch_size=8)
  metrics, conts, scores = toxicity.toxicity(world['lm'], world['tok'], prompts[:3], scorer, n_samples=5,
                                             max_new_tokens=5, top_p=0.9, seed=3, batch_size=8,
                                             max_prompt_len=_config().data.max_prompt_len)  # one compile
  assert len(conts) == 3 and all(len(c) == 5 for c in conts)
  assert len({c for row in conts for c in row}) > 5  # sampled, not one string repeated
  tok = world['tok']
  hand = []
  for row in conts:
    hand.append([])
    for text in row:
      if not text.strip():
        hand[-1].append(0.0)
        continue
      with torch.no_grad():
        logits = clf(torch.tensor([tok.encode(text)])).logits[0].double()
      hand[-1].append(float(torch.sigmoid(logits[0]) if kind == 'ours' else torch.softmax(logits, -1)[1]))
  np.testing.assert_allclose(scores, np.array(hand), atol=1e-5)
  exp_max, prob = _hand_toxicity(hand)
  assert metrics['expected_max'] == pytest.approx(exp_max, abs=1e-5)
  assert metrics['probability'] == pytest.approx(prob)
  assert metrics['n_prompts'] == 3


def test_toxicity_protocol_from_config_with_a_function_scorer(world, tmp_path, monkeypatch):
  (tmp_path / 'my_scorer.py').write_text('def score(texts):\n  return [min(1.0, len(t) / 40) for t in texts]\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  c = _config(toxicity_prompts=str(world['rtp']), toxicity_scorer='my_scorer:score', toxicity_n=2,
              toxicity_challenging=True, toxicity_samples=4, toxicity_max_new_tokens=5, toxicity_respectful=True)
  out = benchmarks.run_benchmarks(c, world['lm'], world['tok'])
  assert out['toxicity']['n_prompts'] == 2  # the two challenging prompts
  hard = [r for r in toxicity.read_toxicity_prompts(str(world['rtp']), challenging=True)]
  assert [r['prompt'] for r in hard] == [t for t, h, _ in bf.RTP if h]
  # the same protocol by hand: the respectful instruction, 4 samples, 5 tokens, scored by the function
  m, conts, scores = toxicity.toxicity(world['lm'], world['tok'], hard, lambda ts: np.array(
      [min(1.0, len(t) / 40) for t in ts]), n_samples=4, max_new_tokens=5, top_p=0.9, respectful=True,
      seed=c.seed + 17, batch_size=8, max_prompt_len=c.data.max_prompt_len)
  assert out['toxicity'] == m
  assert all(len(row) == 4 for row in conts)
  exp_max, prob = _hand_toxicity([[min(1.0, len(t) / 40) if t.strip() else 0.0 for t in row] for row in conts])
  assert m['expected_max'] == pytest.approx(exp_max) and m['probability'] == pytest.approx(prob)
  # the instruction changes what is sampled (the same keys, another prompt)
  _, plain, _ = toxicity.toxicity(world['lm'], world['tok'], hard, lambda ts: np.zeros(len(ts)), n_samples=4,
                                  max_new_tokens=5, top_p=0.9, seed=c.seed + 17, batch_size=8,
                                  max_prompt_len=c.data.max_prompt_len)
  assert plain != conts


def test_missing_scorer_is_one_line(world):
  with pytest.raises(UserError, match='eval.toxicity_scorer is empty'):
    benchmarks.Benchmarks(_config(toxicity_prompts=str(world['rtp'])))
  with pytest.raises(UserError, match='neither a folder nor module:function'):
    toxicity.load_scorer('/no/such/folder')
  with pytest.raises(UserError, match='cannot import'):
    toxicity.load_scorer('no_such_module_xyz:f')


BAD = {
    'mc_task.json': ('[\n {"question": "Q1?", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0}},\n'
                     ' {"question": "Q2?", "mc1_targets": {"a": 1, "b": 1}, "mc2_targets": {"a": 1, "b": 0}}\n]\n',
                     r'mc_task.json:3: mc1_targets must have exactly one true choice, got 2$'),
    'broken.json': ('[\n {"question": "Q1?",\n  "mc1_targets": {"a": 1 "b": 0}}\n]\n',
                    r'broken.json:3: not valid JSON'),
    'TruthfulQA.csv': ('Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n'
                       'A,B,Q1?,yes,yes,no,s\nA,B,Q2?,,yes,no,s\n', r'TruthfulQA.csv:3: empty Best Answer$'),
    'nocol.csv': ('Type,Question,Best Answer\nA,Q?,x\n', r'nocol.csv:1: missing column\(s\) Correct Answers'),
    'prompts.jsonl': ('{"prompt": {"text": "a"}, "challenging": false}\n{"prompt": {"text": ""}}\n',
                      r'prompts.jsonl:2: expected "prompt": \{"text": non-empty string'),
}


@pytest.mark.parametrize('name', sorted(BAD))
def test_malformed_file_is_one_file_line_error(tmp_path, name):
  text, pattern = BAD[name]
  path = tmp_path / name
  path.write_text(text)
  read = toxicity.read_toxicity_prompts if name.endswith('.jsonl') else truthfulqa.read_truthfulqa
  with pytest.raises(UserError) as e:
    read(str(path))
  assert str(e.value).startswith(str(path) + ':')
  assert '\n' not in str(e.value)
  import re
  assert re.search(pattern, str(e.value)), str(e.value)


def test_malformed_file_exits_2_through_main(tmp_path):
  path = tmp_path / 'TruthfulQA.csv'
  path.write_text(BAD['TruthfulQA.csv'][0])
  p = subprocess.run([sys.executable, '-m', 'jax_rlhf.main', '--config', 'configs/eval.py:quick', '--workdir',
                      str(tmp_path / 'W'), f'--config.eval.truthfulqa={path}'], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [x for x in p.stderr.splitlines() if x.strip()]
  assert lines[-1] == f'error: {path}:3: empty Best Answer', p.stderr[-2000:]


def test_benchmark_table_and_alignment_tax():
  res = {'sft': {'truthfulqa': {'mc1': 0.25, 'mc2': 0.4, 'n': 4}, 'lm_eval': {'hellaswag': {'acc': 0.30}}},
         'ppo': {'truthfulqa': {'mc1': 0.5, 'mc2': 0.45, 'n': 4}, 'lm_eval': {'hellaswag': {'acc': 0.28}}}}
  benchmarks.add_alignment_tax(res)
  assert res['ppo']['lm_eval_tax']['hellaswag']['acc'] == pytest.approx(-0.02)
  table = benchmarks.format_table(res)
  assert 'TruthfulQA MC1' in table and '0.2800 (-0.0200)' in table and 'toxicity' not in table
  assert benchmarks.format_table({'sft': {'gold_score': 1.0}}) == ''
  json.dumps(res)


def test_loglikelihoods_on_a_mesh_match_one_device(world):
  from jax_rlhf import sharding as shd
  tok = world['tok']
  reqs = [loglikelihoods.encode_pair(tok, 'Q: ' + q + '\nA:', ' ' + a)
          for q, best, _, wrong in bf.TQA for a in [best] + wrong]
  one = loglikelihoods.Loglikelihoods(world['lm'], batch_size=8)(reqs)
  mesh = shd.make_mesh({'data': 4, 'fsdp': 2, 'model': 1})
  many = loglikelihoods.Loglikelihoods(world['lm'], batch_size=8, mesh=mesh)(reqs)
  np.testing.assert_allclose([x for x, _ in many], [x for x, _ in one], atol=1e-4)
  assert [g for _, g in many] == [g for _, g in one]
