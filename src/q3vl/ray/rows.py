"""Dataset rows -> runtime items: the column mapping, column values, relative paths and stable row ids.

Nothing here imports Ray: a batch is a `pyarrow.Table` (what `map_batches(..., batch_format="pyarrow")`
hands a callable), so the mapping is unit-testable without a cluster and keeps null (absent) apart
from NaN (a bad value that must become that row's error, never a silent default).

Column mapping (`ColumnMap`): `text`, `image` and `video` each read one or more columns (an item may
carry several texts or images); `instruction`, `fps`, `max_frames` and `video_budget` read one
column each. A value can be:

- text: a string (or a list of strings);
- image: a path or URL string, encoded bytes, an H x W x 3 uint8 array (a Ray tensor column), or a
  list of those (several images);
- video: a path or URL string, or a list of frames (paths, bytes or arrays) = one video;
- fps / max_frames: a number, or a numeric string (CSV);
- video_budget: "off" or "fit" (docs/reference-behaviour.md#video-budget).

A null is "not given". A relative path resolves against `base_dir` (the input file's directory), so a
corpus can be moved as a whole; URLs (`scheme://`), `data:` URIs and absolute paths are left as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from q3vl.errors import ConfigError, InputError

MULTI = ("text", "image", "video")
SINGLE = ("instruction", "fps", "max_frames", "video_budget")
LATER = {"video_budget": "video_budget"}  # keys added after row ids and manifests existed, with their defaults
MAX_ID_CHARS = 512
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ColumnMap:
    """Which dataset columns feed which item key (see the module docstring for the accepted values).

    With `json`, that column holds one JSON object per row (a JSONL line) and the other names are
    looked up as keys of that object instead of as columns. A column a dataset lacks is skipped, so the
    default (every key read from the column of the same name) fits any subset of them.
    """

    text: tuple[str, ...] = ("text",)
    image: tuple[str, ...] = ("image",)
    video: tuple[str, ...] = ("video",)
    instruction: str | None = "instruction"
    fps: str | None = "fps"
    max_frames: str | None = "max_frames"
    video_budget: str | None = "video_budget"
    json: str | None = None

    def __post_init__(self) -> None:
        for key in MULTI:
            value = getattr(self, key)
            names = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"ColumnMap.{key} must be column names, not {value!r}")
            object.__setattr__(self, key, names)
        for key in (*SINGLE, "json"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"ColumnMap.{key} must be a column name or None, not {value!r}")

    @classmethod
    def parse(cls, specs: Iterable[str], base: ColumnMap | None = None) -> ColumnMap:
        """From CLI `KEY=COLUMN` strings: a repeated text/image/video key adds columns (the first one
        replaces the default), `KEY=` maps an option key to no column.
        """
        base = base or cls()
        multi: dict[str, list[str]] = {}
        single: dict[str, str | None] = {}
        allowed = (*MULTI, *SINGLE, "json")
        for spec in specs:
            key, sep, column = spec.partition("=")
            if not sep or key not in allowed:
                raise ConfigError(f"column mapping {spec!r} must be KEY=COLUMN with KEY one of {list(allowed)}")
            if key in MULTI:
                if not column:
                    raise ConfigError(f"column mapping {spec!r} names no column")
                multi.setdefault(key, []).append(column)
            else:
                single[key] = column or None
        changes: dict[str, Any] = {**{k: tuple(v) for k, v in multi.items()}, **single}
        return replace(base, **changes)

    def columns(self) -> list[str]:
        """Every column this mapping reads (the `json` column alone in JSON mode)."""
        if self.json:
            return [self.json]
        return [*self.text, *self.image, *self.video, *[c for c in (getattr(self, k) for k in SINGLE) if c]]

    def pairs(self) -> list[tuple[str, str]]:
        """(item key, column or JSON key) pairs in a fixed order (the order row ids hash them in)."""
        out = [(k, c) for k in MULTI for c in getattr(self, k)]
        return out + [(k, getattr(self, k)) for k in SINGLE if getattr(self, k)]

    def as_dict(self) -> dict[str, Any]:
        """The mapping as a dict; a later key at its default is left out, so the settings recorded in an
        existing output directory's manifest still match (`ColumnMap(**d)` restores the default).
        """
        return {f.name: getattr(self, f.name) for f in fields(self)
                if LATER.get(f.name, "") != getattr(self, f.name)}


# ---------------------------------------------------------------- pyarrow columns -> Python values
@dataclass(frozen=True)
class Unusable:
    """A cell that could not be turned into a value (ragged pixel lists): that row's error, later."""

    reason: str


