"""`DatasetOptions`: how `embed-dataset` reads, embeds and writes a corpus, declared once.

`embed_corpus` takes these whole (`job=`) beside the runtime's `RuntimeOptions` (`options=`), or
keyword arguments named like either's fields; the `q3vl embed-dataset` flags are made from both.
The media options (`MediaOptions`) are the server's flags with a trusted corpus's defaults: local
files are read wherever the job can read them, `data:` URIs and public http(s) URLs too (loopback,
private and link-local addresses refused). For a corpus you do not trust, pass `--media-root DIR`
(local paths and `file://` only under DIR), `--allowed-hosts` (only those hosts over http(s)) and
lower `--max-media-bytes` / `--media-deadline`.

Fields marked `numbers` (with the runtime's) are what a resumed job must repeat: the output directory
records them and a run with other values is refused (`q3vl.ray.job.settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from q3vl.errors import ConfigError
from q3vl.options import check_fields, opt
from q3vl.preprocess import MediaOptions
from q3vl.ray.rows import ColumnMap

INPUT, OUTPUT, CLUSTER = "input", "output", "cluster"
FORMATS = ("auto", "parquet", "jsonl", "csv", "folder")
CODES = ("int8", "uint8", "binary", "ubinary")


def _codes(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


@dataclass(frozen=True)
class DatasetOptions(MediaOptions):
    """The job's own options (see the module docstring); checked at construction (`ConfigError`)."""

    FLAG_GROUPS: ClassVar[tuple[str, ...]] = (INPUT, OUTPUT, CLUSTER, MediaOptions.GROUP)

    input_format: str = opt("auto", "input format (auto: from the suffix; a directory is a folder)", choices=FORMATS,
                            group=INPUT)
    columns: ColumnMap | None = opt(None, "map an item key (text, image, video, or an option: instruction, fps, "
                                          "max_frames, min_pixels, max_pixels, total_pixels) to a column; repeat "
                                          "text/image/video to read several columns (default: each key from the "
                                          "column of its name)", flag="--column", metavar="KEY=COLUMN",
                                    append=True, parse=ColumnMap.parse, numbers=True, group=INPUT)
    id_column: str | None = opt(None, "column (JSONL: key) holding row ids (default: 'id' if present, else a hash of "
                                      "the row's content; folders: the relative path)", numbers=True, group=INPUT)
    dim: int | None = opt(None, "Matryoshka dimension (truncate + renormalise)", numbers=True, low=1, group=OUTPUT)
    normalize: bool = opt(True, "return the raw pooled state, not L2-normalised vectors", flag="--no-normalize",
                          numbers=True, group=OUTPUT)
    codes: tuple[str, ...] = opt((), "comma-separated code columns: int8,uint8,binary,ubinary", parse=_codes,
                                 numbers=True, group=OUTPUT)
    calibration: Path | None = opt(None, "calibration file for int8/uint8 codes (q3vl calibrate)", numbers=True,
                                   group=OUTPUT)
    rows_per_shard: int = opt(10_000, "rows per output Parquet shard", low=1, group=OUTPUT)
    progress: bool | None = opt(None, "no bar; a progress line every 10 s in the log (default: a bar on a terminal)",
                                flag="--no-progress", group=OUTPUT)
    workers: int = opt(1, "embedding actors", low=1, group=CLUSTER)
    gpus_per_worker: float = opt(0.0, "GPUs per actor (> 0: backend cuda unless --backend says otherwise)", low=0,
                                 group=CLUSTER)
    cpus_per_worker: float | None = opt(None, "CPUs each actor reserves, and the CPU backend's threads (default: "
                                              "reserve 1, use all cores)", above=0, group=CLUSTER)
    decode_workers: int = opt(0, "CPU actors that decode and resize images before the embedding actors (default: "
                                 "none; the embedding actors' loader threads decode)", low=0, group=CLUSTER)
    rows_per_call: int | None = opt(None, "rows per actor call (default: 4 x the batch size)", low=1, group=CLUSTER)
    address: str | None = opt(None, "join this Ray cluster (default: start a local Ray)", group=CLUSTER)
    num_cpus: int | None = opt(None, "CPUs of the local Ray (default: all)", low=1, group=CLUSTER)

    def __post_init__(self) -> None:
        check_fields(self)
        MediaOptions.__post_init__(self)
        unknown = sorted(set(self.codes) - set(CODES))
        if unknown:
            raise ConfigError(f"unknown code precisions {unknown}; choose from {list(CODES)}")


__all__ = ["CODES", "FORMATS", "DatasetOptions"]
