"""Parsers for raw interaction files: the only module of the project that reads raw data.

Every parser returns an :class:`Interactions`: per-user, time-ordered event sequences in CSR
form with items remapped to dense ids ``1..V`` (0 is reserved for padding).

Formats (``load(format, path)`` dispatches by these names):

* ``"ml-100k"``: MovieLens 100K ``u.data``, tab-separated ``user item rating timestamp``.
* ``"ml-1m"``: MovieLens 1M ``ratings.dat``, ``user::item::rating::timestamp``.
* ``"recbole"``: RecBole atomic ``.inter`` files, tab-separated with a typed header such as
  ``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float``; columns are found by
  name, in any order, extra columns are ignored.
* ``"sasrec"``: one line per user, ``user_id item_id item_id ...`` in time order, space
  separated (the SASRec Amazon files); an event's timestamp is its index within the line.

CTR impression logs in the FuxiCTR / BARS CSV layout (AmazonElectronics_x1, MicroVideo1.7M_x1,
KuaiVideo_x1) are read by :func:`parse_fuxictr_csv` into a :class:`CTRData` (impressions with
click labels and behaviour sequences, not per-user event sequences), so they are not in
``FORMATS``.

Conventions shared by all parsers:

* **Ordering.** A user's events are sorted by timestamp with a *stable* sort on the timestamp
  alone, so events with equal timestamps keep the file's row order. Ties are never broken by
  item id (in ML-100K that would leak a popularity-correlated order; see DESIGN.md, "Data").
* **Users** are listed in increasing order of their original id; ``Interactions.users`` holds
  those ids (int64, or str for RecBole tokens that are not all canonical integers).
* **Items** get dense ids ``1..V`` in increasing order of their original id, counting only
  the events that survive the filters; ``item_ids[d]`` is the original id of dense id ``d``.
* **Filters.** ``min_rating`` drops events rated below it (counted in
  ``skipped["low_rating"]``); then users with fewer than ``min_events`` events are dropped
  (counted in ``skipped["short_users"]``, their events in ``skipped["short_user_events"]``,
  and summarized by one ``logging.warning``). If no user remains a ValueError names the file.
* **Errors.** Malformed input raises ``ValueError`` whose message starts with the file path
  and the 1-based line number (``"<path>: line <n>: ..."``) and says what was expected.
  Trailing blank lines are ignored; blank lines elsewhere are errors. Integers beyond int64
  (ids, timestamps, float timestamps of 2**63 and more) are errors naming the line.
* **Truncation.** A last line without a newline whose last field is shorter than that field
  in every one of the (up to 1,000) lines before it is logged as a warning naming the line: the
  file was probably cut mid-line (``head -c``, an interrupted copy). MovieLens 100K's
  ``u.data`` is checked against the user, item and rating counts of the ``u.info`` beside it.
* **Fingerprints.** :func:`fingerprint` records a data file's size, mtime and SHA-256, which a
  run directory keeps to refuse resuming on changed data.

Parsing is vectorized (``np.loadtxt``'s C reader plus numpy checks); only when the fast path
finds a problem does a per-line Python scan run, to report the first offending line.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
  "CTRData",
  "CTRSamples",
  "FORMATS",
  "fingerprint",
  "Genres",
  "Interactions",
  "Split",
  "leave_one_out",
  "load",
  "parse_fuxictr_csv",
  "load_genres",
  "parse_movielens_genres",
  "parse_movielens_100k_genres",
  "parse_movielens_100k",
  "parse_movielens_1m",
  "parse_recbole_inter",
  "parse_sasrec_text",
  "popularity",
  "source_files",
]

PathLike = str | Path


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Interactions:
  """Per-user time-ordered event sequences in CSR form.

  User ``u`` (``0 <= u < len(self)``) owns events ``offsets[u]:offsets[u + 1]`` of ``items``,
  ``timestamps`` and ``ratings``, in time order (stable on equal timestamps).

  Attributes:
    users: [U] original user ids (int64, or str for non-integer RecBole tokens).
    offsets: [U + 1] int64 CSR offsets into the event arrays.
    items: [N] int32 dense item ids in ``1..num_items`` (0 is padding, never used here).
    timestamps: [N] int64 event times (unix seconds, or the event's index within its user's
      sequence for formats without times).
    ratings: [N] float32 ratings, or None when the format has none.
    item_ids: [num_items + 1] original id of each dense id; index 0 is unused (0 or "").
    num_items: V, the number of distinct items.
    source: where the data came from, ``"<format>:<path>"``.
    skipped: counts of what the filters dropped (``short_users``, ``short_user_events``,
      ``low_rating`` when ``min_rating`` was given).
  """

  users: np.ndarray
  offsets: np.ndarray
  items: np.ndarray
  timestamps: np.ndarray
  ratings: np.ndarray | None
  item_ids: np.ndarray
  num_items: int
  source: str
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    n = len(self.items)
    if len(self.offsets) != len(self.users) + 1 or self.offsets[0] != 0 or self.offsets[-1] != n:
      raise ValueError(f"{self.source}: offsets [{len(self.offsets)}] do not describe "
                       f"{len(self.users)} users and {n} events")
    if len(self.timestamps) != n or (self.ratings is not None and len(self.ratings) != n):
      raise ValueError(f"{self.source}: items, timestamps and ratings differ in length")
    if len(self.item_ids) != self.num_items + 1:
      raise ValueError(f"{self.source}: item_ids has {len(self.item_ids)} entries, "
                       f"expected num_items + 1 = {self.num_items + 1}")

  def __len__(self) -> int:
    return len(self.users)

  @property
  def num_events(self) -> int:
    """Total number of events N."""
    return len(self.items)

  def lengths(self) -> np.ndarray:
    """Returns the [U] int64 number of events of each user."""
    return np.diff(self.offsets)

  def sequence(self, u: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns user ``u``'s events.

    Args:
      u: user index in ``0..len(self) - 1`` (not the original id; see ``users``).

    Returns:
      ``(items, timestamps)``: views of the int32 dense item ids and int64 times, in time order.
    """
    if not -len(self) <= u < len(self):
      raise IndexError(f"user index {u} out of range for {len(self)} users")
    u = u % len(self)
    s, e = self.offsets[u], self.offsets[u + 1]
    return self.items[s:e], self.timestamps[s:e]

  def __repr__(self) -> str:
    return (f"Interactions(source={self.source!r}, users={len(self)}, items={self.num_items}, "
            f"events={self.num_events}, skipped={self.skipped})")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Leave-one-out split of an :class:`Interactions` (see :func:`leave_one_out`).

  For a user with events ``s_1..s_n`` (``n >= 3``):

  * ``train``: ``s_1..s_{n-2}``;
  * ``valid_history`` (the same object as ``train``) and ``valid_target`` ``s_{n-1}``;
  * ``test_history``: ``s_1..s_{n-1}`` and ``test_target`` ``s_n``.

  Histories are :class:`Interactions` over the same users, in the same order, with the same
  item vocabulary (``item_ids``, ``num_items``) as the input; targets are [U] arrays.

  Attributes:
    train: all but the last two events of each user.
    valid_history: same object as ``train``.
    valid_target: [U] int32 dense id of each user's second-to-last event.
    valid_target_ts: [U] int64 its timestamp.
    test_history: all but the last event of each user.
    test_target: [U] int32 dense id of each user's last event.
    test_target_ts: [U] int64 its timestamp.
  """

  train: Interactions
  valid_history: Interactions
  valid_target: np.ndarray
  valid_target_ts: np.ndarray
  test_history: Interactions
  test_target: np.ndarray
  test_target_ts: np.ndarray

  def __len__(self) -> int:
    return len(self.train)

  @property
  def users(self) -> np.ndarray:
    """[U] original user ids."""
    return self.train.users

  @property
  def num_items(self) -> int:
    """V, the size of the shared item vocabulary."""
    return self.train.num_items


def _truncate(inter: Interactions, drop: int) -> Interactions:
  """Returns ``inter`` without the last ``drop`` events of every user (each has > drop)."""
  lengths = inter.lengths()
  starts = np.repeat(inter.offsets[:-1], lengths)
  pos = np.arange(inter.num_events, dtype=np.int64) - starts
  keep = pos < np.repeat(lengths - drop, lengths)
  offsets = inter.offsets - drop * np.arange(len(inter.offsets), dtype=np.int64)
  return Interactions(
    users=inter.users, offsets=offsets, items=inter.items[keep],
    timestamps=inter.timestamps[keep],
    ratings=None if inter.ratings is None else inter.ratings[keep],
    item_ids=inter.item_ids, num_items=inter.num_items, source=inter.source,
    skipped=dict(inter.skipped))


def leave_one_out(inter: Interactions) -> Split:
  """Splits each user's sequence leave-one-out (SASRec / HSTU protocol).

  Args:
    inter: parsed interactions; every user needs at least 3 events (the parsers' default
      ``min_events=3`` guarantees it).

  Returns:
    A :class:`Split`: ``train`` = all but the last two events, validation target = the
    second-to-last event (history = ``train``), test target = the last event (history = all
    but the last). Event order, and so the choice of targets among equal timestamps, is the
    parser's stable file order.

  Raises:
    ValueError: a user has fewer than 3 events.
  """
  lengths = inter.lengths()
  short = np.flatnonzero(lengths < 3)
  if len(short):
    u = short[0]
    raise ValueError(f"{inter.source}: leave_one_out needs at least 3 events per user; user "
                     f"{inter.users[u]} has {lengths[u]} ({len(short)} such users; parse "
                     f"with min_events >= 3)")
  last = inter.offsets[1:] - 1
  train = _truncate(inter, 2)
  return Split(
    train=train, valid_history=train,
    valid_target=inter.items[last - 1].copy(), valid_target_ts=inter.timestamps[last - 1].copy(),
    test_history=_truncate(inter, 1),
    test_target=inter.items[last].copy(), test_target_ts=inter.timestamps[last].copy())


def popularity(items: np.ndarray, num_items: int) -> np.ndarray:
  """Counts how often each dense item id occurs.

  Args:
    items: int array of dense item ids in ``0..num_items`` (e.g. ``split.train.items``);
      zeros (padding) are not counted.
    num_items: V.

  Returns:
    [V + 1] int64 counts; index 0 (padding) is always 0.
  """
  items = np.asarray(items).ravel()
  if items.size and (items.min() < 0 or items.max() > num_items):
    raise ValueError(f"popularity: item ids must lie in 0..{num_items}, got range "
                     f"{items.min()}..{items.max()}")
  counts = np.bincount(items.astype(np.int64), minlength=num_items + 1).astype(np.int64)
  counts[0] = 0
  return counts


# --------------------------------------------------------------------------------------------
# Reading and field validation
# --------------------------------------------------------------------------------------------

_INT_RE = re.compile(r" *[+-]?[0-9]+ *")
_INT64_MAX = 2**63 - 1
# Separators a wrongly formatted line may use, for hints.
_SEPARATORS = (("\t", "tab"), ("::", "'::'"), (",", "comma"), (";", "semicolon"),
               ("|", "'|'"), (" ", "space"))


def _sep_name(sep: str) -> str:
  return dict(_SEPARATORS).get(sep, repr(sep))


def _show(line: str, width: int = 80) -> str:
  return repr(line if len(line) <= width else line[:width] + "...")


def _separator_hint(line: str, expected: str) -> str:
  """A hint when ``line`` is blank or looks separated by something other than ``expected``."""
  if not line.strip():
    return " (blank line)"
  for sep, name in _SEPARATORS:
    if sep != expected and sep not in expected and sep in line.strip():
      return f"; the line looks {name}-separated, expected {_sep_name(expected)}"
  return ""


def _resolve(path: PathLike, default_name: str | None = None, pattern: str | None = None) -> Path:
  """Returns the file to read: ``path`` itself, or the default file inside a directory."""
  p = Path(path).expanduser()
  if p.is_dir():
    if default_name is not None and (p / default_name).is_file():
      return p / default_name
    if pattern is not None:
      found = sorted(p.glob(pattern))
      if len(found) == 1:
        return found[0]
      raise ValueError(f"{p}: directory holds {len(found)} files matching {pattern!r}; "
                       "expected exactly one (pass the file itself)")
    raise ValueError(f"{p}: is a directory without {default_name!r}; pass the file itself")
  if not p.is_file():
    raise FileNotFoundError(f"{p}: no such file")
  return p


def _read_text(p: Path, expected: str) -> str:
  """Reads ``p`` as UTF-8, normalizes newlines, drops trailing blank lines.

  Raises:
    ValueError: undecodable bytes (with the line) or an empty file.
  """
  data = p.read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{p}: line {line}: byte {e.start} is not valid UTF-8; expected a text "
                     f"file of {expected}") from None
  if text.startswith("\ufeff"):
    text = text[1:]
  if "\r" in text:
    text = text.replace("\r\n", "\n")
  end = len(text)
  while end > 0:  # drop trailing blank (or whitespace-only) lines
    nl = text.rfind("\n", 0, end)
    if text[nl + 1:end].strip(" \t"):
      break
    end = max(nl, 0)
  text = text[:end]
  if not text:
    raise ValueError(f"{p}: empty file, expected {expected}")
  if not data.rstrip(b" \t\r").endswith(b"\n"):  # the last line has no newline
    _warn_if_truncated(p, text)
  return text


_FIELD_SPLIT = re.compile(r"::|[\t,; ]")


def _warn_if_truncated(p: Path, text: str, window: int = 1000) -> None:
  """Warns when the last line (which has no newline) looks cut short.

  Its last field is compared with the last field of up to ``window`` lines before it: shorter
  than every one of them (a 3-digit timestamp after 9-digit ones) means the file was probably
  truncated mid-line, which would otherwise parse as a valid but wrong event.
  """
  tail = text[-200 * window:]
  lines = tail.split("\n")[1 if len(tail) < len(text) else 0:]  # not a line cut by the slice
  last, before = lines[-1], lines[-window - 1:-1]
  if len(before) < 2:
    return
  widths = [len(_FIELD_SPLIT.split(line.strip())[-1]) for line in before if line.strip()]
  field = _FIELD_SPLIT.split(last.strip())[-1]
  if widths and len(field) < min(widths):
    n = text.count("\n") + 1
    log.warning("%s: line %d: the last line has no newline and its last field %r is shorter "
                "than in each of the %d lines before it (at least %d characters): the file "
                "looks truncated", p, n, field, len(widths), min(widths))


def _check_id(s: str, label: str) -> str | None:
  if not s.strip():
    return f"missing {label}"
  if not _INT_RE.fullmatch(s):
    return f"expected an integer {label}, got {_show(s, 40)}"
  if _too_many_digits(s) or abs(int(s)) > _INT64_MAX:
    return f"{label} {_show(s.strip(), 40)} is out of the int64 range"
  return None


def _check_token(s: str, label: str) -> str | None:
  return None if s.strip() else f"missing {label}"


def _check_rating(s: str, label: str) -> str | None:
  if not s.strip():
    return f"missing {label}"
  try:
    v = float(s)
  except ValueError:
    return f"expected a numeric {label}, got {s!r}"
  return None if math.isfinite(v) else f"expected a finite {label}, got {s!r}"


def _check_time_int(s: str, label: str) -> str | None:
  if not s.strip():
    return f"missing {label}"
  if not _INT_RE.fullmatch(s):
    try:
      float(s)
    except ValueError:
      return f"expected a non-negative integer {label}, got non-numeric {s!r}"
    return f"expected a non-negative integer {label}, got {_show(s, 40)}"
  if _too_many_digits(s):
    return f"{label} {_show(s.strip(), 40)} is out of the int64 range"
  v = int(s)
  if v < 0:
    return f"expected a non-negative integer {label}, got negative {s.strip()}"
  if v > _INT64_MAX:
    return f"{label} {_show(s.strip(), 40)} is out of the int64 range"
  return None


def _too_many_digits(s: str) -> bool:
  """More than int64's 19 significant digits (and so no int() of a 4,300+ digit string)."""
  return len(s.strip().lstrip("+-").lstrip("0")) > 19


