"""Our JAX backend for lm-evaluation-harness against lm-eval's own `hf` backend on the same export: local tasks
(YAML + JSONL fixtures, offline) of every request kind, and lm-eval's TruthfulQA tasks against ours."""
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('accelerate')
lm_eval = pytest.importorskip('lm_eval')
transformers = pytest.importorskip('transformers')

import benchmark_fixtures as bf  # pylint: disable=g-import-not-at-top
from jax_rlhf.benchmarks import loglikelihoods, truthfulqa  # pylint: disable=g-import-not-at-top
from jax_rlhf import lm_eval as ours  # pylint: disable=g-import-not-at-top
from jax_rlhf.models import hf  # pylint: disable=g-import-not-at-top

MC = [{'question': q, 'choices': [best] + wrong, 'label': i % (1 + len(wrong))}
      for i, (q, best, _, wrong) in enumerate(bf.TQA)]
TEXTS = [{'text': ' '.join(bf.texts()[i:i + 12])} for i in range(0, 36, 12)]  # longer than max_length: windows
GEN = [{'question': q, 'answer': best} for q, best, _, _ in bf.TQA]

TASKS = {
    'tiny_mc': """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {dir}/mc.jsonl
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    'tiny_ppl': """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/texts.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    'tiny_gen': """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {dir}/gen.jsonl
validation_split: validation
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp('lm_eval')
  tok_dir = bf.write_tokenizer(d / 'tok')
  bf.write_gpt2(d / 'export', tok_dir, n_positions=64)  # short: contexts are cut from the left, texts windowed
  tasks = bf.mkdir(d / 'tasks')
  for name, rows in (('mc', MC), ('texts', TEXTS), ('gen', GEN)):
    with open(tasks / f'{name}.jsonl', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  for name, text in TASKS.items():
    (tasks / f'{name}.yaml').write_text(text.format(dir=tasks))
  # lm-eval's own TruthfulQA task files, on our fixture in the HF layout
  src = os.path.join(os.path.dirname(lm_eval.__file__), 'tasks', 'truthfulqa')
  bf.write_hf_jsonl(tasks / 'tqa.jsonl')
  shutil.copy(os.path.join(src, 'utils.py'), tasks / 'utils.py')
  for name in ('truthfulqa_mc1.yaml', 'truthfulqa_mc2.yaml'):
    text = open(os.path.join(src, name)).read()
    local = (f'dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {tasks}/tqa.jsonl\n')
    text = text.replace('dataset_path: truthfulqa/truthful_qa\n', local).replace('dataset_name: multiple_choice\n', '')
    text = text.replace('task: truthfulqa_mc', 'task: local_truthfulqa_mc')
    text = text.replace('include: truthfulqa_mc1.yaml', 'include: local_truthfulqa_mc1.yaml')
    (tasks / ('local_' + name)).write_text(text)
  return d


NAMES = ['tiny_mc', 'tiny_ppl', 'tiny_gen', 'local_truthfulqa_mc1', 'local_truthfulqa_mc2']


def _run(model, d, **kw):
  from lm_eval.tasks import TaskManager
  return lm_eval.simple_evaluate(model=model, tasks=NAMES, task_manager=TaskManager(include_path=str(d / 'tasks'),
                                                                                 include_defaults=False),
                                 log_samples=True, bootstrap_iters=0, **kw)


def test_our_backend_gives_the_numbers_of_lm_evals_hf_backend(setup):
  d = setup
  ref = _run('hf', d, model_args=f'pretrained={d / "export"},dtype=float32', device='cpu', batch_size=4)
  model, tok = ours.load(str(d / 'export'))
  lm = ours.JaxLM(model=model, tokenizer=tok, batch_size=8)
  got = _run(lm, d)
  want_m, got_m = ours.task_metrics(ref), ours.task_metrics(got)
  assert set(want_m) == set(got_m) == set(NAMES)
  for task in NAMES:
    assert want_m[task].keys() == got_m[task].keys()
    for k, v in want_m[task].items():
      assert got_m[task][k] == pytest.approx(v, abs=1e-4, rel=1e-4), (task, k)
  # per request, not only the aggregates: log-likelihoods to 1e-4, generations equal
  gens = []
  for task in NAMES:
    for a, b in zip(ref['samples'][task], got['samples'][task]):
      ra, rb = a['filtered_resps'], b['filtered_resps']
      if task == 'tiny_gen':
        assert ra == rb
        gens.append(ra[0])
      elif task == 'tiny_ppl':
        assert float(rb[0]) == pytest.approx(float(ra[0]), abs=1e-3, rel=1e-5)
      else:
        np.testing.assert_allclose([float(x[0]) for x in rb], [float(x[0]) for x in ra], atol=1e-4)
        assert [bool(x[1]) for x in rb] == [bool(x[1]) for x in ra]
  assert len(gens) == len(GEN) and sum(bool(g.strip()) for g in gens) >= 2, gens
  assert lm.counts['loglikelihood'] > 0 and lm.counts['loglikelihood_rolling'] == len(TEXTS)
  assert lm.counts['generate_until'] == len(GEN)
  # our TruthfulQA (eval stage) = lm-eval's own truthfulqa_mc1/mc2 on the same file
  tqa = truthfulqa.truthfulqa(loglikelihoods.Loglikelihoods(hf.load_pretrained(str(d / 'export')), batch_size=8), tok,
                              truthfulqa.read_truthfulqa(str(d / 'tasks' / 'tqa.jsonl')))
  assert tqa['mc1'] == pytest.approx(want_m['local_truthfulqa_mc1']['acc'], abs=1e-6)
  assert tqa['mc2'] == pytest.approx(want_m['local_truthfulqa_mc2']['acc'], abs=1e-4)


def test_command_writes_results_and_unknown_task_exits_2(setup, capsys):
  d = setup
  out = d / 'eval' / 'lm_eval.json'
  assert ours.main(['--model', str(d / 'export'), '--tasks', 'tiny_mc', '--include_path', str(d / 'tasks'),
                    '--output', str(out), '--batch_size', '8', '--local_only']) == 0
  res = json.loads(out.read_text())
  assert set(res['tasks']) == {'tiny_mc'} and 0 <= res['tasks']['tiny_mc']['acc'] <= 1
  assert res['jax_rlhf']['requests']['loglikelihood'] == sum(len(r['choices']) for r in MC)
  assert ours.main(['--model', str(d / 'export'), '--tasks', 'no_such_task_xyz', '--include_path',
                    str(d / 'tasks'), '--local_only']) == 2
  assert 'unknown lm-eval task(s): no_such_task_xyz' in capsys.readouterr().err
