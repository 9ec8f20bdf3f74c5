"""`embed_corpus`: the whole resumable job, read -> ids -> (decode) -> embed -> exactly-once shards.

The driver builds a Ray Data pipeline (read, a cheap id stage that drops rows already written, the
optional CPU decode stage, the `EmbedBatch` actors), streams its output blocks and is the only writer
of the output directory (`store.py` explains why that makes a killed run's re-run exact).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from q3vl.errors import ConfigError, UnknownOptionError, missing_extra
from q3vl.options import numbers, of, option_fields, split
from q3vl.preprocess import MediaOptions
from q3vl.ray.options import DatasetOptions
from q3vl.ray.sources import Source, open_input
from q3vl.ray.store import IdSet, OutputDir, file_sha256, now, record_run
from q3vl.ray.udf import EMBEDDING, ERROR, ID, TOKENS, EmbedBatch, assign_ids, code_column
from q3vl.runtime import RuntimeOptions

log = logging.getLogger(__name__)
TASK_RETRIES = 3
LIGHT_CPUS = 0.25  # what the read and id stages reserve per task
DECODE_CPUS = 1.0  # what a decode actor reserves
TASK_CPUS = 1.0  # left free for tasks: Ray Data's repartition task reserves a whole CPU
CARRY_TYPES = ("string", "large_string", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
               "float", "double", "bool")


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise missing_extra("ray", "ray") from e
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[float]:
    """A Ray session for the job: the caller's if one is running (left running), else a local one
    (or the cluster at `address`) that is shut down on exit. Yields the seconds `ray.init` took.
    """
    ray = _ray()
    if ray.is_initialized():
        yield 0.0
        return
    start = time.perf_counter()
    ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield time.perf_counter() - start
    finally:
        ray.shutdown()


def quiet_ray_data() -> None:
    """Ray Data's own progress bars and per-operator log lines off: the job reports progress itself."""
    ray = _ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def settings(src: Source, bundle: Path, job: DatasetOptions, options: RuntimeOptions) -> dict[str, Any]:
    """What the output directory is bound to: the bundle (by hash), the input and the options that
    change the numbers (`numbers=True` in their declaration: not workers, batch sizes or the backend);
    the runtime's are recorded where they differ from their defaults.
    """
    recorded: dict[str, Any] = {}
    for name, value in numbers(job).items():
        if name == "calibration":
            recorded["calibration_sha256"] = file_sha256(value) if value else None
        elif name in ("columns", "id_column"):  # as the input resolved them (a folder's are fixed)
            recorded[name] = src.columns.as_dict() if name == "columns" else src.id_column
        else:
            recorded[name] = sorted(value) if name == "codes" else value
    model = numbers(options, changed_only=True)
    recorded.update({f"model.{k}": v for k, v in sorted(model.items())})
    out = {"bundle": {"path": str(bundle.resolve()), "sha256": file_sha256(bundle / "q3vl.json")},
           "input": {"path": str(src.path), "format": src.format}, "options": recorded}
    return json.loads(json.dumps(out))  # as the manifest will hold them (tuples become lists)


def carried_columns(src: Source) -> list[str]:
    """Input columns copied to the output: scalars and strings (ids, paths, texts, line numbers), not
    media bytes or arrays (the `id` joins the output back to them).
    """
    types = dict(zip(src.names, _schema_types(src)))
    return [n for n in src.names if str(types.get(n)) in CARRY_TYPES and n != ERROR and not n.startswith("_q3vl")]


def _schema_types(src: Source) -> list[Any]:
    if src.format != "parquet":
        return ["string" if n != "line" else "int64" for n in src.names]
    return list(src.dataset.schema().types)


def check_columns(src: Source, codes: Sequence[str]) -> None:
    """Refuse, before any work, inputs that cannot produce a well-formed output."""
    outputs = {ID, EMBEDDING, TOKENS, *(code_column(c) for c in codes)}
    if src.id_column not in (None, ID) and ID in src.names:
        raise ConfigError(f"the input has a column 'id' but the id column is {src.id_column!r}; rename one of them")
    if src.id_column and not src.columns.json and src.id_column not in src.names:
        raise ConfigError(f"id column {src.id_column!r} is not in the input (columns: {src.names})")
    clash = sorted((outputs - {ID}) & set(src.names))
    if clash:
        raise ConfigError(f"the input has columns {clash}, which embed-dataset writes; rename them")
    if not src.columns.json and not set(src.columns.columns()) & set(src.names):
        raise ConfigError(f"none of the mapped columns {src.columns.columns()} is in the input (columns: "
                          f"{src.names}); map them with --column KEY=COLUMN")