def _check_time_float(s: str, label: str) -> str | None:
  if not s.strip():
    return f"missing {label}"
  try:
    v = float(s)
  except ValueError:
    return f"expected a non-negative numeric {label}, got non-numeric {s!r}"
  if not math.isfinite(v):
    return f"expected a finite {label}, got {_show(s, 40)}"
  if v < 0:
    return f"expected a non-negative {label}, got negative {s.strip()}"
  if v >= 2.0**63:
    return f"{label} {s.strip()} is out of the int64 range (timestamps are stored as int64)"
  return None


@dataclasses.dataclass(frozen=True)
class _Column:
  """A column to read: its role, 0-based index in the line, label and field validator."""

  role: str  # "user" | "item" | "rating" | "timestamp"
  index: int
  label: str
  check: Callable[[str, str], str | None]
  dtype: str  # loadtxt dtype of the fast path


@dataclasses.dataclass(frozen=True)
class _Table:
  """The layout of a delimited file, for parsing and for error messages."""

  path: Path
  sep: str
  ncols: int
  columns: tuple[_Column, ...]
  layout: str  # e.g. "user_id item_id rating timestamp"
  first_line: int = 1  # line number of the first data line (2 after a header)


def _scan(table: _Table, lines: list[str]) -> None:
  """Validates data lines one by one in Python; raises at the first bad one.

  This is the slow path that names the offending line. It applies the same rules as the
  vectorized fast path (column count, then each column's validator).
  """
  for k, line in enumerate(lines):
    n = table.first_line + k
    parts = line.split(table.sep)
    if len(parts) != table.ncols:
      raise ValueError(
        f"{table.path}: line {n}: expected {table.ncols} {_sep_name(table.sep)}-separated "
        f"columns ({table.layout}), got {len(parts)}{_separator_hint(line, table.sep)}: "
        f"{_show(line)}")
    for col in table.columns:
      err = col.check(parts[col.index], col.label)
      if err is not None:
        raise ValueError(f"{table.path}: line {n}: {err} in column {col.index + 1} "
                         f"(expected {table.layout}): {_show(line)}")


