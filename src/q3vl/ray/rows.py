"""Dataset rows -> runtime items: the column mapping, column values and stable row ids.

Nothing here imports Ray: a batch is a `pyarrow.Table` (what `map_batches(..., batch_format="pyarrow")`
hands a callable), so the mapping is unit-testable without a cluster and keeps null (absent) apart
from NaN (a bad value that must become that row's error, never a silent default).

Column mapping (`ColumnMap`): `text`, `image` and `video` each read one or more columns (an item may
carry several texts or images); every option key of the item model (`instruction`, `fps`,
`max_frames`, `min_pixels`, `max_pixels`, `total_pixels`, `video_budget`: `q3vl.preprocess.items.KEYS`)
reads one
column, by default the column of the same name. A value can be:

- text: a string (or a list of strings);
- image: a path or URL string, encoded bytes, an H x W x 3 uint8 array (a Ray tensor column), or a
  list of those (several images);
- video: a path or URL string, or a list of frames (paths, bytes or arrays) = one video;
- an option: its item value; a numeric option may also be a numeric string (CSV).

A null is "not given". This module only turns Arrow values into Python values; keys, values, paths
(`~`, relative to `base_dir`, the input file's directory) and error texts are the item adapter's
(`q3vl.preprocess.adapter`), the same as `q3vl embed` applies to a JSONL line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from q3vl.errors import ConfigError, InputError
from q3vl.preprocess import CONTENT_KEYS, KEY, OPTION_KEYS, parse_json, resolve_path, to_item

MULTI = CONTENT_KEYS
SINGLE = OPTION_KEYS
MAX_ID_CHARS = 512
HASHED_ALWAYS = ("text", "image", "video", "instruction", "fps", "max_frames")  # the keys of the first row ids


@dataclass(frozen=True, init=False)
class ColumnMap:
    """Which dataset columns feed which item key (see the module docstring for the accepted values).

    `ColumnMap(text=("caption",), fps=None)`: the content keys take column names (one or several),
    each option key one column name or None (not read); an option key not named reads the column of
    its own name. With `json`, that column holds one JSON object per row (a JSONL line) and the other
    names are looked up as keys of that object instead of as columns. A column a dataset lacks is
    skipped, so the default (every key read from the column of the same name) fits any subset of them.
    """

    text: tuple[str, ...]
    image: tuple[str, ...]
    video: tuple[str, ...]
    options: tuple[tuple[str, str | None], ...]  # (option key, column or None), in `SINGLE` order
    json: str | None

    def __init__(self, text: Iterable[str] | str = ("text",), image: Iterable[str] | str = ("image",),
                 video: Iterable[str] | str = ("video",), json: str | None = None,
                 options: Iterable[tuple[str, str | None]] = (), **columns: str | None) -> None:
        for key, value in (("text", text), ("image", image), ("video", video)):
            names = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"ColumnMap.{key} must be column names, not {value!r}")
            object.__setattr__(self, key, names)
        given = {**dict(options), **columns}
        unknown = sorted(set(given) - set(SINGLE))
        if unknown:
            raise ConfigError(f"ColumnMap got unknown keys {unknown}; the item keys are {[*MULTI, *SINGLE]}")
        for key, name in (*given.items(), ("json", json)):
            if name is not None and (not isinstance(name, str) or not name):
                raise ConfigError(f"ColumnMap.{key} must be a column name or None, not {name!r}")
        object.__setattr__(self, "options", tuple((k, given.get(k, k)) for k in SINGLE))
        object.__setattr__(self, "json", json)

    @classmethod
    def of(cls, value: ColumnMap | Mapping[str, Any] | None, default: ColumnMap) -> ColumnMap:
        """`value` as a mapping (a `ColumnMap`, or its fields as a dict, checked), or `default` when None."""
        if value is None:
            return default
        return value if isinstance(value, ColumnMap) else cls(**value)

    @classmethod
    def content_only(cls, **content: Iterable[str] | str) -> ColumnMap:
        """A mapping of content columns only: no option key is read (a document, a folder of media)."""
        return cls(**content, options=[(k, None) for k in SINGLE])  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> str | None:
        """`cmap.fps`: the column of an option key (None: not read)."""
        if name in SINGLE:
            return dict(self.__dict__.get("options", ())).get(name)
        raise AttributeError(f"'ColumnMap' object has no attribute {name!r}")

    def column(self, key: str) -> tuple[str, ...]:
        """The columns (or JSON keys) item key `key` reads."""
        if key in MULTI:
            return tuple(getattr(self, key))
        found = dict(self.options).get(key)
        return (found,) if found else ()

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
        values = {**base.as_dict(), **{k: tuple(v) for k, v in multi.items()}, **single}
        return cls(**values)

    def columns(self) -> list[str]:
        """Every column this mapping reads (the `json` column alone in JSON mode)."""
        if self.json:
            return [self.json, "line"]  # "line": the JSONL reader's line numbers, for errors
        return [c for _, c in self.pairs()]

    def pairs(self) -> list[tuple[str, str]]:
        """(item key, column or JSON key) pairs in a fixed order (the order row ids hash them in)."""
        return [(k, c) for k in (*MULTI, *SINGLE) for c in self.column(k)]

    def as_dict(self) -> dict[str, Any]:
        """The mapping as keyword arguments (`ColumnMap(**d)` restores it): the content keys, the first
        row ids' option keys and `json` always; a key added later only where it is not read from the
        column of its own name, so the settings an older output directory's manifest recorded still match.
        """
        later = {k: c for k, c in self.options if k not in HASHED_ALWAYS and c != k}
        first = {k: c for k, c in self.options if k in HASHED_ALWAYS}
        return {**{k: getattr(self, k) for k in MULTI}, **first, **later, "json": self.json}


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
    """A media reference as the item adapter resolves it (`~`, relative to `base_dir`; URLs kept)."""
    return resolve_path(value, base_dir)


def source(row: dict[str, Any], cmap: ColumnMap) -> dict[str, Any]:
    """Where a row's mapped values live: the row itself, or its parsed JSON object in JSON mode
    (a bad line's error names its line number when the row carries one).
    """
    if not cmap.json:
        return row
    line = row.get(cmap.json)
    if not isinstance(line, str):
        raise InputError(f"column {cmap.json!r} must hold a JSON object per row, not {type(line).__name__}")
    return parse_json(line, f"line {row['line']}" if isinstance(row.get("line"), int) else "JSON line")


def item_of(row: dict[str, Any], cmap: ColumnMap, base_dir: str | None = None) -> dict[str, Any]:
    """The `Embedder.process` item of one row (on a reranker's query side: with the request's options);
    any unusable value raises that row's `InputError`, in the item adapter's words.
    """
    src = source(row, cmap)
    fields: dict[str, Any] = {}
    for key in (*MULTI, *SINGLE):
        if cmap.json:  # a JSON line: its values as `q3vl embed` reads them
            values = [src[c] for c in cmap.column(key) if src.get(c) is not None]
        else:
            values = [_value(src[c], key, c) for c in cmap.column(key) if src.get(c) is not None]
            if key != "video":  # several columns (or a list in one) of texts or images: one list
                values = [x for v in values for x in (v if isinstance(v, list) else [v])]
        if values:
            fields[key] = values[0] if len(values) == 1 else values
    if not any(k in fields for k in MULTI):
        used = [c for k, c in cmap.pairs() if k in MULTI]
        raise InputError(f"row has no text, image or video (looked in {used})")
    return to_item(fields, "embed", base=base_dir)


def image_limits(row: dict[str, Any], cmap: ColumnMap) -> dict[str, int] | None:
    """The `min_pixels` / `max_pixels` a row sets itself (for resizing its images as the embedder
    will), or None when they are unusable (the embedding stage reports that row's error).
    """
    out: dict[str, int] = {}
    for key in ("min_pixels", "max_pixels"):
        for column in cmap.column(key):
            if row.get(column) is not None:
                try:
                    out[key] = _value(row[column], key, column)
                except InputError:
                    return None
    return out


def _value(value: Any, key: str, column: str) -> Any:
    """One column's value as a Python item value, checked by its item key (an error names the column)."""
    try:
        value = _python(value, key)
        KEY[key].check(value)
        return value
    except InputError as e:
        raise InputError(f"column {column!r}: {e.reason}") from None


def _python(value: Any, key: str) -> Any:
    """Arrow/numpy values as the item model takes them: tensors of frames as frame lists, numpy
    scalars as Python numbers, numeric strings (CSV cells) of numeric options as numbers.
    """
    if isinstance(value, Unusable):
        raise InputError(value.reason)
    if isinstance(value, np.generic):
        return value.item()
    if key == "video" and isinstance(value, np.ndarray) and (value.dtype == object or value.ndim == 4):
        value = list(value)  # frames, or a T x H x W x 3 stack
    if isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, Unusable):
                raise InputError(v.reason)
        return list(value) if key == "video" else [v for v in value if v is not None]
    if isinstance(value, str) and key in SINGLE and KEY[key].kind in (int, float):
        return _number(value)
    return value


def _number(value: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise InputError(f"{value[:40]!r} is not a number") from None


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
        if key not in HASHED_ALWAYS and src.get(column) is None:
            continue  # a key added later is hashed only where set: existing rows keep their ids
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
    except InputError as e:  # an unreadable JSON line: that is its error (naming the line), not its id
        return content_id(row, cmap, prior_error), e.reason
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value)), ""
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
        return value, ""
    what = "null" if value is None else f"a {len(value)}-character string" if isinstance(value, str) \
        else f"a {type(value).__name__}"
    error = (f"id column {id_column!r} is {what}; ids must be integers or strings of 1..{MAX_ID_CHARS} characters "
             "(this row is keyed by its content hash)")
    return content_id(row, cmap, prior_error), error
