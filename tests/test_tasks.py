"""jax_rlhf.tasks: get_task from the config (no code outside tasks/ knows a task's name), its knobs checked,
and `verify` against each helpful task kind's exact answer (None where the answer cannot be checked)."""

import numpy as np
import pytest

from jax_rlhf import tasks
from jax_rlhf.config import stage_config
from jax_rlhf.tasks import instruct_world as iw
from jax_rlhf.tasks import instruct_world_language as lang


@pytest.fixture(scope='module')
def task():
  return tasks.get_task(stage_config('pipeline'))


# (prompt, its exact answer, a wrong answer) for every helpful task kind, by hand
HELPFUL = [('reverse: c a t\n', 't a c', 'c a t'), ('write 3 12 7 backwards\n', '7 12 3', '3 12 7'),
           ('sort: dog cat sun\n', 'cat dog sun', 'dog cat sun'), ('put 10 9 2 in order\n', '2 9 10', '10 2 9'),
           ('uppercase: c a t\n', 'C A T', 'c a t'), ('count: c a t\n', '3', '4'),
           ('first: c a t\n', 'c', 't'), ('what comes last in c a t?\n', 't', 'a')]


def test_the_config_gives_instruct_world_with_the_configs_knobs(task):
  assert task.name == 'instruct_world'
  c = stage_config('pipeline')
  w = task.world.config
  for k in ('seed', 'demo_error_rate', 'rank_noise', 'refusal_of_safe_score', 'decline_fraction', 'min_items',
            'max_items'):
    assert getattr(w, k) == c.task[k], k
  assert w == iw.WorldConfig()  # the config's defaults are the world's documented ones


@pytest.mark.parametrize('prompt, right, wrong', HELPFUL)
def test_verify_is_one_exactly_for_the_answer_of_each_helpful_kind(task, prompt, right, wrong):
  assert task.category(prompt) == 'helpful'
  assert task.subcategory(prompt) == next(n for n, ts in lang.TASK_TEMPLATES.items()
                                          if any(t.split('{')[0] and prompt.startswith(t.split('{')[0]) for t in ts))
  assert task.verify(prompt, right) == 1.0
  assert task.verify(prompt, wrong) == 0.0
  assert task.verify(prompt, right + ' x') == 0.0 and task.verify(prompt, '') == 0.0
  assert task.gold_score(prompt, right) == 1.0  # verify's 1 is the labeler's full score


def test_verify_agrees_with_the_gold_score_of_one_on_sampled_helpful_prompts(task):
  rng = np.random.default_rng(0)
  seen = set()
  for rec in task.world.prompts(400, 'train'):
    p = rec['prompt']
    if rec['category'] != 'helpful':
      continue
    seen.add(rec['subcategory'])
    for r in (task.world.reference_answer(p), task.world.demonstration(p, rng, error_rate=1.0)):
      assert task.verify(p, r) == float(task.gold_score(p, r) == 1.0), (p, r)
  assert seen == set(lang.TASK_TEMPLATES)  # every kind was checked


@pytest.mark.parametrize('category', ['honest', 'harmless'])
def test_verify_is_none_where_the_answer_cannot_be_checked(task, category):
  recs = [r for r in task.world.prompts(200, 'train') if r['category'] == category]
  assert recs
  for r in recs[:20]:
    assert task.verify(r['prompt'], task.world.reference_answer(r['prompt'])) is None


def test_rank_is_the_worlds_noisy_ranking(task):
  p, rs = 'reverse: c a t\n', ['t a c', 'c a t', 'i cannot help with that.', 't a']
  assert task.rank(p, rs, np.random.default_rng(3)) == task.world.rank(p, rs, np.random.default_rng(3))


def test_no_task_unknown_task_and_bad_knob():
  c = stage_config('pipeline')
  c.task.name = ''
  assert tasks.get_task(c) is None
  c.task.name = 'instruct_wrld'
  with pytest.raises(tasks.TaskError, match="unknown task 'instruct_wrld'"):
    tasks.get_task(c)
  c = stage_config('pipeline')
  c.task.min_items = 9
  with pytest.raises(tasks.TaskError, match='min_items'):
    tasks.get_task(c)
  with pytest.raises(tasks.TaskError, match=r'has no knob demo_eror_rate; did you mean task.demo_error_rate\?'):
    iw.InstructWorldTask({'demo_eror_rate': 0.5})