def _fail(table: _Table, body: str, reason: str) -> NoReturn:
  """Runs the slow scan to name the bad line; raises a generic error if it finds none."""
  _scan(table, body.split("\n"))
  raise ValueError(f"{table.path}: could not parse as {table.layout} "
                   f"({_sep_name(table.sep)}-separated): {reason}")


def _canonical_int_tokens(b: np.ndarray, ncols: int, indices: list[int]) -> bool:
  """Whether no field of the token columns ``indices`` could be a non-canonical integer.

  ``b`` holds the bytes of tab-separated lines that all have ``ncols`` fields. A field that
  starts with '+', a space, '-0' or a '0' followed by a digit, or ends with a space, would
  parse to the same int64 as another spelling ("01" and "1"); such files keep string tokens.
  """
  if not indices:
    return True
  starts = np.concatenate([[0], np.flatnonzero((b == 9) | (b == 10)) + 1])
  ends = np.concatenate([starts[1:] - 1, [len(b)]])  # one past each field's last byte
  starts = starts.reshape(-1, ncols)[:, indices].ravel()
  ends = ends.reshape(-1, ncols)[:, indices].ravel()
  padded = np.concatenate([b, np.zeros(2, np.uint8)])
  first, second, last = padded[starts], padded[starts + 1], padded[np.maximum(ends - 1, 0)]
  nonempty = ends > starts
  bad = nonempty & ((first == ord("+")) | (first == ord(" ")) | (last == ord(" "))
                    | ((first == ord("-")) & (second == ord("0")))
                    | ((first == ord("0")) & (ends - starts > 1)))
  return not bad.any()


def _loadtxt(work: str, cols: tuple[_Column, ...], token_dtype: str) -> dict[str, np.ndarray]:
  arr = np.loadtxt(io.StringIO(work), delimiter="\t", comments=None, quotechar=None,
                   usecols=[c.index for c in cols], ndmin=1,
                   dtype=[(c.role, token_dtype if c.dtype == "str" else c.dtype) for c in cols])
  return {c.role: arr[c.role] for c in cols}


def _read_table(table: _Table, body: str) -> dict[str, np.ndarray]:
  """Parses the data lines ``body`` (no header, no trailing newline) of a delimited file.

  Fast path: a vectorized column count on the raw bytes, then ``np.loadtxt``'s C reader
  with typed columns. Any problem sends the file through :func:`_scan`, which names the line.

  Returns:
    One array per column role, with the column's dtype ("i8" -> int64, "f8" -> float64);
    "str" (token) columns are int64 when every token is a canonical integer, else str.
  """
  work = body
  if len(table.sep) > 1:  # loadtxt takes one-character delimiters: map "::" to a tab
    if "\t" in body:
      _fail(table, body, "unexpected tab")
    work = body.replace(table.sep, "\t")
  # Column count of every line at once: count tabs per line on the raw bytes.
  b = np.frombuffer(work.encode("utf-8"), np.uint8)
  newlines = np.flatnonzero(b == 10)
  line_starts = np.concatenate([[0], newlines + 1])  # every line is non-empty here
  tabs_per_line = np.add.reduceat((b == 9).view(np.uint8), line_starts, dtype=np.int64)
  if np.any(tabs_per_line != table.ncols - 1):
    _fail(table, body, "column count")
  cols = table.columns
  tokens = [c for c in cols if c.dtype == "str"]
  out = None
  if tokens and _canonical_int_tokens(b, table.ncols, [c.index for c in tokens]):
    try:  # integer tokens (the common case): typed, fast
      out = _loadtxt(work, cols, "i8")
    except ValueError:
      out = None
  if out is None:
    try:
      out = _loadtxt(work, cols, "O")
    except ValueError as e:
      _fail(table, body, str(e))
    for c in tokens:
      out[c.role] = out[c.role].astype(str)
      if np.any(np.char.str_len(np.char.strip(out[c.role])) == 0):
        _fail(table, body, f"missing {c.label}")
  if len(next(iter(out.values()))) != len(newlines) + 1:
    _fail(table, body, "row count mismatch")
  for c in cols:
    v = out[c.role]
    if c.role == "rating" and not np.all(np.isfinite(v)):
      _fail(table, body, f"non-finite {c.label}")
    if c.role == "timestamp" and (np.any(v < 0) or not np.all(np.isfinite(v))
                                  or (v.dtype.kind == "f" and np.any(v >= 2.0**63))):
      _fail(table, body, f"negative, non-finite or out-of-range {c.label}")
  return out