def build_pipeline(src: Source, bundle: Path, done: IdSet, job: DatasetOptions, options: RuntimeOptions,
                   rows_per_call: int) -> Any:
    """Read -> ids (skip done) in blocks of `rows_per_call` rows (so every worker gets work) ->
    (decode on `job.decode_workers` CPU actors) -> embed.

    The id stage reserves `LIGHT_CPUS`: with actors that reserve every CPU of the cluster, stages that
    asked for a whole CPU could never be scheduled and the pipeline would wait forever.
    """
    ds = src.dataset.map_batches(assign_ids, batch_format="pyarrow", batch_size=rows_per_call, num_cpus=LIGHT_CPUS,
                                 fn_kwargs={"columns": src.columns, "id_column": src.id_column, "done": done})
    ds = ds.repartition(target_num_rows_per_block=rows_per_call)  # fused into the id stage
    changes: dict[str, Any] = {"media_policy": call_policy(rows_per_call, options.media_policy)}
    cpus_per_worker = 1.0 if job.cpus_per_worker is None else job.cpus_per_worker
    cpus, decode_cpus = actor_cpus(job.workers, cpus_per_worker, job.decode_workers)
    changes["backend"] = options.backend or ("cuda" if job.gpus_per_worker else "cpu")
    if changes["backend"] == "cpu" and job.cpus_per_worker is not None and options.backend_options is None:
        changes["backend_options"] = {"threads": max(1, int(job.cpus_per_worker))}  # actors sharing a node's cores
    options = dataclasses.replace(options, **changes)
    if job.decode_workers:
        ds = decode_stage(ds, bundle, src, job.decode_workers, rows_per_call, options, decode_cpus)
    kwargs = {"columns": src.columns, "base_dir": src.base_dir, "dim": job.dim, "normalize": job.normalize,
              "codes": job.codes, "calibration": job.calibration, "keep_columns": [*carried_columns(src), ID],
              "options": options}
    return embed_stage(ds, bundle, workers=job.workers, gpus_per_worker=job.gpus_per_worker, cpus_per_worker=cpus,
                       rows_per_call=rows_per_call, **kwargs)


def decode_stage(ds: Any, bundle: Path, src: Source, actors: int, rows_per_call: int, options: RuntimeOptions,
                 cpus: float = DECODE_CPUS) -> Any:
    """`DecodeImages` on `actors` CPU actors, with the embedding stage's pixel limits and media policy."""
    from q3vl.ray.decode import DecodeImages

    kwargs: dict[str, Any] = {"min_pixels": options.min_pixels, "max_pixels": options.max_pixels,
                              "timeout": options.timeout, "columns": src.columns, "base_dir": src.base_dir,
                              "media_policy": options.media_policy}
    return ds.map_batches(DecodeImages, fn_constructor_args=(str(bundle),), fn_constructor_kwargs=kwargs,
                          batch_size=rows_per_call, batch_format="pyarrow",
                          compute=_ray().data.ActorPoolStrategy(size=actors), num_cpus=cpus)


def actor_cpus(workers: int, cpus_per_worker: float, decode_workers: int = 0) -> tuple[float, float]:
    """The CPUs each embedding actor and each decode actor reserve: as asked (`cpus_per_worker`,
    `DECODE_CPUS`), scaled down together when they would not leave `TASK_CPUS` of the cluster to the
    read, id and repartition tasks. Actors holding every CPU token would leave those tasks
    unscheduled and the pipeline waiting forever (a reservation is a scheduling token: the runtime's
    threads are not limited by it). Ray Data runs the row repartition as its own task with the
    default reservation of one CPU (it has no `num_cpus` argument), so a whole CPU stays free: with
    2 CPUs and two workers at 0.75 each, it never ran.
    """
    total = float(_ray().cluster_resources().get("CPU", 0))
    asked = workers * cpus_per_worker + decode_workers * DECODE_CPUS
    room = total - TASK_CPUS
    if not total or asked <= room:
        return cpus_per_worker, DECODE_CPUS
    scale = max(room, 0.1 * (workers + decode_workers)) / asked
    embed, decode = cpus_per_worker * scale, DECODE_CPUS * scale
    log.info("%d workers x %g CPUs and %d decode workers x %g would leave less than %g of the cluster's %g CPUs to "
             "the read and repartition tasks; reserving %.2f per worker and %.2f per decode worker", workers,
             cpus_per_worker, decode_workers, DECODE_CPUS, TASK_CPUS, total, embed, decode)
    return embed, decode