def column_values(column: Any) -> list[Any]:
    """One Python value per row: str, bytes, int, float (NaN kept), list, or None for null; an
    ndarray for a Ray tensor column (what Ray Data writes for arrays; no nulls) and for a nested-list
    pixel column `list<list<list<uint8>>>` (plain, nullable Arrow, for Parquet with arrays on some rows).
    """
    import pyarrow as pa

    if isinstance(column.type, pa.ExtensionType) and hasattr(column.type, "ndim"):  # Ray tensor types
        arrays = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        return [x for chunk in arrays for x in chunk.to_numpy()]
    t = column.type
    if pa.types.is_list(t) and pa.types.is_list(t.value_type) and pa.types.is_list(t.value_type.value_type) \
            and pa.types.is_integer(t.value_type.value_type.value_type):
        dtype = t.value_type.value_type.value_type.to_pandas_dtype()
        return [None if v is None else _pixels(v, dtype) for v in column.to_pylist()]
    return list(column.to_pylist())


def _pixels(rows: list[Any], dtype: Any) -> np.ndarray | Unusable:
    try:
        return np.asarray(rows, dtype)
    except (ValueError, TypeError) as e:
        return Unusable(f"pixel lists do not form an H x W x C array ({str(e)[:120]})")


def table_rows(table: Any, names: Sequence[str]) -> list[dict[str, Any]]:
    """The given columns of a `pyarrow.Table` as one dict per row (columns it lacks are left out)."""
    present = [n for n in dict.fromkeys(names) if n in table.column_names]
    values = {n: column_values(table.column(n)) for n in present}
    return [{n: values[n][i] for n in present} for i in range(table.num_rows)]


# ---------------------------------------------------------------- row -> item
def resolve(value: str, base_dir: str | None) -> str:
    """A relative path joined to `base_dir`; URLs, `data:` URIs and absolute paths unchanged."""
    if base_dir is None or not value or value.startswith("data:") or _SCHEME.match(value) or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base_dir, value))


def source(row: dict[str, Any], cmap: ColumnMap) -> dict[str, Any]:
    """Where a row's mapped values live: the row itself, or its parsed JSON object in JSON mode."""
    if not cmap.json:
        return row
    line = row.get(cmap.json)
    if not isinstance(line, str):
        raise InputError(f"column {cmap.json!r} must hold a JSON object per row, not {type(line).__name__}")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg}, character {e.pos}): {line[:80]!r}") from None
    if not isinstance(obj, dict):
        raise InputError(f"a JSON line must be an object, not {type(obj).__name__}")
    return obj


def item_of(row: dict[str, Any], cmap: ColumnMap, base_dir: str | None = None) -> dict[str, Any]:
    """The `Embedder.process` item of one row; any unusable value raises that row's `InputError`."""
    src = source(row, cmap)
    item: dict[str, Any] = {}
    texts = [t for c in cmap.text for t in _each(src.get(c), c, _text)]
    images = [x for c in cmap.image for x in _each(src.get(c), c, lambda v, c: _media(v, c, base_dir))]
    videos = [_video(src[c], c, base_dir) for c in cmap.video if src.get(c) is not None]
    if not (texts or images or videos):
        used = [c for k, c in cmap.pairs() if k in MULTI]
        raise InputError(f"row has no text, image or video (looked in {used})")
    for key, values in (("text", texts), ("image", images)):
        if values:
            item[key] = values[0] if len(values) == 1 else values
    if videos:
        item["video"] = videos[0] if len(videos) == 1 else videos
    if cmap.instruction and src.get(cmap.instruction) is not None:
        item["instruction"] = _text(src[cmap.instruction], cmap.instruction)
    for key in ("fps", "max_frames"):
        column = getattr(cmap, key)
        if column and src.get(column) is not None:
            item[key] = _number(src[column], column)
    if cmap.video_budget and src.get(cmap.video_budget) is not None:
        item["video_budget"] = _text(src[cmap.video_budget], cmap.video_budget)
    return item


def _each(value: Any, column: str, convert: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [convert(v, column) for v in value if v is not None]
    return [convert(value, column)]


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"column {column!r}: expected a string, not {type(value).__name__}")
    return value