def _tokens_to_ids(tokens: np.ndarray) -> np.ndarray:
  """Converts str tokens to int64 when all are canonical integers ("7", not "07"), else keeps str."""
  if tokens.dtype.kind != "U":
    return tokens
  try:
    ints = tokens.astype(np.int64)
  except (ValueError, OverflowError):
    return tokens
  return ints if np.array_equal(ints.astype(str), tokens) else tokens


# --------------------------------------------------------------------------------------------
# Building the result
# --------------------------------------------------------------------------------------------


def _build(path: Path, fmt: str, users: np.ndarray, items: np.ndarray, ts: np.ndarray,
           ratings: np.ndarray | None, *, min_events: int, min_rating: float | None,
           positional_time: bool = False, empty_users: int = 0) -> Interactions:
  """Filters, orders (stable on the timestamp alone), groups and remaps raw event columns.

  Args:
    path: the file, for messages.
    fmt: format name, for ``source``.
    users, items: [N] original ids per event, in file row order.
    ts: [N] timestamps (int or float) in file row order.
    ratings: [N] ratings or None.
    min_events: users with fewer events (after the rating filter) are dropped.
    min_rating: if not None, events rated below it are dropped first.
    positional_time: store each event's index within its user's sequence as its timestamp.
    empty_users: users known to have no events at all (counted as short users).

  Returns:
    The :class:`Interactions`.
  """
  skipped: dict[str, int] = {}
  uniq, uinv = np.unique(users, return_inverse=True)  # before filtering: a user whose
  uinv = uinv.reshape(-1)  # events are all low-rated counts as a short user
  if min_rating is not None:
    if ratings is None:
      raise ValueError(f"{path}: min_rating={min_rating} given but the file has no ratings")
    keep = ratings >= min_rating
    skipped["low_rating"] = int(len(keep) - keep.sum())
    uinv, items, ts, ratings = uinv[keep], items[keep], ts[keep], ratings[keep]
  # Stable sort on the timestamp alone, then a stable sort by user: equal times keep row order.
  order = np.argsort(ts, kind="stable")
  order = order[np.argsort(uinv[order], kind="stable")]
  counts = np.bincount(uinv, minlength=len(uniq))
  short = counts < min_events
  skipped["short_users"] = int(short.sum()) + empty_users
  skipped["short_user_events"] = int(counts[short].sum())
  if skipped["short_users"]:
    log.warning("%s: skipped %d users with fewer than %d events (%d events)", path,
                skipped["short_users"], min_events, skipped["short_user_events"])
  if short.all():
    raise ValueError(f"{path}: no user has at least min_events={min_events} events "
                     f"({skipped['short_users']} users, {len(uinv)} events after filters)")
  order = order[~short[uinv[order]]]
  lengths = counts[~short]
  offsets = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  orig_items, item_inv = np.unique(items[order], return_inverse=True)
  num_items = len(orig_items)
  item_ids = np.empty(num_items + 1, dtype=orig_items.dtype)
  item_ids[0] = "" if orig_items.dtype.kind == "U" else 0
  item_ids[1:] = orig_items
  if positional_time:
    timestamps = (np.arange(len(order), dtype=np.int64)
                  - np.repeat(offsets[:-1], lengths))
  else:
    t = ts[order]
    if t.dtype.kind == "f":
      if np.any(t != np.floor(t)):
        log.warning("%s: fractional timestamps are ordered exactly but stored rounded down "
                    "to int64", path)
      t = np.floor(t)
    timestamps = t.astype(np.int64)
  return Interactions(
    users=uniq[~short], offsets=offsets, items=(item_inv.reshape(-1) + 1).astype(np.int32),
    timestamps=timestamps,
    ratings=None if ratings is None else ratings[order].astype(np.float32),
    item_ids=item_ids, num_items=num_items, source=f"{fmt}:{path}", skipped=skipped)


def _check_min_events(min_events: int) -> None:
  if int(min_events) != min_events or min_events < 1:
    raise ValueError(f"min_events={min_events!r}: expected an integer >= 1")


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def _movielens(path: PathLike, fmt: str, default_name: str, sep: str, min_events: int,
               min_rating: float | None) -> Interactions:
  _check_min_events(min_events)
  p = _resolve(path, default_name)
  layout = sep.join(["user_id", "item_id", "rating", "timestamp"])
  table = _Table(path=p, sep=sep, ncols=4, layout=layout, columns=(
    _Column("user", 0, "user id", _check_id, "i8"),
    _Column("item", 1, "item id", _check_id, "i8"),
    _Column("rating", 2, "rating", _check_rating, "f8"),
    _Column("timestamp", 3, "timestamp", _check_time_int, "i8")))
  what = f"{_sep_name(sep)}-separated lines '{layout}' (no header)"
  cols = _read_table(table, _read_text(p, what))
  if fmt == "ml-100k":
    _check_u_info(p, cols)
  return _build(p, fmt, cols["user"], cols["item"], cols["timestamp"], cols["rating"],
                min_events=min_events, min_rating=min_rating)


def _check_u_info(p: Path, cols: dict[str, np.ndarray]) -> None:
  """Checks ``u.data`` against the counts of the ``u.info`` beside it (when both exist).

  ``u.info`` holds ``<n> users``, ``<n> items``, ``<n> ratings``; a mismatch means a
  truncated or edited ``u.data``. Only a file named ``u.data`` is checked (a subset written
  next to it is a different file).
  """
  info = p.with_name("u.info")
  if p.name != "u.data" or not info.is_file():
    return
  have = {"users": len(np.unique(cols["user"])), "items": len(np.unique(cols["item"])),
          "ratings": len(cols["user"])}
  for k, line in enumerate(info.read_text(errors="replace").splitlines()):
    parts = line.split()
    if len(parts) == 2 and parts[1] in have and parts[0].isdigit():
      if int(parts[0]) != have[parts[1]]:
        raise ValueError(f"{p}: holds {have[parts[1]]} {parts[1]} but {info} line {k + 1} "
                         f"says {parts[0]}: the file is truncated or was changed (update or "
                         "remove u.info if the change is intended)")


def parse_movielens_100k(path: PathLike, *, min_events: int = 3,
                         min_rating: float | None = None) -> Interactions:
  """Parses MovieLens 100K ``u.data`` (tab-separated ``user item rating timestamp``).

  Args:
    path: the ``u.data`` file, or the ``ml-100k`` directory holding it.
    min_events: users with fewer events are skipped and counted.
    min_rating: if given, events rated below it are skipped and counted.

  Returns:
    The :class:`Interactions` (with ratings).
  """
  return _movielens(path, "ml-100k", "u.data", "\t", min_events, min_rating)