def call_policy(rows_per_call: int, policy: Any = None) -> Any:
    """`policy` (default `MediaPolicy()`: local files, `data:` and public http(s) URLs; private and
    loopback addresses refused) with a per-call byte budget that one call of `rows_per_call` rows
    cannot exhaust before each row hits its own per-item limit, so whether a row fails never depends
    on which rows Ray put in the same batch.
    """
    from q3vl.preprocess import MediaPolicy

    policy = policy or MediaPolicy()
    return dataclasses.replace(policy, max_call_bytes=max(policy.max_call_bytes, rows_per_call * policy.max_item_bytes))


def embed_stage(ds: Any, bundle: str | Path, *, workers: int = 1, gpus_per_worker: float = 0.0,
                cpus_per_worker: float = 1.0, rows_per_call: int = 32, **embed_kwargs: Any) -> Any:
    """`ds` with the `EmbedBatch` stage appended: a pool of `workers` actors, each loading the bundle
    once and reserving `gpus_per_worker` GPUs and `cpus_per_worker` CPUs; `embed_kwargs` are
    `EmbedBatch`'s arguments (pass backend="cuda" with GPUs).

    A dead actor is restarted and its batch retried, `TASK_RETRIES` times: enough for a lost node or
    an OOM kill, while a row that crashes the process itself (not an exception, which is that row's
    error) stops the job instead of looping on it forever.
    """
    ray = _ray()
    options = embed_kwargs.get("options") or RuntimeOptions()
    if options.media_policy is None and "media_policy" not in embed_kwargs:
        policy = call_policy(rows_per_call)
        embed_kwargs = {**embed_kwargs, "options": dataclasses.replace(options, media_policy=policy)}
    with warnings.catch_warnings():
        # Ray 2.60 takes actor restarts / task retries only through **ray_remote_args and marks that
        # deprecated with no replacement named yet (retry_args): the notice would only confuse users
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(EmbedBatch, fn_constructor_args=(str(bundle),), fn_constructor_kwargs=embed_kwargs,
                              batch_size=rows_per_call, batch_format="pyarrow",
                              compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
                              num_gpus=gpus_per_worker or None, **retry_args(ds.map_batches))


def retry_args(map_batches: Any) -> dict[str, Any]:
    """Actor restarts and bounded task retries, passed the way this Ray takes them.

    Ray 2.60 takes them only through `**ray_remote_args`, which it marks deprecated (a warning, filtered
    by the caller) without a named replacement yet; a Ray that takes neither gets none, with a warning,
    and keeps its own default (unbounded retries).
    """
    params = inspect.signature(map_batches).parameters
    if "max_task_retries" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"max_restarts": -1, "max_task_retries": TASK_RETRIES}
    log.warning("this Ray version takes no max_task_retries: a row that kills its worker is retried "
                "without bound")
    return {}


class Progress:
    """Rows/s and ETA: a tqdm bar on a terminal, a log line every `every` seconds otherwise."""

    def __init__(self, total: int | None, show: bool | None, every: float = 10.0) -> None:
        self.total, self.every, self.count = total, every, 0
        self.start = self.last = time.perf_counter()
        tty = sys.stderr.isatty() if show is None else show
        self.bar = None
        if tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="row", desc="embed-dataset", smoothing=0.1)

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if not self.total:
            return f"{self.count} rows, {rate:.1f} rows/s"
        left = max(self.total - self.count, 0)
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        return f"{self.count}/{self.total} rows ({100 * self.count / self.total:.0f}%), {rate:.1f} rows/s, ETA {eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_stream(ds: Any, out: OutputDir, rows_per_shard: int, progress: Progress) -> dict[str, int]:
    """Stream the pipeline's blocks into shards of about `rows_per_shard` rows, each id once."""
    import pyarrow as pa

    pending: list[Any] = []
    pending_ids: set[str] = set()
    counts = {"rows": 0, "errors": 0, "duplicates": 0, "shards": 0}

    def flush() -> None:
        if pending:
            entry = out.commit(pa.concat_tables(pending))
            counts["rows"] += entry["rows"]
            counts["errors"] += entry["errors"]
            counts["shards"] += 1
            pending.clear()
            pending_ids.clear()

    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
        ids = block.column(ID).to_pylist()
        keep = []
        for i, written in zip(ids, out.done.contains(ids)):
            keep.append(not written and i not in pending_ids)
            pending_ids.add(i)
        counts["duplicates"] += len(keep) - sum(keep)
        if not all(keep):
            block = block.filter(pa.array(keep))
        if block.num_rows:
            pending.append(block)
        progress.update(len(ids))
        if len(pending_ids) >= rows_per_shard:
            flush()
    flush()
    return counts


