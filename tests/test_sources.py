"""data/sources.py and data/builders.py: each builder on a fixture in its dataset's real format, TFDS and JSONL
sources, kinds made from other kinds, held-out splits, and the grain loader (resume, host sharding)."""

import json
import os

import numpy as np
import pytest

import fixtures
from jax_rlhf.data import builders, records, sources


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  root = tmp_path_factory.mktemp('raw')
  return {'hh': fixtures.write_hh(str(root / 'hh')), 'sft': fixtures.write_tldr_sft(str(root / 'tldr')),
          'cmp': fixtures.write_comparisons(str(root / 'cmp')), 'rk': fixtures.write_rankings(str(root / 'rk')),
          'tfds': str(root / 'tfds')}


def load(raw, spec, kind, split='train', **kw):
  return sources.load(spec, kind, split=split, data_dir=raw['tfds'], **kw)


# ---------------------------------------------------------------------------------------------------------
# builders: records out equal the records expected
# ---------------------------------------------------------------------------------------------------------


def test_hh_rlhf_splits_transcripts_at_the_last_assistant_turn(raw):
  train = load(raw, f'hh_rlhf:{raw["hh"]}', 'ranking')
  assert train.items == fixtures.hh_expected(fixtures.HH_TRAIN)  # red-team-attempts left alone
  assert train.origins[0] == os.path.join(raw['hh'], 'harmless-base', 'train.jsonl.gz') + ':1'
  assert load(raw, f'hh_rlhf:{raw["hh"]}', 'ranking', 'eval').items == fixtures.hh_expected(fixtures.HH_TEST)
  multi = train.items[1]  # a two-turn dialogue: the first assistant turn stays in the prompt
  assert multi['prompt'].endswith('For how long?\n\nAssistant:') and 'Put it in water.' in multi['prompt']
  assert multi['responses'] == [' About nine minutes for a hard egg.', ' Forever.']


def test_tldr_sft_uses_the_n_plus_prompt_format(raw):
  train = load(raw, f'tldr_sft:{raw["sft"]}', 'demonstration')
  assert train.items == fixtures.tldr_sft_expected(fixtures.TLDR_POSTS[:2])
  assert train.items[0]['prompt'] == ('SUBREDDIT: r/relationships\n\nTITLE: My friend never replies\n\nPOST: We have '
                                      'been friends for years. Lately she never answers my messages.\n\nTL;DR:')
  assert load(raw, f'tldr_sft:{raw["sft"]}', 'demonstration', 'eval').items == \
      fixtures.tldr_sft_expected(fixtures.TLDR_POSTS[2:])  # valid.jsonl


def test_tldr_comparisons_by_split_with_cnn_dm_left_out(raw):
  spec = f'tldr_comparisons:{raw["cmp"]}'
  assert load(raw, spec, 'ranking').items == fixtures.comparisons_expected('train')
  held = load(raw, spec, 'ranking', 'eval')
  assert held.items == fixtures.comparisons_expected('validation') and held.skipped == 0
  builder = builders.build('tldr_comparisons', raw['cmp'], raw['tfds'])
  assert builder.info.metadata['filtered'] == {'train': 0, 'validation': 1}  # the CNN/DM comparison


def test_k_way_rankings_with_ranking_or_ranks(raw):
  assert load(raw, f'rankings:{raw["rk"]}', 'ranking').items == fixtures.rankings_expected()
  assert load(raw, f'rankings:{raw["rk"]}', 'ranking', 'eval').items == fixtures.rankings_expected()[:1]


def test_builds_are_array_record_read_back_with_tfds_data_source(raw):
  import tensorflow_datasets as tfds
  builder = builders.build('hh_rlhf', raw['hh'], raw['tfds'])
  files = os.listdir(builder.data_dir)
  assert any('array_record' in f for f in files) and not any('tfrecord' in f for f in files), files
  name = f'hh_rlhf/{builder.builder_config.name}'
  src = tfds.data_source(name, split='train', data_dir=raw['tfds'])
  assert len(src) == len(fixtures.HH_TRAIN)
  # ... and through our tfds: scheme, sorted back into file order by origin
  via = load(raw, f'tfds:{name}:train', 'ranking')
  assert via.items == fixtures.hh_expected(fixtures.HH_TRAIN)
  assert load(raw, f'tfds:{name}', 'ranking', 'eval').items[0]['prompt'] in \
      [r['prompt'] for r in fixtures.hh_expected(fixtures.HH_TEST)]


def test_changed_raw_files_get_a_fresh_build(tmp_path):
  root = fixtures.write_rankings(str(tmp_path / 'rk'))
  before = builders.fingerprint(root)
  fixtures.write_jsonl(os.path.join(root, 'train.jsonl'), fixtures.RANKINGS[:2])
  assert builders.fingerprint(root) != before
  assert len(sources.load(f'rankings:{root}', 'ranking', data_dir=str(tmp_path / 'tfds'))) == 2


# ---------------------------------------------------------------------------------------------------------
# kinds from other kinds, jsonl, held-out splits
# ---------------------------------------------------------------------------------------------------------