def parse_movielens_1m(path: PathLike, *, min_events: int = 3,
                       min_rating: float | None = None) -> Interactions:
  """Parses MovieLens 1M ``ratings.dat`` (``user::item::rating::timestamp``).

  Args:
    path: the ``ratings.dat`` file, or the ``ml-1m`` directory holding it.
    min_events: users with fewer events are skipped and counted.
    min_rating: if given, events rated below it are skipped and counted.

  Returns:
    The :class:`Interactions` (with ratings).
  """
  return _movielens(path, "ml-1m", "ratings.dat", "::", min_events, min_rating)


def parse_recbole_inter(path: PathLike, *, min_events: int = 3,
                        min_rating: float | None = None, user_field: str = "user_id",
                        item_field: str = "item_id", time_field: str = "timestamp",
                        rating_field: str = "rating") -> Interactions:
  """Parses a RecBole atomic ``.inter`` file.

  The first line is the header: tab-separated ``name:type`` fields (the type may be
  omitted), e.g. ``user_id:token	item_id:token	rating:float	timestamp:float``. Columns are
  found by name in any order; other columns are ignored but every line must have as many
  fields as the header. User and item tokens are kept as int64 when every token is a canonical
  decimal integer, otherwise as strings. Float timestamps are ordered at full precision and
  stored rounded down to int64. Without a timestamp field the file's row order is the time
  order and timestamps are the events' indices within each user.

  Args:
    path: the ``.inter`` file, or a directory holding exactly one.
    min_events: users with fewer events are skipped and counted.
    min_rating: if given, events rated below it are skipped and counted (needs a rating field).
    user_field, item_field, time_field, rating_field: header names of those columns.

  Returns:
    The :class:`Interactions` (ratings when the file has a rating field, else None).
  """
  _check_min_events(min_events)
  p = _resolve(path, pattern="*.inter")
  expected = (f"a header line of tab-separated '{user_field}:token', '{item_field}:token', "
              f"['{rating_field}:float'], ['{time_field}:float'] fields, then data lines")
  text = _read_text(p, expected)
  header, nl, body = text.partition("\n")
  fields = header.split("\t")
  names = [f.split(":", 1)[0].strip() for f in fields]
  missing = [f for f in (user_field, item_field) if f not in names]
  if missing:
    raise ValueError(f"{p}: line 1: bad RecBole header, missing field(s) "
                     f"{', '.join(repr(m) for m in missing)}; expected {expected}, got "
                     f"{_show(header)}")
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"{p}: line 1: bad RecBole header, repeated field(s) {dup}: {_show(header)}")
  if not nl or not body.strip():
    raise ValueError(f"{p}: header-only file (line 1 is the header), expected at least one "
                     "tab-separated data line after it")
  columns = [_Column("user", names.index(user_field), user_field, _check_token, "str"),
             _Column("item", names.index(item_field), item_field, _check_token, "str")]
  if rating_field in names:
    columns.append(_Column("rating", names.index(rating_field), rating_field, _check_rating,
                           "f8"))
  if time_field in names:
    columns.append(_Column("timestamp", names.index(time_field), time_field,
                           _check_time_float, "f8"))
  else:
    log.warning("%s: no %r field; using the file's row order as time order", p, time_field)
  table = _Table(path=p, sep="\t", ncols=len(fields), columns=tuple(columns),
                 layout=" ".join(fields), first_line=2)
  cols = _read_table(table, body)
  n = len(cols["user"])
  positional = "timestamp" not in cols
  ts = np.arange(n, dtype=np.int64) if positional else cols["timestamp"]
  return _build(p, "recbole", _tokens_to_ids(cols["user"]), _tokens_to_ids(cols["item"]), ts,
                cols.get("rating"), min_events=min_events, min_rating=min_rating,
                positional_time=positional)


def parse_sasrec_text(path: PathLike, *, min_events: int = 3) -> Interactions:
  """Parses one-line-per-user text: ``user_id item_id item_id ...`` in time order.

  Fields are separated by spaces (any run of whitespace is accepted). Each user may appear on
  one line only. An event's timestamp is its 0-based index within the line's items. A line
  with a user id and no items is a user with no events (skipped and counted as short).

  Args:
    path: the text file (e.g. the SASRec ``Beauty.txt``).
    min_events: users with fewer events are skipped and counted.

  Returns:
    The :class:`Interactions` (ratings None).
  """
  _check_min_events(min_events)
  p = _resolve(path)
  layout = "user_id item_id item_id ... (space-separated, one line per user)"
  lines = _read_text(p, f"lines '{layout}'").split("\n")
  parts = [line.split() for line in lines]
  lengths = np.fromiter((len(q) for q in parts), np.int64, len(parts))

  def scan():
    for k, (line, q) in enumerate(zip(lines, parts, strict=True)):
      if not q:
        raise ValueError(f"{p}: line {k + 1}: blank line, expected {layout}")
      for j, tok in enumerate(q):
        err = _check_id(tok, "user id" if j == 0 else "item id")
        if err is not None:
          raise ValueError(f"{p}: line {k + 1}: {err} (field {j + 1}; expected "
                           f"{layout}){_separator_hint(line, ' ')}: {_show(line)}")

  if np.any(lengths == 0):
    scan()
  try:
    ids = np.array(list(itertools.chain.from_iterable(parts))).astype(np.int64)
  except (ValueError, OverflowError) as e:
    scan()
    raise ValueError(f"{p}: could not parse as {layout}: {e}") from e
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  users = ids[starts]
  uniq, first, cnt = np.unique(users, return_index=True, return_counts=True)
  if np.any(cnt > 1):
    d = np.flatnonzero(cnt > 1)[0]
    lines_of = np.flatnonzero(users == uniq[d]) + 1
    raise ValueError(f"{p}: line {lines_of[1]}: user {uniq[d]} already appeared on line "
                     f"{lines_of[0]}; expected one line per user ({layout})")
  is_item = np.ones(len(ids), bool)
  is_item[starts] = False
  n_items = lengths - 1
  return _build(p, "sasrec", np.repeat(users, n_items), ids[is_item],
                np.arange(int(n_items.sum()), dtype=np.int64), None, min_events=min_events,
                min_rating=None, positional_time=True, empty_users=int(np.sum(n_items == 0)))


FORMATS: dict[str, Callable[..., Interactions]] = {
  "ml-100k": parse_movielens_100k,
  "ml-1m": parse_movielens_1m,
  "recbole": parse_recbole_inter,
  "sasrec": parse_sasrec_text,
}


def load(format: str, path: PathLike, **opts) -> Interactions:
  """Parses ``path`` with the parser registered for ``format``.

  Args:
    format: one of ``FORMATS``: "ml-100k", "ml-1m", "recbole", "sasrec".
    path: the file (or, for MovieLens and RecBole, its directory).
    **opts: the parser's keyword options (``min_events``, ``min_rating``, ...).

  Returns:
    The :class:`Interactions`.

  Raises:
    ValueError: unknown format.
  """
  try:
    parser = FORMATS[format]
  except (KeyError, TypeError):
    raise ValueError(f"unknown data format {format!r}; expected one of "
                     f"{', '.join(repr(f) for f in FORMATS)}") from None
  return parser(path, **opts)


