"""Judges of the label stage (jax_rlhf/judges.py) and the RM's soft-label loss.

The lm: judge's swap-and-average gives P(A > B) + P(B > A) = 1 exactly and cancels a position bias planted
in a tiny random judge; its prompt goes through the judge tokenizer's chat template when it has one; the
Bradley-Terry ranking recovers known strengths; the rm: judge ranks by the reward model's score; the soft
Bradley-Terry loss equals a float64 loop and, on hard labels, the ranking loss."""
import itertools

import numpy as np
import pytest

from jax_rlhf import judges, losses

PROMPT = 'reverse the list: red, blue, green\n'
RESPONSES = ['green, blue, red', 'red, blue, green', "i don't know", 'green, red', '', 'blue']


@pytest.fixture(scope='module')
def tok():
  from transformers import AutoTokenizer
  from jax_rlhf.tasks import instruct_world
  return AutoTokenizer.from_pretrained(instruct_world.tokenizer_path())


@pytest.fixture(scope='module')
def judge_dir(tmp_path_factory, tok):
  """A tiny random causal LM with the task's tokenizer, exported as an HF folder."""
  from flax import nnx
  from jax_rlhf.models import hf
  from jax_rlhf.models.transformer import Transformer
  from jax_rlhf.models.transformer_config import preset
  cfg = preset('tiny', vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.eos_token_id)
  d = tmp_path_factory.mktemp('judge') / 'hf'
  hf.save_pretrained(Transformer(cfg, rngs=nnx.Rngs(3)), d, tokenizer=tok)
  return d


def lm_config(path, constitution=None, **label):
  from jax_rlhf.config import stage_config
  c = stage_config('label', 'quick')
  c.label.judge = f'lm:{path}'
  if constitution:
    c.label.constitution = str(constitution)
  c.label.update(**label)
  return c


def constitution(tmp_path, lines):
  p = tmp_path / 'constitution.txt'
  p.write_text('# a comment\n\n' + '\n'.join(lines) + '\n')
  return p


def test_swap_and_average_sums_to_one_exactly_and_cancels_a_planted_position_bias(judge_dir, tmp_path):
  principles = ['Choose the correct response.', 'Choose the honest response.', 'Choose the harmless response.']
  judge = judges.get_judge(lm_config(judge_dir, constitution(tmp_path, principles)), str(tmp_path))
  assert isinstance(judge, judges.LMJudge) and judge.principles == principles
  pairs = [(x, y) for x, y in itertools.permutations(RESPONSES, 2)]
  pr = [principles[i % 3] for i in range(len(pairs))]
  fair = judge.pair_preferences(PROMPT, pairs, pr)

  clean = judge.option_logits
  judge.option_logits = lambda texts: clean(texts) + np.array([4.0, 0.0])  # plant: option A +4 nats, always
  biased = judge.pair_preferences(PROMPT, pairs, pr)
  for x, y in itertools.combinations(RESPONSES, 2):  # biased judge, each direction asked on its own
    for principle in principles:
      p_xy = judge.pair_preferences(PROMPT, [(x, y)], [principle])[0]
      p_yx = judge.pair_preferences(PROMPT, [(y, x)], [principle])[0]
      assert p_xy + p_yx == 1.0, (x, y, p_xy, p_yx)
  for prefs in (fair, biased):
    assert np.all((prefs > 0) & (prefs < 1))
  # one order alone: the planted bias decides (the first-listed response wins both ways round)
  for x, y in itertools.combinations(RESPONSES[:4], 2):
    d = judge.option_logits([judge.texts(PROMPT, x, y, principles[0]), judge.texts(PROMPT, y, x, principles[0])])
    first_wins = judges.sigmoid(d[:, 0] - d[:, 1])
    assert np.all(first_wins > 0.9), first_wins
  # swap-and-average: every pair is ordered as the unbiased judge orders it (the bias cancels)
  assert np.all(np.sign(biased - 0.5) == np.sign(fair - 0.5))
  assert np.all(np.abs(biased - 0.5) < 0.5)
  judge.option_logits = clean
  same = judge.pair_preferences(PROMPT, [(x, x) for x in RESPONSES[:2]], principles[:2])
  assert list(same) == [0.5, 0.5]