def _media(value: Any, column: str, base_dir: str | None) -> Any:
    if isinstance(value, str):
        return resolve(value, base_dir)
    if isinstance(value, (bytes, np.ndarray)):
        return value
    if isinstance(value, Unusable):
        raise InputError(f"column {column!r}: {value.reason}")
    raise InputError(f"column {column!r}: expected a path, URL, bytes or an image array, not {type(value).__name__}")


def _video(value: Any, column: str, base_dir: str | None) -> Any:
    if isinstance(value, str):
        return resolve(value, base_dir)
    if isinstance(value, np.ndarray) and (value.dtype == object or value.ndim == 4):  # frames, or a T x H x W x 3 stack
        value = list(value)
    if isinstance(value, (list, tuple)):
        frames = [_media(f, column, base_dir) for f in value]
        if not frames:
            raise InputError(f"column {column!r}: a frame list must not be empty")
        return frames
    raise InputError(f"column {column!r}: a video is a path/URL or a list of frames, not {type(value).__name__}")


def _number(value: Any, column: str) -> int | float:
    if isinstance(value, str):  # CSV cells
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                raise InputError(f"column {column!r}: {value[:40]!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"column {column!r}: expected a number, not {type(value).__name__}")
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------- stable row ids
def content_id(row: dict[str, Any], cmap: ColumnMap, prior_error: str = "") -> str:
    """A 128-bit hash (32 hex digits) of the row's mapped values as given (paths as strings, not the
    files' bytes): the same row gets the same id in every run, wherever the corpus is moved. A row a
    reader already failed (`prior_error`, which names its line) hashes that too, so two different
    unreadable lines do not collapse into one id.
    """
    h = hashlib.blake2b(digest_size=16)
    if prior_error:
        _feed(h, prior_error)
    try:
        src = source(row, cmap)
    except InputError:
        src = None
    if src is None:  # an unparsable JSON line: hash the line itself
        _feed(h, row.get(cmap.json or ""))
        return h.hexdigest()
    for key, column in cmap.pairs():
        if key in LATER and src.get(column) is None:
            continue  # rows without the later keys keep the ids they had before those keys existed
        h.update(key.encode() + b"\0" + column.encode("utf-8", "surrogatepass") + b"\0")
        _feed(h, src.get(column))
    return h.hexdigest()


def _feed(h: Any, v: Any) -> None:
    """Type-tagged, length-prefixed bytes of `v`, so distinct values never hash alike by concatenation."""
    if v is None:
        h.update(b"N")
    elif isinstance(v, bool):
        h.update(b"B1" if v else b"B0")
    elif isinstance(v, (int, np.integer)):
        h.update(b"I" + str(int(v)).encode() + b";")
    elif isinstance(v, (float, np.floating)):
        h.update(b"F" + repr(float(v)).encode() + b";")
    elif isinstance(v, str):
        data = v.encode("utf-8", "surrogatepass")
        h.update(b"S%d:" % len(data) + data)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        h.update(b"Y%d:" % len(v) + bytes(v))
    elif isinstance(v, np.ndarray) and v.dtype != object:
        h.update(b"A" + v.dtype.str.encode() + repr(v.shape).encode() + b":" + np.ascontiguousarray(v).tobytes())
    elif isinstance(v, (list, tuple, np.ndarray)):
        h.update(b"L%d:" % len(v))
        for x in v:
            _feed(h, x)
    elif isinstance(v, dict):
        h.update(b"D%d:" % len(v))
        for k in sorted(v, key=str):
            _feed(h, str(k))
            _feed(h, v[k])
    else:
        _feed(h, f"<{type(v).__name__}>")


def row_id(row: dict[str, Any], cmap: ColumnMap, id_column: str | None, prior_error: str = "") -> tuple[str, str]:
    """(id, error) of a row: the id column's value (a non-empty string or an integer, as a string),
    else the content hash. A bad id value falls back to the content hash and returns an error, so the
    row is still written exactly once, with that error.
    """
    if id_column is None:
        return content_id(row, cmap, prior_error), ""
    try:
        value = source(row, cmap).get(id_column) if cmap.json else row.get(id_column)
    except InputError:
        value = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value)), ""
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
        return value, ""
    what = "null" if value is None else f"a {len(value)}-character string" if isinstance(value, str) \
        else f"a {type(value).__name__}"
    error = (f"id column {id_column!r} is {what}; ids must be integers or strings of 1..{MAX_ID_CHARS} characters "
             "(this row is keyed by its content hash)")
    return content_id(row, cmap, prior_error), error