_DEFAULT_FILES = {"ml-100k": ("u.data", None), "ml-1m": ("ratings.dat", None),
                  "recbole": (None, "*.inter"), "sasrec": (None, None)}


def source_files(format: str, path: PathLike) -> list[Path]:
  """The raw files that ``load(format, path)`` reads (a directory resolved to its file).

  Raises:
    ValueError: unknown format. FileNotFoundError: missing path.
  """
  if format not in _DEFAULT_FILES:
    raise ValueError(f"unknown data format {format!r}; expected one of "
                     f"{', '.join(repr(f) for f in FORMATS)}")
  name, pattern = _DEFAULT_FILES[format]
  p = _resolve(path, name, pattern)
  files = [p]
  if format == "ml-100k" and p.name == "u.data" and p.with_name("u.info").is_file():
    files.append(p.with_name("u.info"))
  return files


def fingerprint(format: str, path: PathLike) -> list[dict]:
  """Size, mtime and SHA-256 of each file ``load(format, path)`` reads.

  The hash covers the whole content (about 0.5 s per 100 MB), so a file rewritten with the
  same size (permuted ids) is told apart; ``mtime_ns`` is recorded for the message only, so a
  copy or ``touch`` of unchanged content still matches.

  Returns:
    One ``{"path", "size", "mtime_ns", "sha256"}`` per file (absolute paths).
  """
  return [file_fingerprint(f) for f in source_files(format, path)]