def test_lm_judge_ranks_every_group_by_its_pairs_and_is_order_free(judge_dir, tmp_path):
  """One principle: a group reversed gets the reversed soft labels and the same ranking of the texts."""
  for how in ('bt', 'wins'):
    judge = judges.get_judge(lm_config(judge_dir, constitution(tmp_path, ['Choose the better response.']),
                                       judge_rank=how), str(tmp_path))
    group = RESPONSES[:5]
    a, = judge([PROMPT], [group], np.random.default_rng(0))
    b, = judge([PROMPT], [group[::-1]], np.random.default_rng(0))
    prefs = np.asarray(a['prefs'])
    assert prefs.shape == (5, 5) and np.all(np.diag(prefs) == 0.5)
    np.testing.assert_array_equal(prefs + prefs.T, np.ones((5, 5)))
    # the same pairs in other rows of the judge's batch: equal up to float rounding
    np.testing.assert_allclose(np.asarray(b['prefs']), prefs[::-1, ::-1], rtol=0, atol=1e-12)
    assert sorted(a['ranking']) == list(range(5))
    assert [group[i] for i in a['ranking']] == [group[::-1][i] for i in b['ranking']]
    wins = np.where(np.eye(5, dtype=bool), 0, prefs).sum(1)
    assert wins[a['ranking'][0]] == wins.max()  # bt and win counts agree on the top of a consistent judge


def test_lm_judge_prompt_goes_through_the_chat_template(judge_dir, tok, tmp_path):
  import shutil
  from transformers import AutoTokenizer
  chat = tmp_path / 'chat'
  shutil.copytree(judge_dir, chat)
  t = AutoTokenizer.from_pretrained(chat)
  t.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  t.save_pretrained(chat)
  c = lm_config(chat)
  judge = judges.get_judge(c, str(tmp_path))
  text = judge.texts(PROMPT, 'red', 'blue', 'Choose the correct response.')
  question = c.label.judge_template.format(principle='Choose the correct response.', prompt=PROMPT.strip(),
                                           a='red', b='blue')
  assert text == '<|user|>' + question + '<|end|><|assistant|>' + c.label.judge_answer_prefix
  assert judge.option_logits([text]).shape == (1, 2)
  # without a template (the task's tokenizer), or with data.chat_template=off: the question as it is
  plain = judges.get_judge(lm_config(judge_dir), str(tmp_path)).texts(PROMPT, 'red', 'blue',
                                                                     'Choose the correct response.')
  assert plain == question + c.label.judge_answer_prefix
  c.data.chat_template = 'off'
  assert judges.get_judge(c, str(tmp_path)).texts(PROMPT, 'red', 'blue', 'Choose the correct response.') == plain


def test_bad_judges_are_one_clear_line(judge_dir, tmp_path):
  from jax_rlhf.train import common
  for spec, match in (('human', 'no judge'), ('lm:', 'no judge'), ('rm:nope', 'nope'),
                      (f'lm:{tmp_path}/none', 'no such model folder')):
    c = lm_config(judge_dir)
    c.label.judge = spec
    with pytest.raises(common.UserError, match=match):
      judges.get_judge(c, str(tmp_path))
  with pytest.raises(common.UserError, match='one'):
    judges.get_judge(lm_config(judge_dir, judge_options=('A', 'Answer: (')), str(tmp_path))
  with pytest.raises(common.UserError, match='no principle'):
    judges.get_judge(lm_config(judge_dir, constitution(tmp_path, [])), str(tmp_path))
  with pytest.raises(common.UserError, match='bt or wins'):
    judges.get_judge(lm_config(judge_dir, judge_rank='elo'), str(tmp_path))


def test_bradley_terry_fit_recovers_known_strengths():
  rng = np.random.default_rng(0)
  for k in (2, 4, 9):
    s = rng.normal(size=k) * 2
    prefs = judges.sigmoid(s[:, None] - s[None, :])
    fit = judges.bradley_terry(prefs, l2=0.0)
    np.testing.assert_allclose(fit - fit.mean(), s - s.mean(), atol=1e-8)
    assert judges.ranking_from_prefs(prefs, 'bt') == list(np.argsort(-s))
    assert judges.ranking_from_prefs(prefs, 'wins') == list(np.argsort(-s))
    # with the ridge: the gradient of the penalised objective (a float64 loop) vanishes at the fit
    fit = judges.bradley_terry(prefs, l2=1e-2)
    grad = [sum(prefs[i, j] - 1 / (1 + np.exp(-(fit[i] - fit[j]))) for j in range(k) if j != i) - 1e-2 * fit[i]
            for i in range(k)]
    np.testing.assert_allclose(grad, 0.0, atol=1e-9)