def _lines(path):
  with open(path) as f:
    return f.read().splitlines()


def test_world_files_are_prefix_stable_streams_so_a_larger_size_only_appends(tmp_path):
  """Every size of `file_sizes` raised at once: each file of the smaller write is a prefix of the larger's."""
  sizes = dict(n_pretrain=60, n_sft_train=30, n_sft_eval=8, n_prompts_train=40, n_prompts_eval=10)
  small = iw.World(iw.WorldConfig()).write(str(tmp_path / 'a'), **sizes)
  large = iw.World(iw.WorldConfig()).write(str(tmp_path / 'b'), **{k: 2 * v for k, v in sizes.items()})
  assert set(iw.InstructWorldTask.file_sizes) == set(sizes) and set(small) == set(large)
  for name in small:
    a, b = _lines(small[name]), _lines(large[name])
    assert len(b) > len(a) and b[:len(a)] == a, name


def test_task_files_grow_with_a_larger_size_and_refuse_any_other_change_in_one_line(tmp_path):
  """W/data records the knobs that wrote it: a larger n_prompts_train (what rounds=N raises) rewrites the files,
  the records earlier runs read unchanged; another seed, or fewer prompts, is one line naming the knob; a
  workdir from before task.json is read as it is."""
  from jax_rlhf.train import common
  c = stage_config('pipeline', 'quick')
  first = common.task_files(c, str(tmp_path))
  before = _lines(first['prompts_train'])
  assert len(before) == c.task.n_prompts_train == 128
  c.task.n_prompts_train = 200
  grown = common.task_files(c, str(tmp_path))
  after = _lines(grown['prompts_train'])
  assert len(after) == 200 and after[:128] == before
  assert common.task_files(c, str(tmp_path)) == grown  # the same knobs again: read, not rewritten
  for key, value in (('seed', 1), ('n_prompts_train', 150)):
    bad = stage_config('pipeline', 'quick')
    bad.task.update({'n_prompts_train': 200, key: value})
    with pytest.raises(common.UserError, match=f'written with task.{key}=.*this run has task.{key}={value}'):
      common.task_files(bad, str(tmp_path))
  (tmp_path / 'data' / 'task.json').unlink()
  c.task.seed = 5
  assert common.task_files(c, str(tmp_path)) == grown


def stage_of():
  """module -> the stage (run kind's module) it belongs to: each KINDS module, and the files a stage is split into
  (train/dpo_online.py is the online half of the dpo stage)."""
  from jax_rlhf.pipeline import KINDS
  own = {m: m for m, _ in KINDS.values()}
  own['jax_rlhf.train.dpo_online'] = 'jax_rlhf.train.dpo'
  return own


def imports_of(path):
  """The jax_rlhf modules a source file imports (`import a.b`, `from a import b` as a.b when b is a module)."""
  import ast
  import os
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = set()
  for node in ast.walk(ast.parse(open(os.path.join(root, path)).read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:  # `from a import b`: a.b when b is a module
      out |= {node.module} | {f'{node.module}.{a.name}' for a in node.names
                              if os.path.exists(os.path.join(root, *node.module.split('.'), a.name + '.py'))}
  return {m for m in out if m.startswith('jax_rlhf')}


def _library_files():
  import glob
  import os
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, 'jax_rlhf', '**', '*.py'), recursive=True))


@pytest.mark.parametrize('path', _library_files())
def test_import_graph_no_stage_imports_a_stage_and_config_imports_no_task(path):
  """Every module of the library: it imports no stage but its own (the pipeline reaches stages through importlib
  only; a stage split over files imports its own parts), and config, the pipeline, stages and eval reach tasks
  only through jax_rlhf.tasks."""
  mods = imports_of(path)
  stages = stage_of()
  own = stages.get(path[:-3].replace('/', '.'))
  foreign = {m for m in mods if m in stages and stages[m] != own}
  if path != 'jax_rlhf/plan.py':  # the memory plan, a tool above the stages: it compiles each stage's steps
    assert not foreign, foreign
  if path.endswith(('config.py', 'pipeline.py')) or '/train/' in path or path.endswith('evaluate.py'):
    assert not {m for m in mods if m.startswith('jax_rlhf.tasks.')}, mods  # only through jax_rlhf.tasks
  if path.endswith(('config.py', 'variants.py')):
    assert not {m for m in mods if m.startswith('jax_rlhf.tasks')}, mods
