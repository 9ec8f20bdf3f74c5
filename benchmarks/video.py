"""Video preprocessing and end to end: q3vl's seek-based sampling vs qwen-vl-utils with decord (the wrapper's reader).

Files (made once, cached in --workdir; generation times are recorded): H.264 1280x720 and 1920x1080,
30 fps, x264 `veryfast` CRF 20 with B-frames and keyframes at most 250 frames apart, motion in every
frame (`q3vl.testing.videos.write_long_video`), 2 minutes long; the 30-minute files are the 2-minute
stream 15 times over, joined by copying packets (`repeat_video`: no re-encoding, same decoding cost
per frame).

Preprocessing, per file and frame count (4, 16, 64; `fps=1`, `max_frames=N`, so N frames): a file path
in, resized frames out. Each system runs in its own child process, the systems alternating within
each repeat; wall time, CPU time (all threads) and peak-RSS growth (VmHWM after resetting it) are
measured around the call only, after imports:

- `q3vl`: `VideoFile.probe` + `load` (index, seek, decode, torchvision-exact resize);
- `q3vl-sequential`: the same with seeking disabled (the decode before this change; 2-minute files);
- `qwen-vl-utils+decord`: `fetch_video` (decord reader, torchvision resize), the wrapper's path;
- `qwen-vl-utils+torchvision`: the same with the torchvision reader, where the installed torchvision has one.

End to end (`--e2e`, on the small shape: 217M random weights, made and exported once in --workdir):
`Embedder.process` vs the PyTorch reference (`ReferenceEmbedder`: qwen-vl-utils + decord +
transformers) on the 720p files at 4 and 16 frames, and q3vl alone at 64 frames with
`video_budget="fit"` (64 frames of 1152x640 are ~23,000 tokens: the wrapper cannot embed them at
max_length 8192). The model is loaded and warmed up before the timed call.

    python benchmarks/video.py --workdir DIR [--e2e] [--quick]

Writes benchmarks/results/video.{json,md} with the CPU model, its SIMD flags and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PREPROCESS = ("q3vl", "q3vl-sequential", "qwen-vl-utils+decord", "qwen-vl-utils+torchvision")
BASELINE = "qwen-vl-utils+decord"
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}


# ---------------------------------------------------------------- child: one measurement
def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure(work: Any) -> dict[str, Any]:
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    wall, cpu = time.perf_counter(), time.process_time()
    shape = work()
    return {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3),
            "peak_rss_growth_mb": round(_status("VmHWM") - base), "peak_rss_mb": round(_status("VmHWM")),
            "output": shape}


def _preprocess_work(system: str, path: str, frames: int) -> Any:
    """The measured call of one preprocessing system (modules imported, nothing decoded yet)."""
    if system.startswith("qwen-vl-utils"):
        os.environ["FORCE_QWENVL_VIDEO_READER"] = system.split("+")[1]
        from qwen_vl_utils.vision_process import fetch_video

        ele = {"video": "file://" + path, "fps": 1.0, "max_frames": frames}
        return lambda: list(fetch_video(ele, image_patch_size=16, return_video_sample_fps=True,
                                        return_video_metadata=True)[0][0].shape)
    from q3vl.preprocess import seek
    from q3vl.preprocess.video import VideoFile

    if system == "q3vl-sequential":
        def refuse(*_: Any) -> int:
            raise seek.SeekFailed("disabled by the benchmark")

        seek._seeking = refuse  # type: ignore[assignment]
    return lambda: list(VideoFile.probe(path, 1.0, frames).load().shape)


def _e2e_work(system: str, path: str, frames: int, model: str) -> Any:
    item: dict[str, Any] = {"video": path, "max_frames": frames}
    if system == "q3vl":
        from q3vl import Embedder

        m = Embedder(model)
        m.process([{"text": "warm-up"}, {"video": path, "max_frames": 4}])
        return lambda: list(m.process([item]).shape)
    if system == "q3vl+fit":
        from q3vl import Embedder

        m = Embedder(model, video_budget="fit")
        m.process([{"text": "warm-up"}, {"video": path, "max_frames": 4}])
        return lambda: list(m.process([item]).shape)
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
    from q3vl.reference import ReferenceEmbedder

    ref = ReferenceEmbedder(model)
    ref.process([{"text": "warm-up"}, {"video": path, "max_frames": 4}])
    return lambda: list(ref.process([item]).shape)


def child(kind: str, system: str, path: str, frames: int, model: str) -> None:
    try:
        work = _preprocess_work(system, path, frames) if kind == "pre" else _e2e_work(system, path, frames, model)
        out: dict[str, Any] = _measure(work)
    except Exception as e:  # a system that cannot run here (no reader, too many tokens) says why
        out = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    sys.stdout.write(json.dumps(out) + "\n")


# ---------------------------------------------------------------- parent
def run_child(kind: str, system: str, path: Path, frames: int, model: str = "", timeout: float = 1800) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, system, str(path), str(frames), model]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr[-500:]}"}
    return json.loads(lines[-1])


def make_files(workdir: Path, sizes: list[str], lengths: list[int]) -> tuple[dict[str, Path], list[dict]]:
    from q3vl.testing.videos import repeat_video, write_long_video

    files, made = {}, []
    for size in sizes:
        width, height = SIZES[size]
        short = workdir / f"h264-{size}-120s.mp4"
        if not short.exists():
            made.append(write_long_video(short, 120, width, height, 30, crf=20))
        for seconds in lengths:
            path = short if seconds == 120 else workdir / f"h264-{size}-{seconds}s.mp4"
            if not path.exists():
                made.append(repeat_video(short, path, seconds // 120))
            files[f"{size}-{seconds}s"] = path
    return files, made


def ensure_small(workdir: Path) -> tuple[Path, Path]:
    ckpt, bundle = workdir / "ckpt-small-embedding", workdir / "bundle-small-embedding"
    if not (bundle / "q3vl.json").exists():
        q3vl = [sys.executable, "-m", "q3vl"]
        if not (ckpt / "config.json").exists():
            subprocess.run([*q3vl, "testing", "make-checkpoint", str(ckpt), "--shape", "small"], check=True)
        subprocess.run([*q3vl, "export", str(ckpt), "-o", str(bundle), "--overwrite"], check=True)
    return ckpt, bundle


def summarize(runs: list[dict]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "not run"}
    return {"wall_s": statistics.median(r["wall_s"] for r in ok), "cpu_s": statistics.median(r["cpu_s"] for r in ok),
            "peak_rss_growth_mb": max(r["peak_rss_growth_mb"] for r in ok), "walls": [r["wall_s"] for r in ok],
            "output": ok[0]["output"]}


def bench_preprocess(files: dict[str, Path], frames: list[int], repeats: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    skip: dict[str, str] = {}
    for name, path in files.items():
        for n in frames:
            systems = [s for s in PREPROCESS if s not in skip and not (s == "q3vl-sequential" and "120s" not in name)]
            runs: dict[str, list[dict]] = {s: [] for s in systems}
            for _ in range(repeats):
                for s in systems:
                    r = run_child("pre", s, path, n)
                    runs[s].append(r)
                    sys.stderr.write(f"{name} {n} frames {s}: {r}\n")
                    if s.endswith("torchvision") and "error" in r:
                        skip[s] = r["error"]
            rows[f"{name}/{n}"] = {s: summarize(v) for s, v in runs.items() if v}
    return {"rows": rows, "unavailable": skip}


def bench_e2e(files: dict[str, Path], workdir: Path, repeats: int) -> dict[str, Any]:
    ckpt, bundle = ensure_small(workdir)
    rows: dict[str, Any] = {}
    for name, path in files.items():
        if not name.startswith("720p"):
            continue
        plan = [(4, "q3vl", bundle), (4, "reference", ckpt), (16, "q3vl", bundle), (16, "reference", ckpt),
                (64, "q3vl+fit", bundle)]
        for n, system, model in plan:
            runs = [run_child("e2e", system, path, n, str(model)) for _ in range(repeats)]
            sys.stderr.write(f"e2e {name} {n} frames {system}: {runs}\n")
            rows.setdefault(f"{name}/{n}", {})[system] = summarize(runs)
    return rows


def simd_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "sse4")))
    return []


def reader_versions() -> dict[str, str]:
    """PyAV (and its FFmpeg), decord and qwen-vl-utils: what the preprocessing figures depend on."""
    import importlib.metadata as md

    import av

    out = {"av": av.__version__, "libavcodec": ".".join(map(str, av.library_versions["libavcodec"]))}
    for pkg in ("decord", "qwen-vl-utils", "torchvision"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    header = "| file / frames | " + " | ".join(PREPROCESS) + f" | q3vl / {BASELINE} |"
    lines = ["# Video preprocessing: q3vl vs qwen-vl-utils + decord\n",
             f"{m['cpu']}, {m['cores']} cores, SIMD: {' '.join(data['simd'])}. Load average before/after: "
             f"{data['load_before']} / {data['load_after']}. {data['note']}\n",
             "Readers: " + ", ".join(f"{k} {v}" for k, v in data.get("readers", {}).items()) + ".\n",
             "Files: " + "; ".join(f"{k}: {v['bytes'] / 1e6:.0f} MB" for k, v in data["files"].items()) + ".",
             "Generated here: " + ("; ".join(f"{Path(g['path']).name} in {g['make_s']} s" for g in data["generated"])
                                   or "(cached from an earlier run)") + ".\n",
             "## Preprocessing (file path -> resized frames), median wall s (CPU s), peak RSS growth MB\n",
             header, "|---" * (len(PREPROCESS) + 2) + "|"]
    for key, row in data["preprocess"]["rows"].items():
        cells = [_cell(row.get(s)) for s in PREPROCESS]
        ratio = _ratio(row.get("q3vl"), row.get(BASELINE))
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {ratio} |")
    for s, err in data["preprocess"]["unavailable"].items():
        lines.append(f"\n{s}: unavailable ({err})")
    if data.get("e2e"):
        lines += ["\n## End to end on the small shape (Embedder.process vs the PyTorch reference), 720p files\n",
                  "| file / frames | q3vl | reference | q3vl+fit (64 frames) | q3vl / reference |",
                  "|---|---|---|---|---|"]
        for key, row in data["e2e"].items():
            lines.append(f"| {key} | {_cell(row.get('q3vl'))} | {_cell(row.get('reference'))} | "
                         f"{_cell(row.get('q3vl+fit'))} | {_ratio(row.get('q3vl'), row.get('reference'))} |")
    lines += ["\n## Acceptance (issue 27)\n", *[f"- {a}" for a in data["acceptance"]]]
    return "\n".join(lines) + "\n"


def _cell(r: dict | None) -> str:
    if not r:
        return "-"
    if "error" in r:
        return "n/a"
    return f"{r['wall_s']:.2f} ({r['cpu_s']:.2f}), {r['peak_rss_growth_mb']}"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "error" in a or "error" in b:
        return "-"
    return f"{a['wall_s'] / b['wall_s']:.2f}x"


def acceptance(pre: dict[str, Any]) -> list[str]:
    rows = pre["rows"]

    def wall(key: str, system: str) -> float | None:
        r = rows.get(key, {}).get(system)
        return r["wall_s"] if r and "error" not in r else None

    out = []
    for n, bound in ((4, 1.5), (16, 1.2)):
        ours, theirs = wall(f"720p-120s/{n}", "q3vl"), wall(f"720p-120s/{n}", BASELINE)
        if ours and theirs:
            out.append(f"2-minute 720p, {n} frames: q3vl {ours:.2f} s vs {BASELINE} {theirs:.2f} s = "
                       f"{ours / theirs:.2f}x (target <= {bound}x): {'met' if ours / theirs <= bound else 'NOT met'}")
    for size in SIZES:
        short, long_ = wall(f"{size}-120s/16", "q3vl"), wall(f"{size}-1800s/16", "q3vl")
        if short and long_:
            out.append(f"{size} 30-minute vs 2-minute, 16 frames: {long_:.2f} s vs {short:.2f} s = "
                       f"{long_ / short:.2f}x (target <= 3x): {'met' if long_ / short <= 3 else 'NOT met'}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/q3vl-video-bench"),
                   help="where the video files and the small bundle are made once and reused")
    p.add_argument("--sizes", default="720p,1080p", help="comma-separated: 720p, 1080p")
    p.add_argument("--lengths", default="120,1800", help="comma-separated seconds (multiples of 120)")
    p.add_argument("--frames", default="4,16,64", help="comma-separated frame counts")
    p.add_argument("--repeats", type=int, default=3, help="runs per system and cell (median reported)")
    p.add_argument("--e2e", action="store_true", help="also end to end on the small shape (exports it once)")
    p.add_argument("--quick", action="store_true", help="720p, 2 minutes, 4 frames, 1 repeat (a smoke test)")
    p.add_argument("--note", default="Measured on a shared machine (other jobs running): preliminary figures.",
                   help="a sentence stored with the results (the conditions of the run)")
    p.add_argument("--tag", default="video", help="results file stem under benchmarks/results")
    p.add_argument("--child", nargs=5, metavar=("KIND", "SYSTEM", "PATH", "FRAMES", "MODEL"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, system, path, frames, model = a.child
        child(kind, system, path, int(frames), model)
        return 0
    from q3vl.bench.run import machine_info

    if a.quick:
        a.sizes, a.lengths, a.frames, a.repeats = "720p", "120", "4", 1
    a.workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    files, made = make_files(a.workdir, a.sizes.split(","), [int(x) for x in a.lengths.split(",")])
    frames = [int(x) for x in a.frames.split(",")]
    pre = bench_preprocess(files, frames, a.repeats)
    e2e = bench_e2e(files, a.workdir, max(1, a.repeats - 1)) if a.e2e else {}
    data = {"machine": machine_info(), "simd": simd_flags(), "readers": reader_versions(), "note": a.note,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "files": {k: {"name": v.name, "bytes": v.stat().st_size} for k, v in files.items()},
            "generated": [{**g, "path": Path(g["path"]).name, "source": Path(g.get("source", "")).name} for g in made],
            "repeats": a.repeats, "preprocess": pre, "e2e": e2e, "acceptance": acceptance(pre)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.tag}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{a.tag}.md").write_text(markdown(data))
    sys.stdout.write(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