def test_rm_judge_ranks_by_the_reward_models_score(tok, tmp_path):
  from flax import nnx
  from jax_rlhf.config import stage_config
  from jax_rlhf.models import hf
  from jax_rlhf.models.heads import ScalarModel
  from jax_rlhf.models.transformer_config import preset
  from jax_rlhf.train import checkpoint
  cfg = preset('tiny', vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.eos_token_id)
  d = tmp_path / 'rmx'
  hf.save_pretrained(ScalarModel(cfg, rngs=nnx.Rngs(1)), d / 'hf', tokenizer=tok)
  checkpoint.mark_done(str(d), {'stage': 'rm'})
  c = stage_config('label', 'quick')
  c.label.judge = 'rm:rmx'
  judge = judges.get_judge(c, str(tmp_path))
  groups = [RESPONSES[:4], RESPONSES[2:]]
  scores = judge.scores([PROMPT, PROMPT], groups)
  got = judge([PROMPT, PROMPT], groups, np.random.default_rng(0))
  for g, s, r in zip(groups, scores, got):
    assert len(s) == len(g) and r['ranking'] == list(np.argsort(-s, kind='stable'))
    assert np.all(np.diff(s[r['ranking']]) <= 0)
  assert scores[0][2] == pytest.approx(scores[1][0], abs=1e-5)  # the same response scores the same anywhere


# ---------------------------------------------------------------------------------------------------------
# the RM's soft-label loss
# ---------------------------------------------------------------------------------------------------------

def ref_soft_loss(rewards, prefs, valid):
  """float64 loop: per prompt the mean over pairs i < j of the soft cross-entropy, then the mean over prompts."""
  per_prompt, acc = [], []
  for r, p, v in zip(rewards.astype(np.float64), prefs.astype(np.float64), valid):
    k = int(v.sum())
    terms, agree = [], []
    for i in range(k):
      for j in range(i + 1, k):
        d = r[i] - r[j]
        terms.append(-(p[i, j] * np.log(1 / (1 + np.exp(-d))) + (1 - p[i, j]) * np.log(1 / (1 + np.exp(d)))))
        agree.append(p[i, j] * (d > 0) + (1 - p[i, j]) * (d < 0))
    if terms:
      per_prompt.append(np.mean(terms))
      acc.append(np.mean(agree))
  return np.mean(per_prompt), np.mean(acc)


