"""Corpus embedding throughput: `q3vl embed-dataset` on Ray Data (1 and 2 workers) against `q3vl embed`.

Two corpora, each run through all three systems in their own processes, one after another, on the
same local machine:

- tiny shape, 2,000 items (three quarters texts of varied length, a quarter small images): Ray's
  start-up and per-row costs dominate here, so it measures overhead, not throughput;
- small shape (217M parameters), 500 images of 448 x 448: the model dominates; the target is Ray
  with one worker at >= 0.85x the rows/s of `q3vl embed`.

Ray's costs are measured apart, with a no-op actor on the same rows: `ray.init`, a one-row pipeline
(an actor's start plus the pipeline's fixed cost) and the extra time per row of an N-row pipeline.
The host-side preprocessing of one 448 x 448 image (the batch API's `load` step: decode, resize,
patchify) is timed too, for the sizing table. Each Ray run's vectors are checked against `q3vl embed`'s.

    python benchmarks/corpus_scale.py [--quick] [--workdir /tmp/q3vl-corpus-bench]

Writes benchmarks/results/corpus-scale.{json,md} (with the machine's load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
H100_BF16_TFLOPS = 989.0  # dense peak, NVIDIA's datasheet


def sh(*args: str, cwd: Path | None = None) -> float:
    """Run a command; its wall time in seconds (raises with its stderr on failure)."""
    start = time.perf_counter()
    done = subprocess.run(list(args), capture_output=True, text=True, cwd=cwd)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def q3vl(*args: str) -> float:
    return sh(sys.executable, "-m", "q3vl", *args)


def ensure_bundle(workdir: Path, shape: str) -> Path:
    ckpt, bundle = workdir / f"ckpt-{shape}", workdir / f"bundle-{shape}"
    if not (bundle / "q3vl.json").exists():
        if not (ckpt / "config.json").exists():
            q3vl("testing", "make-checkpoint", str(ckpt), "--shape", shape)
        q3vl("export", str(ckpt), "-o", str(bundle), "--overwrite")
    return bundle


def make_corpus(d: Path, texts: int, images: int, size: tuple[int, int]) -> Path:
    """A JSONL of `texts` texts and `images` JPEG images (absolute paths), in a fixed mixed order."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["retrieval", "ranking", "image", "video", "screenshot", "chart", "document", "table", "figure"]
    items = []
    for i in range(images):
        path = d / f"img{i:05d}.jpg"
        if not path.exists():
            h, w = size
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * 255 // w + 7 * i) % 256, (yy * 255 // h + 3 * i) % 256, (xx + yy + i) % 256], -1)
            noise = rng.integers(-30, 30, (h, w, 3))
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
        items.append({"id": f"i{i}", "image": str(path)})
    for i in range(texts):
        n = 4 + (i * 37) % 120
        items.append({"id": f"t{i}", "text": " ".join(words[(i + k) % len(words)] for k in range(n))})
    order = np.random.default_rng(1).permutation(len(items))
    (d / "items.jsonl").write_text("".join(json.dumps(items[k]) + "\n" for k in order))  # with ids: embed-dataset
    plain = [{k: v for k, v in items[k].items() if k != "id"} for k in order]  # q3vl embed takes no ids
    (d / "plain.jsonl").write_text("".join(json.dumps(x) + "\n" for x in plain))
    return d / "items.jsonl"


def run_embed(bundle: Path, corpus: Path, out: Path, backend: str = "cpu") -> dict:
    wall = q3vl("embed", str(bundle), str(corpus.with_name("plain.jsonl")), "-o", str(out), "--batch-size", "8",
                "--overwrite", "--no-progress", "--backend", backend)
    return {"system": "q3vl embed", "wall_s": round(wall, 2)}


