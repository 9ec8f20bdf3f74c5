"""Inputs of `q3vl embed-dataset`: Parquet, JSONL, CSV or a folder of images and videos, as a Ray Dataset.

Parquet is read by Ray's own reader on the workers (it may hold media bytes and arrays). JSONL, CSV
and folder listings hold paths and text, so the driver reads them, in chunks it puts into Ray's
object store as Arrow tables: that lets it keep every line, including the ones a columnar reader
would reject for the whole file (invalid UTF-8, a bad JSON line, a CSV row with the wrong number of
fields, a line over `MAX_LINE_BYTES`) as a row carrying its error and its line number.

Relative paths in the data resolve against the input file's directory (a folder input: the folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from q3vl.errors import ConfigError, InputError
from q3vl.ray.rows import ColumnMap

FORMATS = ("auto", "parquet", "jsonl", "csv", "folder")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tiff", ".tif"}
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts"}
MAX_LINE_BYTES = 64 << 20
CHUNK_ROWS = 8192


@dataclass
class Source:
    """An opened input: the dataset, how its rows map to items, and what is known before reading it."""

    dataset: Any
    path: Path
    format: str
    base_dir: str
    columns: ColumnMap
    id_column: str | None
    names: list[str]  # the dataset's columns
    total: int | None  # rows, when known without a pass over the data
    skipped_files: int = 0  # folder: files without an image or video extension


def detect(path: Path, fmt: str) -> str:
    """The input format: explicit, or from the suffix (a directory is a folder of media)."""
    if fmt not in FORMATS:
        raise ConfigError(f"input format must be one of {list(FORMATS)}, not {fmt!r}")
    if not path.exists():
        raise ConfigError(f"input {path} does not exist")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    by_suffix = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
    if suffix not in by_suffix:
        raise ConfigError(f"cannot tell the format of {path} from its suffix; pass --input-format")
    return by_suffix[suffix]


def open_input(path: str | Path, fmt: str = "auto", columns: ColumnMap | None = None,
               id_column: str | None = None) -> Source:
    """The input as a Ray Dataset with its column mapping, id column and base directory."""
    path = Path(path).resolve()
    fmt = detect(path, fmt)
    base = str(path if path.is_dir() else path.parent)
    if fmt == "folder":
        if columns is not None:
            raise ConfigError("a folder input has fixed columns (path, image, video); drop the column mapping")
        cmap = ColumnMap.content_only(text=())
        tables, total, skipped = _folder_tables(path)
        return Source(_from_tables(tables), path, fmt, base, cmap, id_column or "path", ["path", "image", "video"],
                      total, skipped)
    cmap = columns or ColumnMap()
    if fmt == "parquet":
        import ray

        ds = ray.data.read_parquet(str(path), num_cpus=0.25)  # beside actors that may hold every CPU
        names = list(ds.schema().names)
        return Source(ds, path, fmt, base, cmap, _default_id(id_column, names), names, ds.count())
    if fmt == "jsonl":
        tables, total, first_keys = _jsonl_tables(path)
        cmap = replace(cmap, json="json")
        return Source(_from_tables(tables), path, fmt, base, cmap, _default_id(id_column, first_keys),
                      ["json", "line", "error"], total)
    tables, total, names = _csv_tables(path)
    return Source(_from_tables(tables), path, fmt, base, cmap, _default_id(id_column, names), names, total)


def _default_id(id_column: str | None, names: list[str]) -> str | None:
    return id_column if id_column is not None else "id" if "id" in names else None


def _from_tables(tables: list[Any]) -> Any:
    import ray

    refs: list[Any] = [ray.put(t) for t in tables]
    return ray.data.from_arrow_refs(refs) if refs else ray.data.from_items([])


# ---------------------------------------------------------------- folder
def list_media(root: Path) -> tuple[list[tuple[str, str]], int]:
    """(relative posix path, "image" | "video") of every file under `root` with a media extension,
    sorted (a stable order for every run), and the number of other files. Symlinks to directories
    are not followed (no cycles); anything that is not a directory is listed, so a broken link or
    an unreadable file becomes a row with its error rather than vanishing.
    """
    found: list[tuple[str, str]] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=None, followlinks=False):
        dirnames.sort()
        for name in filenames:
            ext = os.path.splitext(name)[1].lower()
            kind = "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None
            if kind is None:
                skipped += 1
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            found.append((rel, kind))
    found.sort()
    return found, skipped


def _folder_tables(root: Path) -> tuple[list[Any], int, int]:
    import pyarrow as pa

    files, skipped = list_media(root)
    tables = []
    for start in range(0, len(files), CHUNK_ROWS):
        chunk = files[start:start + CHUNK_ROWS]
        tables.append(pa.table({"path": [p for p, _ in chunk],
                                "image": pa.array([p if k == "image" else None for p, k in chunk], pa.string()),
                                "video": pa.array([p if k == "video" else None for p, k in chunk], pa.string())}))
    return tables, len(files), skipped


# ---------------------------------------------------------------- JSONL
def jsonl_lines(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, text, error) of every non-blank line; invalid UTF-8 and over-long lines become
    errors (the line's text is then what could be decoded, or empty) instead of stopping the read.
    """
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield number, "", f"line {number} is longer than {MAX_LINE_BYTES >> 20} MiB"
                continue
            if not raw.strip():
                continue
            try:
                yield number, raw.decode("utf-8").strip(), ""
            except UnicodeDecodeError as e:
                yield number, raw.decode("utf-8", "replace").strip(), f"line {number} is not valid UTF-8 ({e.reason})"