def test_soft_ranking_loss_equals_a_float64_loop_and_the_ranking_loss_on_hard_labels():
  import jax.numpy as jnp
  rng = np.random.default_rng(7)
  b, kmax = 6, 5
  rewards = rng.normal(size=(b, kmax)).astype(np.float32) * 2
  ks = [5, 2, 1, 4, 3, 5]  # a prompt with one response has no pair
  valid = np.arange(kmax)[None] < np.asarray(ks)[:, None]
  prefs = rng.uniform(size=(b, kmax, kmax)).astype(np.float32)
  prefs = np.triu(prefs, 1) + np.tril(1 - prefs.transpose(0, 2, 1), -1) + 0.5 * np.eye(kmax)
  garbage = np.where(valid, rewards, np.nan)  # padded rewards never reach the loss
  loss, m = losses.soft_ranking_loss(jnp.asarray(garbage), jnp.asarray(prefs), jnp.asarray(valid))
  ref_loss, ref_acc = ref_soft_loss(rewards, prefs, valid)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-6)
  np.testing.assert_allclose(float(m['accuracy']), ref_acc, rtol=2e-6)
  assert int(m['num_pairs']) == sum(k * (k - 1) // 2 for k in ks)

  recs = []
  ranking = np.zeros((b, kmax), np.int32)
  for n, k in enumerate(ks):
    order = [int(i) for i in rng.permutation(k)]
    ranking[n, :k] = order
    recs.append({'responses': ['x'] * k, 'ranking': order})
  hard = judges.soft_labels(recs, kmax)
  hard_loss, hard_m = losses.soft_ranking_loss(jnp.asarray(rewards), jnp.asarray(hard), jnp.asarray(valid))
  rank_loss, rank_m = losses.ranking_loss(jnp.asarray(rewards), jnp.asarray(ranking), jnp.asarray(valid))
  np.testing.assert_allclose(float(hard_loss), float(rank_loss), rtol=1e-6)
  np.testing.assert_allclose(float(hard_m['accuracy']), float(rank_m['accuracy']), rtol=1e-6)
  recs[0]['prefs'] = prefs[0].tolist()  # a record with a judge's prefs keeps them
  np.testing.assert_array_equal(judges.soft_labels(recs, kmax)[0], prefs[0])


def test_soft_ranking_dpo_loss_is_per_pair_label_smoothing_and_hard_labels_give_ranking_dpo():
  import jax.numpy as jnp
  rng = np.random.default_rng(3)
  b, kmax, beta = 5, 4, 0.5
  pol, ref = rng.normal(size=(b, kmax)) * 3, rng.normal(size=(b, kmax)) * 3
  ks = [4, 2, 3, 1, 4]
  valid = np.arange(kmax)[None] < np.asarray(ks)[:, None]
  prefs = rng.uniform(size=(b, kmax, kmax))
  prefs = np.triu(prefs, 1) + np.tril(1 - prefs.transpose(0, 2, 1), -1) + 0.5 * np.eye(kmax)
  loss, m = losses.soft_ranking_dpo_loss(jnp.asarray(pol, jnp.float32), jnp.asarray(ref, jnp.float32),
                                         jnp.asarray(prefs, jnp.float32), jnp.asarray(valid), beta=beta)
  per_prompt = []
  for n, k in enumerate(ks):  # float64: cDPO with eps = 1 - P_ij for the pair "i beats j"
    terms = []
    for i in range(k):
      for j in range(i + 1, k):
        z = beta * ((pol[n, i] - ref[n, i]) - (pol[n, j] - ref[n, j]))
        eps = 1 - prefs[n, i, j]
        terms.append(-(1 - eps) * np.log(1 / (1 + np.exp(-z))) - eps * np.log(1 / (1 + np.exp(z))))
    if terms:
      per_prompt.append(np.mean(terms))
  np.testing.assert_allclose(float(loss), np.mean(per_prompt), rtol=2e-6)
  assert int(m['num_pairs']) == sum(k * (k - 1) // 2 for k in ks)
  ranking = np.zeros((b, kmax), np.int32)
  recs = []
  for n, k in enumerate(ks):
    order = [int(i) for i in rng.permutation(k)]
    ranking[n, :k] = order
    recs.append({'responses': ['x'] * k, 'ranking': order})
  hard, _ = losses.soft_ranking_dpo_loss(jnp.asarray(pol, jnp.float32), jnp.asarray(ref, jnp.float32),
                                         jnp.asarray(judges.soft_labels(recs, kmax)), jnp.asarray(valid), beta=beta)
  plain, _ = losses.ranking_dpo_loss(jnp.asarray(pol, jnp.float32), jnp.asarray(ref, jnp.float32),
                                     jnp.asarray(ranking), jnp.asarray(valid), beta=beta)
  np.testing.assert_allclose(float(hard), float(plain), rtol=1e-6)


@pytest.mark.slow
def test_label_stage_with_the_lm_judge_writes_soft_labels_that_train_the_rm(judge_dir, tmp_path):
  """label.judge=lm:PATH on a tiny policy: every record carries complementary prefs whose Bradley-Terry order
  is its ranking (and the task's gold scores); the RM then trains on the soft target."""
  from jax_rlhf.train import checkpoint, label, rm
  w = tmp_path / 'W'
  shutil_copy = __import__('shutil').copytree
  shutil_copy(judge_dir, w / 'sft' / 'hf')  # the random judge's LM doubles as the policy and the RM's body
  checkpoint.mark_done(str(w / 'sft'), {'stage': 'sft'})
  c = lm_config(judge_dir, constitution(tmp_path, ['Choose the correct response.', 'Choose the honest one.']))
  c.label.num_prompts = 20
  summary = label.run(c, str(w), 'label', {'policy': 'sft'})
  assert summary['judge'] == f'lm:{judge_dir}' and summary['rankings'] == 20
  with open(w / 'label' / 'rankings.jsonl') as f:
    recs = [__import__('json').loads(line) for line in f]
  for r in recs:
    p = np.asarray(r['prefs'])
    k = len(r['responses'])
    assert p.shape == (k, k) and np.all(p + p.T == 1.0) and len(r['gold']) == k and r['category']
    assert r['ranking'] == judges.ranking_from_prefs(p, 'bt')
  c.rm.update(batch_size=8, epochs=1)
  out = rm.run(c, str(w), 'rm', {'init': 'sft', 'rankings': 'label'})
  assert out['soft_labels'] is True and out['rankings_from'] == ['label']