def file_fingerprint(f: PathLike) -> dict:
  """``{"path", "size", "mtime_ns", "sha256"}`` of one file (see :func:`fingerprint`)."""
  f = Path(f)
  h = hashlib.sha256()
  with open(f, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
      h.update(block)
  st = f.stat()
  return {"path": str(f.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
          "sha256": h.hexdigest()}


def genre_file(path: PathLike) -> Path:
  """The genre file :func:`load_genres` reads for ``path`` (a file, or a directory holding
  exactly one ``movies.dat`` or ``u.item``)."""
  p = Path(path).expanduser()
  if p.is_dir():
    found = [p / n for n in ("movies.dat", "u.item") if (p / n).is_file()]
    if len(found) != 1:
      raise ValueError(f"{p}: expected exactly one genre file (movies.dat or u.item) in the "
                       f"directory, found {len(found)}")
    p = found[0]
  if not p.is_file():
    raise FileNotFoundError(f"{p}: no such genre file (expected movies.dat or u.item)")
  return p


# --------------------------------------------------------------------------------------------
# FuxiCTR / BARS CTR logs
# --------------------------------------------------------------------------------------------

# Column names of the BARS sequence datasets (looked up in the BARS / FuxiCTR dataset configs):
#   AmazonElectronics_x1: label, user_id, item_id, cate_id, item_history, cate_history
#   MicroVideo1.7M_x1:    user_id, item_id, cate_id, clicked_items, clicked_categories,
#                         timestamp, is_click
#   KuaiVideo_x1:         user_id, item_id, pos_items, neg_items, is_click (+ visual features)
# Sequence fields hold '^'-separated ids, oldest first.
FUXICTR_LABEL_FIELDS = ("label", "is_click", "clk")
FUXICTR_HISTORY_FIELDS = ("item_history", "clicked_items", "pos_items")
FUXICTR_SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class CTRSamples:
  """One split of a CTR log: impressions with click labels and behaviour sequences.

  Row ``r`` is an impression of item ``item[r]`` to user ``user[r]`` with label ``label[r]``;
  the user's behaviour sequence before it is ``hist_items[hist_offsets[r]:hist_offsets[r+1]]``
  (dense item ids, oldest first, as in the file).

  Attributes:
    user: [R] int64 dense user index into ``CTRData.user_ids``.
    item: [R] int32 dense item id in 1..V.
    label: [R] int8, 0 or 1.
    hist_offsets: [R + 1] int64 CSR offsets into ``hist_items``.
    hist_items: [M] int32 dense item ids of every row's sequence.
    timestamps: [R] float64 from a ``timestamp`` column, or None.
    source: ``"fuxictr:<path>"``.
  """

  user: np.ndarray
  item: np.ndarray
  label: np.ndarray
  hist_offsets: np.ndarray
  hist_items: np.ndarray
  timestamps: np.ndarray | None
  source: str

  def __len__(self) -> int:
    return len(self.user)

  def history(self, r: int) -> np.ndarray:
    """Dense item ids [n] of row ``r``'s behaviour sequence, oldest first."""
    return self.hist_items[self.hist_offsets[r]:self.hist_offsets[r + 1]]

  def __repr__(self) -> str:
    return (f"CTRSamples(source={self.source!r}, rows={len(self)}, "
            f"positives={int(self.label.sum())}, history_events={len(self.hist_items)})")


@dataclasses.dataclass(frozen=True, eq=False)
class CTRData:
  """The splits of a FuxiCTR / BARS CTR dataset over one shared item and user vocabulary.

  Attributes:
    splits: {"train" | "valid" | "test" | file stem: CTRSamples}, in file order.
    user_ids: [U] original user ids (int64, or str when not all are canonical integers).
    item_ids: [V + 1] original item id of each dense id (index 0 unused: 0 or "").
    num_items: V, distinct items among candidates and sequences of every split.
    label_field, history_field: the columns that were read.
    source: the path that was parsed.
  """

  splits: dict[str, CTRSamples]
  user_ids: np.ndarray
  item_ids: np.ndarray
  num_items: int
  label_field: str
  history_field: str
  source: str

  def __getitem__(self, split: str) -> CTRSamples:
    if split not in self.splits:
      raise KeyError(f"{self.source}: no split {split!r}; have {sorted(self.splits)}")
    return self.splits[split]

  def __repr__(self) -> str:
    rows = {k: len(v) for k, v in self.splits.items()}
    return (f"CTRData(source={self.source!r}, rows={rows}, users={len(self.user_ids)}, "
            f"items={self.num_items}, label={self.label_field!r}, "
            f"history={self.history_field!r})")


def _pick_field(p: Path, names: list[str], given: str | None, candidates: tuple[str, ...],
                role: str, header: str) -> int:
  if given is not None:
    if given not in names:
      raise ValueError(f"{p}: line 1: header has no {role} column {given!r}; columns: "
                       f"{names} ({_show(header)})")
    return names.index(given)
  for c in candidates:
    if c in names:
      return names.index(c)
  raise ValueError(f"{p}: line 1: header has no {role} column; expected one of "
                   f"{list(candidates)} (or pass {role}_field=), got columns {names}")


def _dense(tokens: list) -> tuple[np.ndarray, np.ndarray]:
  """(originals sorted increasingly [n], rank of each first-seen token [n]) of unique tokens.

  Tokens are compared as int64 when every one is a canonical integer, else as strings.
  """
  arr = _tokens_to_ids(np.array(tokens, dtype=str)) if tokens else np.zeros(0, np.int64)
  order = np.argsort(arr, kind="stable")
  rank = np.empty(len(arr), np.int64)
  rank[order] = np.arange(len(arr))
  return arr[order], rank


def parse_fuxictr_csv(path: PathLike, *, label_field: str | None = None,
                      history_field: str | None = None, user_field: str = "user_id",
                      item_field: str = "item_id", splitter: str = "^") -> CTRData:
  """Parses CTR logs in the FuxiCTR / BARS CSV layout (comma-separated, one header line).

  The header names the columns (any order; other columns, e.g. ``cate_id``, ``cate_history``
  or ``neg_items``, are ignored but every line must have as many fields as the header). Read
  are ``user_field``, ``item_field`` (the candidate), the click label (``label_field``, default
  the first of "label", "is_click", "clk" in the header; values 0/1, also written "0.0" /
  "1.0") and the behaviour sequence (``history_field``, default the first of "item_history",
  "clicked_items", "pos_items"; ids separated by ``splitter``, oldest first; an empty field is
  an empty history). A ``timestamp`` column, if any, is kept per row. Item ids of candidates
  and sequences share one vocabulary with dense ids 1..V assigned in increasing order of the
  original id over all splits (int order when every id is a canonical integer, else string
  order); users likewise get dense indices 0..U-1.

  Args:
    path: a CSV file, or a directory holding ``train.csv``, ``valid.csv`` and/or
      ``test.csv`` (the BARS zip layout; AmazonElectronics_x1 has no valid.csv).
    label_field, history_field, user_field, item_field: column names.
    splitter: separator of ids inside the sequence field.

  Returns:
    A :class:`CTRData`; a single file becomes one split named by its stem.

  Raises:
    ValueError: naming the file and the 1-based line: a missing column in the header, a line
      with the wrong number of fields, an empty user or item, a label other than 0/1, or an
      empty id inside a sequence (e.g. ``"3^^4"``).

  References: Zhu et al., "BARS: Towards Open Benchmarking for Recommender Systems", SIGIR
    2022 (the FuxiCTR / BARS dataset layout).
  """
  p = Path(path).expanduser()
  if p.is_dir():
    files = [(s, p / f"{s}.csv") for s in FUXICTR_SPLITS if (p / f"{s}.csv").is_file()]
    if not files:
      raise ValueError(f"{p}: directory holds none of {[s + '.csv' for s in FUXICTR_SPLITS]}")
  elif p.is_file():
    files = [(p.stem, p)]
  else:
    raise FileNotFoundError(f"{p}: no such file")
  item_index: dict[str, int] = {}
  user_index: dict[str, int] = {}
  raw = {}
  fields = None
  for split, f in files:
    expected = (f"a comma-separated header line naming {user_field}, {item_field}, a label "
                f"and a '{splitter}'-separated history column, then data lines")
    text = _read_text(f, expected)
    lines = text.split("\n")
    rows = csv.reader(lines)
    header_line = lines[0]
    names = [h.strip() for h in next(rows)]
    ucol = _pick_field(f, names, user_field, (), "user", header_line)
    icol = _pick_field(f, names, item_field, (), "item", header_line)
    lcol = _pick_field(f, names, label_field, FUXICTR_LABEL_FIELDS, "label", header_line)
    hcol = _pick_field(f, names, history_field, FUXICTR_HISTORY_FIELDS, "history", header_line)
    tcol = names.index("timestamp") if "timestamp" in names else None
    chosen = (names[lcol], names[hcol])
    if fields is not None and chosen != fields:
      raise ValueError(f"{f}: line 1: label/history columns {chosen} differ from {fields} "
                       f"of the other splits")
    fields = chosen
    if len(lines) < 2:
      raise ValueError(f"{f}: header-only file (line 1 is the header), expected data lines")
    ncols = len(names)
    users, items, labels, offsets, hist, times = [], [], [], [0], [], []
    for k, row in enumerate(rows):
      n = k + 2
      if not row or (len(row) == 1 and not row[0].strip()):
        raise ValueError(f"{f}: line {n}: blank line, expected {ncols} comma-separated "
                         f"fields ({', '.join(names)})")
      if len(row) != ncols:
        raise ValueError(f"{f}: line {n}: expected {ncols} comma-separated fields "
                         f"({', '.join(names)}), got {len(row)}"
                         f"{_separator_hint(lines[k + 1], ',')}: {_show(lines[k + 1])}")
      u, it = row[ucol].strip(), row[icol].strip()
      if not u:
        raise ValueError(f"{f}: line {n}: missing {names[ucol]} (column {ucol + 1})")
      if not it:
        raise ValueError(f"{f}: line {n}: missing {names[icol]} (column {icol + 1})")
      lab = row[lcol].strip()
      if lab in ("0", "1"):
        labels.append(int(lab))
      else:
        try:
          v = float(lab)
        except ValueError:
          v = -1.0
        if v not in (0.0, 1.0):
          raise ValueError(f"{f}: line {n}: {names[lcol]}={lab!r} (column {lcol + 1}); "
                           "expected a click label 0 or 1")
        labels.append(int(v))
      users.append(user_index.setdefault(u, len(user_index)))
      items.append(item_index.setdefault(it, len(item_index)))
      h = row[hcol].strip()
      if h:
        toks = h.split(splitter)
        for j, t in enumerate(toks):
          t = t.strip()
          if not t:
            raise ValueError(f"{f}: line {n}: empty id at position {j + 1} of {names[hcol]} "
                             f"(column {hcol + 1}); expected ids separated by {splitter!r}: "
                             f"{_show(h)}")
          hist.append(item_index.setdefault(t, len(item_index)))
      offsets.append(len(hist))
      if tcol is not None:
        err = _check_time_float(row[tcol], "timestamp")
        if err is not None:
          raise ValueError(f"{f}: line {n}: {err} (column {tcol + 1})")
        times.append(float(row[tcol]))
    raw[split] = (f, users, items, labels, offsets, hist, times if tcol is not None else None)
  item_ids, item_rank = _dense(list(item_index))
  user_ids, user_rank = _dense(list(user_index))
  num_items = len(item_ids)
  vocab = np.empty(num_items + 1, dtype=item_ids.dtype)
  vocab[0] = "" if item_ids.dtype.kind == "U" else 0
  vocab[1:] = item_ids
  splits = {}
  for split, (f, users, items, labels, offsets, hist, times) in raw.items():
    splits[split] = CTRSamples(
      user=user_rank[np.asarray(users, np.int64)],
      item=(item_rank[np.asarray(items, np.int64)] + 1).astype(np.int32),
      label=np.asarray(labels, np.int8),
      hist_offsets=np.asarray(offsets, np.int64),
      hist_items=(item_rank[np.asarray(hist, np.int64)] + 1).astype(np.int32),
      timestamps=None if times is None else np.asarray(times, np.float64),
      source=f"fuxictr:{f}")
  return CTRData(splits=splits, user_ids=user_ids, item_ids=vocab, num_items=num_items,
                 label_field=fields[0], history_field=fields[1], source=str(p))


# --------------------------------------------------------------------------------------------
# Item metadata
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Genres:
  """Genres of MovieLens movies (ML-1M ``movies.dat`` or ML-100K ``u.item``).

  Attributes:
    movie_ids: [M] original movie ids, in file order.
    names: the G genre names (ML-1M: sorted; ML-100K: in ``u.genre`` order, which is
      alphabetical after "unknown").
    multi_hot: [M, G] bool, ``multi_hot[m, g]`` when movie ``movie_ids[m]`` has genre g.
    primary: [M] int64 index into ``names`` of each movie's first-listed genre (its
      "primary" genre). Both files list a movie's genres alphabetically (ML-1M: every line of
      ``movies.dat``; ML-100K: flags in ``u.genre`` order), so this is the alphabetically
      first of its genres, not an editorial main genre.
    source: the file.
  """

  movie_ids: np.ndarray
  names: tuple[str, ...]
  multi_hot: np.ndarray
  primary: np.ndarray
  source: str

  def _rows(self, item_ids: np.ndarray) -> np.ndarray:
    """Row of each dense item id 1..V (row 0, padding, maps to -1)."""
    row = {int(m): i for i, m in enumerate(self.movie_ids)}
    out = np.full(len(item_ids), -1, np.int64)
    for d in range(1, len(item_ids)):
      i = row.get(int(item_ids[d]))
      if i is None:
        raise ValueError(f"{self.source}: movie id {item_ids[d]} (dense item {d}) has no "
                         "line in the genre file")
      out[d] = i
    return out

  def for_items(self, item_ids: np.ndarray) -> np.ndarray:
    """[V + 1, G] genres of dense item ids (``Interactions.item_ids``); row 0 (padding) is
    all False. Raises ValueError naming the first item with no line in the file."""
    rows = self._rows(item_ids)
    out = np.zeros((len(item_ids), len(self.names)), bool)
    out[1:] = self.multi_hot[rows[1:]]
    return out

  def primary_for_items(self, item_ids: np.ndarray) -> np.ndarray:
    """[V + 1] int64 primary genre (index into ``names``) of dense item ids; -1 for row 0
    (padding). Raises ValueError naming the first item with no line in the file."""
    rows = self._rows(item_ids)
    out = np.full(len(item_ids), -1, np.int64)
    out[1:] = self.primary[rows[1:]]
    return out


def _movie_lines(p: Path, sep: str, fields: int, layout: str):
  """Yields (line number, movie id, fields) of a MovieLens movie file (latin-1), checking
  the field count, the id and that no id repeats; errors name the file and line."""
  text = p.read_bytes().decode("latin-1").replace("\r\n", "\n").rstrip("\n")
  if not text.strip():
    raise ValueError(f"{p}: empty file, expected lines '{layout}'")
  seen = {}
  for n, line in enumerate(text.split("\n"), 1):
    parts = line.split(sep)
    if len(parts) != fields:
      raise ValueError(f"{p}: line {n}: {len(parts)} '{sep}'-separated fields, expected "
                       f"{fields} ('{layout}'): {_show(line)}")
    err = _check_id(parts[0].strip(), "movie id")
    if err is not None:
      raise ValueError(f"{p}: line {n}: {err} (expected '{layout}'): {_show(line)}")
    mid = int(parts[0])
    if mid in seen:
      raise ValueError(f"{p}: line {n}: movie id {mid} already appeared on line {seen[mid]}")
    seen[mid] = n
    yield n, mid, parts


def parse_movielens_genres(path: PathLike) -> Genres:
  """Parses MovieLens 1M ``movies.dat``: ``movie_id::title::genre|genre|...`` (latin-1).

  Args:
    path: the ``movies.dat`` file, or the ``ml-1m`` directory holding it.

  Returns:
    The :class:`Genres` (every genre named in the file; a movie may have several; its
    primary genre is the first listed).

  Raises:
    ValueError: a line without three ``::`` fields, a bad or repeated movie id, or an empty
      genre list, naming the file and line.
  """
  p = _resolve(path, "movies.dat")
  layout = "movie_id::title::genre|genre|..."
  ids, lists = [], []
  for n, mid, parts in _movie_lines(p, "::", 3, layout):
    genres = [g.strip() for g in parts[2].split("|")]
    if not all(genres):
      raise ValueError(f"{p}: line {n}: empty genre in {parts[2]!r} (expected '{layout}')")
    ids.append(mid)
    lists.append(genres)
  names = tuple(sorted({g for gs in lists for g in gs}))
  col = {g: j for j, g in enumerate(names)}
  hot = np.zeros((len(ids), len(names)), bool)
  for i, gs in enumerate(lists):
    hot[i, [col[g] for g in gs]] = True
  primary = np.asarray([col[gs[0]] for gs in lists], np.int64)
  return Genres(movie_ids=np.asarray(ids, np.int64), names=names, multi_hot=hot,
                primary=primary, source=str(p))


def parse_movielens_100k_genres(path: PathLike) -> Genres:
  """Parses MovieLens 100K ``u.item``: ``id|title|date|video date|url|f_0|...|f_{G-1}``.

  ``f_g`` are 0/1 genre flags in the order of ``u.genre`` (``name|index`` lines) beside the
  file; without a ``u.genre`` the 19 genres of the ML-100K README are used. A movie's
  primary genre is its first flagged genre (in ``u.genre`` order).

  Args:
    path: the ``u.item`` file, or the ``ml-100k`` directory holding it.

  Returns:
    The :class:`Genres`.

  Raises:
    ValueError: a line with the wrong number of ``|`` fields, a bad or repeated movie id, a
      flag other than 0/1, or no flag set, naming the file and line; a malformed ``u.genre``.
  """
  p = _resolve(path, "u.item")
  names = _ML100K_GENRES
  gfile = p.with_name("u.genre")
  if gfile.is_file():
    pairs = [ln.split("|") for ln in gfile.read_bytes().decode("latin-1").splitlines()
             if ln.strip()]
    if any(len(x) != 2 or x[1].strip() != str(i) for i, x in enumerate(pairs)):
      raise ValueError(f"{gfile}: expected lines 'name|index' with indices 0, 1, 2, ...")
    names = tuple(x[0].strip() for x in pairs)
  G = len(names)
  layout = f"id|title|release date|video date|url|{G} genre flags"
  ids, rows = [], []
  for n, mid, parts in _movie_lines(p, "|", 5 + G, layout):
    flags = [f.strip() for f in parts[5:]]
    if any(f not in ("0", "1") for f in flags):
      raise ValueError(f"{p}: line {n}: genre flags must be 0 or 1 (expected '{layout}'): "
                       f"{_show('|'.join(parts))}")
    if "1" not in flags:
      raise ValueError(f"{p}: line {n}: movie {mid} has no genre flag set")
    ids.append(mid)
    rows.append([f == "1" for f in flags])
  hot = np.asarray(rows, bool)
  return Genres(movie_ids=np.asarray(ids, np.int64), names=names, multi_hot=hot,
                primary=np.argmax(hot, axis=1).astype(np.int64), source=str(p))


_ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
                  "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
                  "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")


def load_genres(path: PathLike) -> Genres:
  """Genres from ``movies.dat`` (ML-1M) or ``u.item`` (ML-100K), chosen by the file name.

  Args:
    path: the genre file, or a directory holding one of them.

  Raises:
    ValueError: any other file name, or a malformed file (see the two parsers).
    FileNotFoundError: no such file.
  """
  p = genre_file(path)
  if p.name == "u.item":
    return parse_movielens_100k_genres(p)
  if p.name.endswith(".dat"):
    return parse_movielens_genres(p)
  raise ValueError(f"{p}: unknown genre file; expected MovieLens 'movies.dat' "
                   "(movie_id::title::genres) or ML-100K 'u.item'")
