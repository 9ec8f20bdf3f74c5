"""`q3vl embed-dataset`: a corpus into resumable Parquet shards on Ray Data (`q3vl.ray.job`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from q3vl.cli import command


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="Parquet file, JSONL, CSV, or a folder of images/videos (recursive)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (shards + manifest)")
    p.add_argument("--bundle", type=Path, required=True, help="embedding bundle (readable by every worker)")
    p.add_argument("--address", help="join this Ray cluster (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--workers", type=int, default=1, help="embedding actors")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (> 0: backend cuda)")
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs each actor reserves, and the CPU backend's threads (default: reserve 1, use all cores)")
    p.add_argument("--decode-workers", type=int, default=0,
                   help="CPU actors that decode and resize images before the embedding actors (default: none; "
                        "the embedding actors' loader threads decode)")
    p.add_argument("--backend", help="cpu | cuda | tensorrt-ep | tensorrt (default: cuda with GPUs, else cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="items per model micro-batch")
    p.add_argument("--rows-per-call", type=int, help="rows per actor call (default: 4 x batch size)")
    p.add_argument("--rows-per-shard", type=int, default=10_000, help="rows per output Parquet shard")
    p.add_argument("--dim", type=int, help="Matryoshka dimension (truncate + renormalise)")
    p.add_argument("--codes", default="", help="comma-separated code columns: int8,uint8,binary,ubinary")
    p.add_argument("--calibration", type=Path, help="calibration file for int8/uint8 codes (q3vl calibrate)")
    p.add_argument("--id-column", help="column (JSONL: key) holding row ids (default: 'id' if present, else a "
                                       "hash of the row's content; folders: the relative path)")
    p.add_argument("--input-format", default="auto", choices=["auto", "parquet", "jsonl", "csv", "folder"])
    p.add_argument("--column", action="append", default=[], metavar="KEY=COLUMN",
                   help="map an item key (text, image, video, instruction, fps, max_frames, video_budget) to a "
                        "column; "
                        "repeat a key to read several columns")
    p.add_argument("--max-pixels", type=int, help="per-image pixel budget (the wrapper's max_pixels)")
    p.add_argument("--max-frames", type=int, help="frames per video (the wrapper's max_frames)")
    p.add_argument("--fps", type=float, help="video sampling rate (the wrapper's fps)")
    p.add_argument("--video-budget", choices=["off", "fit"],
                   help="fit: shrink video files whose prompt exceeds max_length (default off; a row's "
                        "video_budget column overrides it)")
    p.add_argument("--no-progress", action="store_true", help="no bar; a progress line every 10 s in the log")


@command("embed-dataset", _args)
def _embed_dataset(a: argparse.Namespace) -> int:
    """Embed a corpus on Ray Data into resumable, exactly-once Parquet shards."""
    from q3vl.checks import bundle_for, check_dim, require

    require("ray")
    check_dim(a.dim, bundle_for(a.bundle, "embedding"), a.bundle)
    from q3vl.ray.job import embed_corpus
    from q3vl.ray.rows import ColumnMap

    model = {k: v for k, v in (("max_pixels", a.max_pixels), ("max_frames", a.max_frames), ("fps", a.fps),
                               ("video_budget", a.video_budget)) if v is not None}
    run = embed_corpus(a.input, a.output, a.bundle, input_format=a.input_format,
                       columns=ColumnMap.parse(a.column) if a.column else None, id_column=a.id_column, dim=a.dim,
                       codes=[c for c in a.codes.split(",") if c], calibration=a.calibration, workers=a.workers,
                       gpus_per_worker=a.gpus_per_worker, cpus_per_worker=a.cpus_per_worker,
                       rows_per_call=a.rows_per_call, rows_per_shard=a.rows_per_shard, backend=a.backend,
                       address=a.address, num_cpus=a.num_cpus, progress=False if a.no_progress else None,
                       decode_workers=a.decode_workers, batch_size=a.batch_size, **model)
    total = run["already_written"] + run["rows"]
    sys.stdout.write(f"embedded {run['rows']} rows ({run['errors']} with errors, {run['duplicates']} duplicate or "
                     f"already-written rows dropped) into {run['shards']} shards in {run['seconds']} s "
                     f"({run['rows_per_s']} rows/s; Ray start {run['ray_init_s']} s); {a.output} holds {total} rows\n")
    return 0
