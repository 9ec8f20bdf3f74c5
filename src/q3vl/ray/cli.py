"""`q3vl embed-dataset`: a corpus into resumable Parquet shards on Ray Data (`q3vl.ray.job`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from q3vl.cli import command


def _args(p: argparse.ArgumentParser) -> None:
    from q3vl.options import add_flags
    from q3vl.ray.options import DatasetOptions
    from q3vl.runtime import RuntimeOptions

    p.add_argument("input", type=Path, help="Parquet file, JSONL, CSV, or a folder of images/videos (recursive)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (shards + manifest)")
    p.add_argument("--bundle", type=Path, required=True, help="embedding bundle (readable by every worker)")
    add_flags(p, DatasetOptions())  # input, output, cluster and media-policy options
    add_flags(p, RuntimeOptions())  # what every worker's Embedder is built with
    p.epilog = MEDIA_NOTE


MEDIA_NOTE = ("media: by default local files are read wherever the job can read them, and data: URIs and public "
              "http(s) URLs too (loopback, private and link-local addresses are refused). For a corpus you do not "
              "trust, pass --media-root DIR (local files only under DIR), --allowed-hosts (only those hosts) and "
              "lower --max-media-bytes / --media-deadline.")


@command("embed-dataset", _args)
def _embed_dataset(a: argparse.Namespace) -> int:
    """Embed a corpus on Ray Data into resumable, exactly-once Parquet shards."""
    from q3vl.checks import bundle_for, check_dim, require
    from q3vl.options import from_args
    from q3vl.ray.options import DatasetOptions
    from q3vl.runtime import RuntimeOptions

    require("ray")
    job, options = from_args(a, DatasetOptions()), from_args(a, RuntimeOptions())  # checked before Ray starts
    check_dim(job.dim, bundle_for(a.bundle, "embedding"), a.bundle)
    from q3vl.ray.job import embed_corpus

    run = embed_corpus(a.input, a.output, a.bundle, job, options)
    total = run["already_written"] + run["rows"]
    sys.stdout.write(f"embedded {run['rows']} rows ({run['errors']} with errors, {run['duplicates']} duplicate or "
                     f"already-written rows dropped) into {run['shards']} shards in {run['seconds']} s "
                     f"({run['rows_per_s']} rows/s; Ray start {run['ray_init_s']} s); {a.output} holds {total} rows\n")
    return 0