def _jsonl_tables(path: Path) -> tuple[list[Any], int, list[str]]:
    import json

    import pyarrow as pa

    tables: list[Any] = []
    buf: list[tuple[int, str, str]] = []
    first_keys: list[str] | None = None
    total = 0

    def flush() -> None:
        tables.append(pa.table({"json": pa.array([t for _, t, _ in buf], pa.string()),
                                "line": pa.array([n for n, _, _ in buf], pa.int64()),
                                "error": pa.array([e for _, _, e in buf], pa.string())}))
        buf.clear()

    for entry in jsonl_lines(path):
        if first_keys is None and not entry[2]:
            try:
                obj = json.loads(entry[1])
                first_keys = list(obj) if isinstance(obj, dict) else []
            except json.JSONDecodeError:
                pass
        buf.append(entry)
        total += 1
        if len(buf) >= CHUNK_ROWS:
            flush()
    if buf:
        flush()
    if not total:
        raise InputError(f"{path} holds no lines")
    return tables, total, first_keys or []


# ---------------------------------------------------------------- CSV
def _csv_header(path: Path) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), None)
    if not header or len(set(header)) != len(header) or not all(header):
        raise InputError(f"{path}: the first line must be a header of distinct, non-empty column names, not {header}")
    return header


def _csv_tables(path: Path) -> tuple[list[Any], int, list[str]]:
    """Every CSV cell as a string (numbers are parsed per row, so one bad cell is one bad row); a
    row with the wrong number of fields becomes an error row naming its line, not a failed read.
    """
    import pyarrow as pa
    from pyarrow import csv

    header = _csv_header(path)
    bad: list[Any] = []

    def invalid(row: Any) -> str:
        bad.append(row)
        return "skip"

    reader = csv.open_csv(path, read_options=csv.ReadOptions(block_size=MAX_LINE_BYTES),
                          parse_options=csv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid),
                          convert_options=csv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()),
                                                             null_values=[""], strings_can_be_null=True))
    tables = [pa.Table.from_batches([b]) for b in reader]
    total = sum(t.num_rows for t in tables)
    if "error" in header:
        raise ConfigError(f"{path} has a column named 'error', which embed-dataset writes; rename it")
    tables = [t.append_column("error", pa.array([""] * t.num_rows, pa.string())) for t in tables]
    if bad:  # no line numbers with newlines_in_values: the row's text tells the user which one
        errors = [f"CSV row with {r.actual_columns} fields, the header has {r.expected_columns}: {r.text[:200]!r}"
                  for r in bad]
        cols: dict[str, Any] = {n: pa.array([None] * len(bad), pa.string()) for n in header}
        cols["error"] = pa.array(errors, pa.string())
        tables.append(pa.table(cols))
        total += len(bad)
    return tables, total, [*header, "error"]