def run_ray(bundle: Path, corpus: Path, out: Path, workers: int, gpus_per_worker: float = 0.0) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    extra = ["--cpus-per-worker", str(max(1, os.cpu_count() or 1) // workers)] if workers > 1 else []
    if gpus_per_worker:  # backend cuda on each actor's GPU
        extra += ["--gpus-per-worker", str(gpus_per_worker)]
    wall = q3vl("embed-dataset", str(corpus), "-o", str(out), "--bundle", str(bundle), "--workers", str(workers),
                "--batch-size", "8", "--num-cpus", str(os.cpu_count()), "--no-progress", *extra)
    run = json.loads((out / "q3vl-dataset.json").read_text())["runs"][-1]
    return {"system": f"Ray, {workers} worker{'s' if workers > 1 else ''}", "wall_s": round(wall, 2),
            "ray_init_s": run["ray_init_s"], "pipeline_s": run["seconds"], "rows": run["rows"], "errors": run["errors"]}


def check_same_vectors(npy: Path, corpus: Path, out: Path) -> float:
    """Worst |difference| between `q3vl embed`'s vectors and the Ray run's, matched by id."""
    import pyarrow.parquet as pq

    ids = [json.loads(line)["id"] for line in corpus.read_text().splitlines()]
    want = dict(zip(ids, np.load(npy)))
    table = pq.read_table(out, columns=["id", "embedding", "error"]) if out.is_file() else pq.read_table(
        sorted(out.glob("part-*.parquet")), columns=["id", "embedding", "error"])
    got = {r["id"]: r for r in table.to_pylist()}
    assert set(got) == set(want) and not any(r["error"] for r in got.values()), "Ray output differs in rows"
    return float(max(np.abs(np.asarray(got[i]["embedding"]) - want[i]).max() for i in ids))


def ray_fixed_costs(rows: int) -> dict:
    """In a child process: ray.init, a one-row pipeline, and an N-row one through a no-op actor."""
    out = subprocess.run([sys.executable, __file__, "--ray-fixed", str(rows)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


class Noop:
    """A stateful map_batches stage that does nothing: the pipeline's own cost."""

    def __call__(self, batch: dict) -> dict:
        return batch


def _ray_fixed_child(rows: int) -> None:
    """ray.init; then a pipeline of `rows` rows through a no-op actor: the time to its first block
    (the actor's start and the pipeline's fixed cost) and the time per row after it (Ray's data path).
    """
    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    init = time.perf_counter() - t0
    start = time.perf_counter()
    ds = ray.data.from_items([{"id": f"r{i}", "text": f"row {i} " * 8} for i in range(rows)])
    ds = ds.repartition(target_num_rows_per_block=32).map_batches(
        Noop, batch_size=32, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    first, seen, first_rows = None, 0, 0
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        seen += block.num_rows
        if first is None:
            first, first_rows = time.perf_counter(), block.num_rows
    end = time.perf_counter()
    ray.shutdown()
    assert seen == rows and first is not None
    print(json.dumps({"ray_init_s": round(init, 2), "first_block_s": round(first - start, 2), "rows": rows,
                      "per_row_ms": round(1000 * (end - first) / max(rows - first_rows, 1), 4)}))


def preprocess_ms(bundle: Path, corpus: Path, n: int) -> float:
    """Host preprocessing per image (plan + load: decode, resize, patchify), one thread, median of 3."""
    from q3vl.runtime import Embedder

    items = [json.loads(line) for line in corpus.read_text().splitlines()]
    items = [{"image": it["image"]} for it in items if "image" in it][:n]
    with Embedder(bundle) as emb:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            plans = emb.plan(items)
            for p in plans:
                emb._load_one(p)  # the load step on this thread (no pool): one core's cost
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / len(items)


def flops_per_image(shape: str, side: int = 448, prompt_tokens: int = 21) -> float:
    """Matmul FLOPs of one side x side image through the vision encoder and the text backbone."""
    from q3vl.testing.shapes import SHAPES

    t, v = SHAPES[shape]["text"], SHAPES[shape]["vision"]
    patches = (side // 16) ** 2
    tokens = patches // 4 + prompt_tokens
    hv, iv = v["hidden_size"], v["intermediate_size"]
    vision = v["depth"] * (2 * patches * (4 * hv * hv + 2 * hv * iv) + 4 * patches * patches * hv)
    h, i, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    layer = 2 * tokens * (h * q + 2 * h * kv + q * h + 3 * h * i) + 4 * tokens * tokens * q
    merger = 2 * (patches // 4) * (4 * hv) * (4 * hv + h) * (1 + len(v["deepstack_visual_indexes"]))
    return float(vision + t["num_hidden_layers"] * layer + merger)


def sizing(small_ms_per_image: float, pre_ms: float) -> list[dict]:
    """10 M images at 448 px with the 2B model: CPU from the measured small-shape cost scaled by FLOPs,
    GPU from FLOPs at an assumed utilisation (estimates); host preprocessing measured.
    """
    ratio = flops_per_image("2b") / flops_per_image("small")
    rows = [{"what": "host preprocessing (decode, resize, patchify), 1 core", "per_image_ms": round(pre_ms, 1),
             "hours_10M": round(1e7 * pre_ms / 3.6e6, 1), "kind": "measured (this machine)"},
            {"what": "2B on this 2-core CPU", "per_image_ms": round(small_ms_per_image * ratio),
             "hours_10M": round(1e7 * small_ms_per_image * ratio / 3.6e6),
             "kind": f"estimate: small measured x FLOP ratio {ratio:.1f}"}]
    for mfu in (0.15, 0.35):
        ms = 1000 * flops_per_image("2b") / (H100_BF16_TFLOPS * 1e12 * mfu)
        rows.append({"what": f"2B on one H100, {int(mfu * 100)}% of bf16 peak", "per_image_ms": round(ms, 2),
                     "hours_10M": round(1e7 * ms / 3.6e6, 1),
                     "kind": f"estimate: {flops_per_image('2b') / 1e12:.2f} TFLOP/image, not measured",
                     "cores_to_feed": round(pre_ms / ms, 1)})
    return rows


def report(res: dict) -> str:
    lines = [f"# Corpus embedding: Ray Data vs `q3vl embed` ({res['machine']})", "",
             f"Load average before {res['load_before']}, after {res['load_after']} (a shared machine).", "",
             "| corpus | system | wall s | Ray start s | rows/s (wall) | rows/s without Ray start | vs q3vl embed | "
             "max abs diff vs q3vl embed |", "|---|---|---|---|---|---|---|---|"]
    for c in res["corpora"]:
        base = c["rows"] / c["runs"][0]["wall_s"]
        for r in c["runs"]:
            init = r.get("ray_init_s", 0.0)
            rate, steady = c["rows"] / r["wall_s"], c["rows"] / (r["wall_s"] - init)
            lines.append(f"| {c['name']} | {r['system']} | {r['wall_s']} | {init or '-'} | {rate:.1f} | {steady:.1f} | "
                         f"{steady / base:.2f}x | {r.get('max_abs_diff', '-')} |")
    f = res["ray_fixed"]
    lines += ["", f"Ray's own costs (a no-op actor, {f['rows']} rows): `ray.init` {f['ray_init_s']} s; the pipeline's "
              f"first block after {f['first_block_s']} s (an actor's start); then {f['per_row_ms']} ms per row.", "",
              "| 10 M images at 448 px, 2B model | ms/image | hours | basis |", "|---|---|---|---|"]
    for s in res["sizing"]:
        extra = f"; {s['cores_to_feed']} preprocessing cores per GPU" if "cores_to_feed" in s else ""
        lines.append(f"| {s['what']} | {s['per_image_ms']} | {s['hours_10M']} | {s['kind']}{extra} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/q3vl-corpus-bench"))
    p.add_argument("--quick", action="store_true", help="200 + 40 items: check the script, not the numbers")
    p.add_argument("--ray-fixed", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.ray_fixed:
        return _ray_fixed_child(a.ray_fixed)
    tiny_n, images_n = (200, 40) if a.quick else (2000, 500)
    load_before = os.getloadavg()
    a.workdir.mkdir(parents=True, exist_ok=True)
    corpora = [("tiny", f"{tiny_n} items (tiny shape)", make_corpus(a.workdir / "tiny-corpus", tiny_n * 3 // 4,
                                                                    tiny_n // 4, (96, 128))),
               ("small", f"{images_n} images 448x448 (small shape)",
                make_corpus(a.workdir / "image-corpus", 0, images_n, (448, 448)))]
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "load_before": [round(x, 2) for x in load_before], "corpora": []}
    for shape, name, corpus in corpora:
        bundle = ensure_bundle(a.workdir, shape)
        npy = a.workdir / f"{shape}.npy"
        runs = [run_embed(bundle, corpus, npy)]
        for workers in (1, 2):
            out = a.workdir / f"{shape}-ray{workers}"
            runs.append(run_ray(bundle, corpus, out, workers))
            runs[-1]["max_abs_diff"] = f"{check_same_vectors(npy, corpus, out):.1e}"
        res["corpora"].append({"name": name, "rows": len(corpus.read_text().splitlines()), "runs": runs})
        print(json.dumps(res["corpora"][-1]), flush=True)
    res["ray_fixed"] = ray_fixed_costs(10 * tiny_n)
    pre = preprocess_ms(ensure_bundle(a.workdir, "small"), corpora[1][2], 40)
    small = res["corpora"][1]
    res["sizing"] = sizing(1000 * small["runs"][0]["wall_s"] / small["rows"], pre)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    name = "corpus-scale-quick" if a.quick else "corpus-scale"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{name}.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
