"""Record schemas and their validation. One JSON object per line (JSONL):

  demonstration  {"prompt": str, "response": str}
  ranking        {"prompt": str, "responses": [str, ...], "ranking": [indices, best first]}   (K >= 2)
                 or {"prompt": str, "chosen": str, "rejected": str}, normalised to
                 responses=[chosen, rejected], ranking=[0, 1]
  prompt         {"prompt": str}
  text           {"text": str}

Extra fields are kept (e.g. a prompt's "category"). Strings must be non-empty. The responses of a K-way
ranking may repeat (K samples of a policy often do); a chosen/rejected pair may not.
A bad record stops reading with `RecordError("path:line: what is wrong")`, or is skipped and counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

KINDS = ('demonstration', 'ranking', 'prompt', 'text')
_REQUIRED = {'demonstration': ('prompt', 'response'), 'prompt': ('prompt',), 'text': ('text',)}


class RecordError(ValueError):
  """A record (or a record file) that does not fit its schema; the message says what and where."""


def _string(record: dict, field: str) -> str:
  if field not in record:
    raise RecordError(f'missing field {field!r}')
  value = record[field]
  if not isinstance(value, str):
    raise RecordError(f'field {field!r} must be a string, got {type(value).__name__}')
  if not value:
    raise RecordError(f'empty {field!r}')
  return value


def validate(record: dict, kind: str) -> dict:
  """Check `record` against the schema of `kind`; return it normalised (a new dict). Raises RecordError."""
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  if not isinstance(record, dict):
    raise RecordError(f'expected a JSON object, got {type(record).__name__}')
  if kind != 'ranking':
    for field in _REQUIRED[kind]:
      _string(record, field)
    return dict(record)

  _string(record, 'prompt')
  has_pair = 'chosen' in record or 'rejected' in record
  if has_pair and ('responses' in record or 'ranking' in record):
    raise RecordError('a ranking has either "responses" and "ranking" or "chosen" and "rejected", not both')
  if has_pair:
    chosen, rejected = _string(record, 'chosen'), _string(record, 'rejected')
    if chosen == rejected:
      raise RecordError('"chosen" and "rejected" are the same response')
    out = {k: v for k, v in record.items() if k not in ('chosen', 'rejected')}
    return {**out, 'responses': [chosen, rejected], 'ranking': [0, 1]}

  if 'responses' not in record:
    raise RecordError('missing field \'responses\' (or "chosen" and "rejected")')
  responses = record['responses']
  if not isinstance(responses, list):
    raise RecordError(f'field \'responses\' must be a list, got {type(responses).__name__}')
  if len(responses) < 2:
    raise RecordError(f'a ranking needs K >= 2 responses, got {len(responses)}')
  for i, response in enumerate(responses):
    if not isinstance(response, str):
      raise RecordError(f'responses[{i}] must be a string, got {type(response).__name__}')
    if not response:
      raise RecordError(f'empty responses[{i}]')
  if 'ranking' not in record:
    raise RecordError("missing field 'ranking'")
  ranking = record['ranking']
  if not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking):
    raise RecordError(f"field 'ranking' must be a list of integers, got {ranking!r}")
  if sorted(ranking) != list(range(len(responses))):
    raise RecordError(f"'ranking' {ranking} is not a permutation of range({len(responses)})")
  return {**record, 'responses': list(responses), 'ranking': list(ranking)}


def read_jsonl(path: str, kind: str, on_error: str = 'raise') -> tuple[list[dict], int]:
  """Read and validate a JSONL file of `kind` records; returns (normalised records, number skipped).

  A missing file always raises. A line that is not UTF-8, not JSON or not a valid record raises
  RecordError(f'{path}:{line}: ...') with on_error='raise', or is skipped and counted with on_error='skip'.
  Blank lines are ignored.
  """
  if on_error not in ('raise', 'skip'):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  if not os.path.isfile(path):
    raise RecordError(f'{path}:0: file does not exist')
  out, skipped = [], 0
  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        try:
          line = raw.decode('utf-8')
        except UnicodeDecodeError as e:
          raise RecordError(f'invalid UTF-8 at byte {e.start}') from None
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise RecordError(f'invalid JSON: {e.msg} (column {e.colno})') from None
        out.append(validate(record, kind))
      except RecordError as e:
        if on_error == 'raise':
          raise RecordError(f'{path}:{lineno}: {e}') from None
        skipped += 1
  return out, skipped


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  """Write records one JSON object per line (UTF-8, non-ASCII kept as is), creating parent folders."""
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + '\n')
