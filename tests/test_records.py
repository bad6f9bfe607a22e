"""Record schemas: every bad input stops with `path:line: what is wrong`, or is skipped and counted."""

import json

import pytest

from jax_rlhf.data import records
from jax_rlhf.data.records import RecordError

GOOD = {
    'demonstration': {'prompt': 'reverse: c a t\n', 'response': 't a c'},
    'ranking': {'prompt': 'p\n', 'responses': ['a', 'b', 'c'], 'ranking': [2, 0, 1]},
    'prompt': {'prompt': 'p\n', 'category': 'helpful'},
    'text': {'text': 'the zorb is blue.'},
}

# (case, kind, bad line as JSON-able object or raw bytes, words the message must contain)
BAD = [
    ('missing_field', 'demonstration', {'prompt': 'p\n'}, "missing field 'response'"),
    ('missing_text', 'text', {'txt': 'x'}, "missing field 'text'"),
    ('wrong_type', 'demonstration', {'prompt': 'p\n', 'response': 3}, "'response' must be a string, got int"),
    ('wrong_type_prompt', 'prompt', {'prompt': ['p']}, "'prompt' must be a string, got list"),
    ('empty_response', 'demonstration', {'prompt': 'p\n', 'response': ''}, "empty 'response'"),
    ('empty_ranked_response', 'ranking', {'prompt': 'p', 'responses': ['a', ''], 'ranking': [0, 1]},
     'empty responses[1]'),
    ('ranking_not_permutation', 'ranking', {'prompt': 'p', 'responses': ['a', 'b', 'c'], 'ranking': [0, 0, 1]},
     'not a permutation of range(3)'),
    ('ranking_out_of_range', 'ranking', {'prompt': 'p', 'responses': ['a', 'b'], 'ranking': [1, 2]},
     'not a permutation of range(2)'),
    ('ranking_not_ints', 'ranking', {'prompt': 'p', 'responses': ['a', 'b'], 'ranking': [True, False]},
     "'ranking' must be a list of integers"),
    ('ranking_missing', 'ranking', {'prompt': 'p', 'responses': ['a', 'b']}, "missing field 'ranking'"),
    ('k_below_2', 'ranking', {'prompt': 'p', 'responses': ['a'], 'ranking': [0]}, 'K >= 2'),
    ('chosen_equals_rejected', 'ranking', {'prompt': 'p', 'chosen': 'a', 'rejected': 'a'}, 'the same response'),
    ('both_ranking_forms', 'ranking', {'prompt': 'p', 'chosen': 'a', 'rejected': 'b', 'responses': ['a', 'b'],
                                       'ranking': [0, 1]}, 'not both'),
    ('not_an_object', 'text', [1, 2], 'expected a JSON object, got list'),
    ('invalid_json', 'text', b'{"text": "x",\n', 'invalid JSON'),
    ('invalid_utf8', 'text', b'{"text": "\xff\xfe"}\n', 'invalid UTF-8'),
]


def _write(path, kind, bad):
  good = json.dumps(GOOD[kind]).encode() + b'\n'
  bad = bad if isinstance(bad, bytes) else json.dumps(bad).encode() + b'\n'
  path.write_bytes(good + bad + good)  # the bad record is on line 2


@pytest.mark.parametrize('case,kind,bad,words', BAD, ids=[b[0] for b in BAD])
def test_bad_record_raises_with_file_and_line(tmp_path, case, kind, bad, words):
  path = tmp_path / f'{case}.jsonl'
  _write(path, kind, bad)
  with pytest.raises(RecordError) as err:
    records.read_jsonl(str(path), kind)
  assert str(err.value).startswith(f'{path}:2: '), str(err.value)
  assert words in str(err.value)


@pytest.mark.parametrize('case,kind,bad,words', BAD, ids=[b[0] for b in BAD])
def test_bad_record_is_skipped_and_counted(tmp_path, case, kind, bad, words):
  path = tmp_path / f'{case}.jsonl'
  _write(path, kind, bad)
  out, skipped = records.read_jsonl(str(path), kind, on_error='skip')
  assert skipped == 1 and len(out) == 2


def test_missing_file_raises_with_path(tmp_path):
  path = tmp_path / 'nope.jsonl'
  for on_error in ('raise', 'skip'):
    with pytest.raises(RecordError, match='file does not exist') as err:
      records.read_jsonl(str(path), 'text', on_error=on_error)
    assert str(err.value).startswith(f'{path}:0: ')


def test_chosen_rejected_normalised_to_k2_ranking():
  out = records.validate({'prompt': 'p', 'chosen': 'good', 'rejected': 'bad', 'id': 7}, 'ranking')
  assert out == {'prompt': 'p', 'responses': ['good', 'bad'], 'ranking': [0, 1], 'id': 7}


def test_valid_records_pass_unchanged_with_extra_fields():
  for kind, record in GOOD.items():
    assert records.validate(record, kind) == record


def test_k_way_ranking_may_repeat_responses():
  out = records.validate({'prompt': 'p', 'responses': ['a', 'a', 'b'], 'ranking': [2, 1, 0]}, 'ranking')
  assert out['ranking'] == [2, 1, 0]


def test_unknown_kind_and_on_error_are_rejected(tmp_path):
  with pytest.raises(ValueError, match='kind must be one of'):
    records.validate({'text': 'x'}, 'texts')
  with pytest.raises(ValueError, match='on_error'):
    records.read_jsonl(str(tmp_path / 'x.jsonl'), 'text', on_error='ignore')


def test_write_then_read_round_trip(tmp_path):
  rows = [{'prompt': 'héllo ✓\n', 'response': 'ok'}, {'prompt': 'p', 'response': 'q\nr'}]
  path = str(tmp_path / 'sub' / 'demos.jsonl')
  records.write_jsonl(path, rows)
  with open(path, 'rb') as f:
    raw = f.read()
  assert raw.count(b'\n') == 2 and b'\xc3\xa9' in raw  # one line per record, UTF-8 kept
  assert records.read_jsonl(path, 'demonstration') == (rows, 0)


def test_blank_lines_are_ignored(tmp_path):
  path = tmp_path / 't.jsonl'
  path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
  assert records.read_jsonl(str(path), 'text') == ([{'text': 'a'}, {'text': 'b'}], 0)