def embed_corpus(input: str | Path, output_dir: str | Path, bundle: str | Path, job: DatasetOptions | None = None,
                 options: RuntimeOptions | None = None, **keywords: Any) -> dict[str, Any]:
    """Embed every row of `input` (Parquet, JSONL, CSV or a folder of media) into Parquet shards in
    `output_dir`, resumably and exactly once per row id; returns this run's record (also in the manifest).

    `job` (`DatasetOptions`: input format, column map, ids, dim and codes, workers, Ray, the media
    policy's options) and `options` (`RuntimeOptions`: what the `Embedder` of every worker is built
    with) are given whole, or as keyword arguments named like their fields (`workers=2,
    batch_size=4, max_pixels=65536`), applied on top; an unknown name raises, naming the allowed ones.
    `workers` embedding actors, each with `gpus_per_worker` GPUs (backend "cuda" unless `backend`
    says otherwise); `cpus_per_worker` is what each reserves (default 1) and, when given, the CPU
    backend's thread count (default: every core of its node, right for one actor per node);
    `rows_per_call` rows per actor call (default 4 x the model's batch size); a shard is written every
    `rows_per_shard` rows. Without a running Ray session a local one is started (`num_cpus`), or the
    cluster at `address` joined. `decode_workers` > 0 adds the CPU decode stage (`DecodeImages`) on that
    many actors. Media are read under `options.media_policy` when given, else the policy of `job`'s
    media options (a trusted corpus: local files anywhere unless `media_root`).
    """
    job, options = job_options(job, options, keywords)
    bundle = Path(bundle)
    rows_per_call = job.rows_per_call or 4 * options.batch_size
    with ray_session(job.address, job.num_cpus) as init_s:
        quiet_ray_data()
        src = open_input(input, job.input_format, job.columns, job.id_column)
        check_columns(src, job.codes)
        with OutputDir(output_dir, settings(src, bundle, job, options)) as out:
            if job.calibration is not None and not (out.path / "calibration.json").exists():
                shutil.copyfile(job.calibration, out.path / "calibration.json")  # what `index build` rescales with
            run: dict[str, Any] = {"started": now(), "finished": None, "workers": job.workers,
                                   "gpus_per_worker": job.gpus_per_worker, "ray_init_s": round(init_s, 2),
                                   "input_rows": src.total, "already_written": len(out.done),
                                   "skipped_files": src.skipped_files}
            record_run(out, run)
            ds = build_pipeline(src, bundle, out.done, job, options, rows_per_call)
            total = None if src.total is None else max(src.total - len(out.done), 0)
            bar = Progress(total, job.progress)
            start = time.perf_counter()
            try:
                counts = write_stream(ds, out, job.rows_per_shard, bar)
            finally:
                bar.close()
            seconds = time.perf_counter() - start
            run.update(counts, finished=now(), seconds=round(seconds, 2),
                       rows_per_s=round(counts["rows"] / seconds, 2) if seconds > 0 else None)
            record_run(out, run)
            return run


def job_options(job: DatasetOptions | None, options: RuntimeOptions | None,
                keywords: dict[str, Any]) -> tuple[DatasetOptions, RuntimeOptions]:
    """`embed_corpus`'s two option sets, keyword arguments applied; the media policy is `options`'
    when given, else `job`'s media options' (a trusted corpus's base: local files anywhere).
    """
    mine, runtime, unknown = split(keywords, DatasetOptions, RuntimeOptions)
    if unknown:
        allowed = sorted(f.name for c in (DatasetOptions, RuntimeOptions) for f in option_fields(c))
        raise UnknownOptionError(f"embed_corpus got unexpected keyword arguments {sorted(unknown)}; allowed: {allowed}")
    job = of(DatasetOptions, mine, "embed_corpus", job or DatasetOptions())
    options = of(RuntimeOptions, runtime, "embed_corpus", options or RuntimeOptions())
    media = {f.name: getattr(job, f.name) for f in option_fields(MediaOptions)}
    if options.media_policy is None:
        return job, dataclasses.replace(options, media_policy=MediaOptions(**media).policy(local_files=True))
    if media != {f.name: getattr(MediaOptions(), f.name) for f in option_fields(MediaOptions)}:
        raise ConfigError("give the media policy either as media_policy= or as the media options "
                          f"({', '.join(f.name for f in option_fields(MediaOptions))}), not both")
    return job, options