def test_a_ranking_source_gives_prompts_once_and_its_best_response(raw):
  rk = fixtures.rankings_expected()
  demos = load(raw, f'rankings:{raw["rk"]}', 'demonstration').items
  assert demos == [{'prompt': r['prompt'], 'response': r['responses'][r['ranking'][0]]} for r in rk]
  cmp_prompts = load(raw, f'tldr_comparisons:{raw["cmp"]}', 'prompt').items
  assert cmp_prompts == [{'prompt': r['prompt']} for r in fixtures.comparisons_expected('train')]
  texts = load(raw, f'tldr_sft:{raw["sft"]}', 'text').items
  assert texts == [{'text': r['prompt'] + r['response']} for r in fixtures.tldr_sft_expected(fixtures.TLDR_POSTS[:2])]


def test_jsonl_source_holds_out_its_first_records_for_eval(tmp_path):
  path = str(tmp_path / 'd.jsonl')
  rows = [{'prompt': f'p{i}', 'response': f'r{i}'} for i in range(20)]
  records.write_jsonl(path, rows)
  train = sources.load(f'jsonl:{path}', 'demonstration', eval_fraction=0.1)
  held = sources.load(path, 'demonstration', split='eval', eval_fraction=0.1)  # a bare path is jsonl
  assert held.items == rows[:2] and train.items == rows[2:]
  assert train.origins[0] == f'{path}:3'
  assert sources.load(path, 'demonstration', split='all').items == rows


def test_spec_parsing():
  assert sources.parse_spec('tfds:foo/bar:test') == ('tfds', 'foo/bar', 'test')
  assert sources.parse_spec('hh_rlhf:~/x')[0] == 'hh_rlhf' and not sources.parse_spec('hh_rlhf:~/x')[1].startswith('~')
  assert sources.parse_spec('data/x.jsonl') == ('jsonl', 'data/x.jsonl', None)
  with pytest.raises(records.RecordError, match='names no path'):
    sources.load('hh_rlhf:', 'ranking')


# ---------------------------------------------------------------------------------------------------------
# grain loader
# ---------------------------------------------------------------------------------------------------------


def arrays(n=10):
  return {'x': np.arange(n), 'y': np.arange(n) * 10 + 7}


def take(loader, k):
  return [next(loader)['x'].tolist() for _ in range(k)]


def test_loader_epochs_are_permutations_deterministic_from_the_seed():
  a = sources.GrainLoader(arrays(12), 4, seed=3, process_index=0, process_count=1)
  batches = take(a, 9)  # 3 epochs of 3 batches
  epochs = [sum(batches[i:i + 3], []) for i in (0, 3, 6)]
  for e in epochs:
    assert sorted(e) == list(range(12))
  assert epochs[0] != epochs[1] != epochs[2]
  assert take(sources.GrainLoader(arrays(12), 4, seed=3, process_index=0, process_count=1), 9) == batches
  assert take(sources.GrainLoader(arrays(12), 4, seed=4, process_index=0, process_count=1), 9) != batches
  b = next(a)
  np.testing.assert_array_equal(b['y'], b['x'] * 10 + 7)


def test_loader_drops_the_incomplete_last_batch_of_an_epoch():
  loader = sources.GrainLoader(arrays(10), 4, seed=0, shuffle=False, process_index=0, process_count=1)
  assert take(loader, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
  assert loader.epoch == 1
  with pytest.raises(ValueError, match='larger than'):
    sources.GrainLoader(arrays(3), 4, seed=0, process_index=0, process_count=1)


def test_restored_loader_reads_exactly_the_uninterrupted_batches():
  uninterrupted = sources.GrainLoader(arrays(10), 3, seed=1, process_index=0, process_count=1)
  expected = take(uninterrupted, 12)
  first = sources.GrainLoader(arrays(10), 3, seed=1, process_index=0, process_count=1)
  take(first, 5)
  state = json.loads(json.dumps(first.state()))  # it travels in the checkpoint's JSON meta
  resumed = sources.GrainLoader(arrays(10), 3, seed=1, process_index=0, process_count=1)
  resumed.restore(state)
  assert take(resumed, 7) == expected[5:]
  assert resumed.epoch == uninterrupted.epoch


def test_two_hosts_read_disjoint_complete_halves_of_every_batch():
  whole = sources.GrainLoader(arrays(16), 8, seed=5, process_index=0, process_count=1)
  hosts = [sources.GrainLoader(arrays(16), 8, seed=5, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(6):
    g = next(whole)['x'].tolist()
    h0, h1 = (next(h)['x'].tolist() for h in hosts)
    assert len(h0) == len(h1) == 4 and not set(h0) & set(h1)
    assert h0 + h1 == g  # host p holds block p of the global batch, as its devices do
  state = hosts[1].state()
  with pytest.raises(ValueError, match='2 hosts'):
    sources.GrainLoader(arrays(16), 8, seed=5, process_index=0, process_count=1).restore(state)
  with pytest.raises(ValueError, match='divisible'):
    sources.GrainLoader(arrays(16), 7, seed=5, process_index=0, process_count=2)
