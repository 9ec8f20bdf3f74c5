"""Pre-flight: does this machine have the memory and disk an export needs, before anything is downloaded?

Why: a 2B export with its parity check peaks at ~17 GB of RAM and an 8B one at ~50 GB; found out by
the kernel's OOM killer after a 4-17 GB download and minutes of work, that is the worst way to learn
it. So an export from the Hub compares, first, the download (from the repo's file list, minus what
the cache already holds) with the free disk, and then, once `config.json` says the shape, the
needs below with what `probe_machine()` reports, and refuses with both figures. A local checkpoint
gets the same figures as a warning.

The needs, from the parameter counts of `config.json` (P: every parameter of the model, N: those the
bundle holds, i.e. P without an untied LM head; E: the token-embedding table, vocab x hidden), in
bytes, derived from the repository's measurements on the 2B and 8B shapes
(benchmarks/results/export-2b.txt, export-8b.txt, export-8b-int8.txt):

- bundle on disk: N x 4 (fp32), x 2 (fp16/bf16); int8 weights: E x 4 + (N - E) x 1; int4:
  E x 4 + (N - E) x 0.5; plus the tokenizer (12 MB). 2B fp32 8.52 GB (measured 8.52), 8B fp16
  16.3 GB (16.3), 8B int8 10.0 GB (10.06).
- export RAM, fused graphs (built tensor by tensor): 1 GB + 2 x E x 4. 2B 3.5 GB (measured ~2-3.2 GB),
  8B 6.0 GB (4.3 GB fp16, 5.5 GB int8 incl. calibration). Plain graphs (traced whole by torch.onnx):
  1 GB + 1.1 x P x 4: 2B 10.4 GB (measured 9.7).
- validation RAM (the float32 transformers reference beside the bundle's ONNX Runtime sessions):
  1 GB + P x 4 + bundle bytes. 2B fp32 18.0 GB (measured 17.4 GB peak); 8B fp16 52.4 GB (the 8B notes:
  ">= ~48 GB").
- disk: the download (into the Hub cache) and the bundle (beside the output, staged then renamed),
  summed when both are on one filesystem.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from q3vl.errors import ConfigError, option
from q3vl.spec import ModelSpec

log = logging.getLogger(__name__)
GB = 1e9
TOKENIZER_BYTES = 12_000_000
NO_VALIDATE = option("validate=False", "--no-validate")


class PreflightError(ConfigError):
    """The machine lacks the memory or disk an export needs (the message has both figures)."""


@dataclass(frozen=True)
class Machine:
    """What this machine has: available RAM (None: unknown) and free bytes per filesystem checked."""

    ram: int | None
    disk: dict[str, int] = field(default_factory=dict)  # path (as probed) -> free bytes


@dataclass(frozen=True)
class ExportPlan:
    """What the export will make: enough to size it."""

    precision: str = "fp32"
    graph: str = "fused"
    weights: str | None = None
    validate: bool = True
    output: Path = Path(".")


def parameter_counts(spec: ModelSpec) -> dict[str, int]:
    """Parameters by part, as transformers' Qwen3-VL model holds them (checked against it in the tests)."""
    t, v = spec.text, spec.vision
    h, hd = t.hidden_size, t.head_dim
    layer = (h * t.num_heads * hd * 2 + h * t.num_kv_heads * hd * 2  # q, o; k, v
             + 2 * hd + 3 * h * t.intermediate_size + 2 * h)  # q/k norms, mlp, two norms
    embed = t.vocab_size * h
    dv, m2 = v.hidden_size, v.spatial_merge_size**2
    block = 4 * dv + 3 * dv * dv + 3 * dv + dv * dv + dv + 2 * dv * v.intermediate_size + v.intermediate_size + dv
    merger_fc = (dv * m2) ** 2 + dv * m2 + dv * m2 * v.out_hidden_size + v.out_hidden_size
    vision = (dv * v.patch_dim + dv + v.num_position_embeddings * dv + v.depth * block
              + 2 * dv + merger_fc + spec.num_deepstack * (2 * dv * m2 + merger_fc))
    return {"embed": embed, "text": embed + t.num_layers * layer + h, "vision": vision,
            "lm_head": 0 if t.tie_word_embeddings else embed}


def bundle_bytes(spec: ModelSpec, precision: str = "fp32", weights: str | None = None) -> int:
    """The bundle's size on disk (see the module docstring)."""
    c = parameter_counts(spec)
    n = c["text"] + c["vision"]
    if weights in ("int8", "int4"):
        per = 1.0 if weights == "int8" else 0.5
        return int(c["embed"] * 4 + (n - c["embed"]) * per) + TOKENIZER_BYTES
    return n * (4 if precision == "fp32" else 2) + TOKENIZER_BYTES


def export_ram(spec: ModelSpec, plan: ExportPlan) -> int:
    """Peak RAM of the export itself (module docstring)."""
    c = parameter_counts(spec)
    if plan.graph == "plain":
        return int(GB + 1.1 * 4 * (c["text"] + c["vision"] + c["lm_head"]))
    return int(GB + 2 * 4 * c["embed"])


def validate_ram(spec: ModelSpec, plan: ExportPlan) -> int:
    """Peak RAM of the export's parity check (module docstring)."""
    c = parameter_counts(spec)
    total = c["text"] + c["vision"] + c["lm_head"]
    return int(GB + 4 * total + bundle_bytes(spec, plan.precision, plan.weights))


def probe_machine(paths: list[Path]) -> Machine:
    """Available RAM (MemAvailable, capped by a cgroup limit) and free disk at each path's filesystem."""
    return Machine(ram=_available_ram(), disk={str(p): _free(p) for p in paths})


def _available_ram() -> int | None:
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: the container's limit minus its use
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(found) if found else None


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _free(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def _device(path: Path) -> int:
    return _existing(path).stat().st_dev


def check_download(name: str, download: int, cache: Path, machine: Machine | None = None) -> None:
    """Refuse a download that cannot fit the cache's disk (before any byte is fetched)."""
    machine = machine or probe_machine([cache])
    free = machine.disk.get(str(cache))
    if free is not None and download > free:
        raise PreflightError(f"not enough disk to download {name}: its files need {_gb(download)} in the Hub cache "
                             f"({cache}), {_gb(free)} free there; free space or point HF_HUB_CACHE at a larger disk")


def check_export(name: str, spec: ModelSpec, plan: ExportPlan, download: int, cache: Path,
                 machine: Machine | None = None, warn_only: bool = False) -> None:
    """Compare the export's needs (module docstring) with the machine; refuse (or warn) with the figures."""
    out_dir = plan.output.parent if plan.output.name else plan.output
    machine = machine or probe_machine([cache, out_dir])
    problems = _disk_problems(name, plan, spec, download, cache, out_dir, machine) + _ram_problems(spec, plan, machine)
    if not problems:
        return
    message = f"{name}: " + "; ".join(problems)
    if warn_only:
        log.warning("%s (the export may fail)", message)
        return
    raise PreflightError(message)


def _disk_problems(name: str, plan: ExportPlan, spec: ModelSpec, download: int, cache: Path, out_dir: Path,
                   machine: Machine) -> list[str]:
    bundle = bundle_bytes(spec, plan.precision, plan.weights)
    same = _device(cache) == _device(out_dir)
    needs = [(cache, download + (bundle if same else 0), "the download and the bundle" if same else "the download")]
    if not same:
        needs.append((out_dir, bundle, "the bundle"))
    out = []
    for path, need, what in needs:
        free = machine.disk.get(str(path))
        if free is not None and need > free:
            out.append(f"not enough disk: {what} need {_gb(need)} on the filesystem of {path}, {_gb(free)} free")
    return out


def _ram_problems(spec: ModelSpec, plan: ExportPlan, machine: Machine) -> list[str]:
    if machine.ram is None:
        log.debug("available memory unknown: skipping the memory pre-flight")
        return []
    export, ram = export_ram(spec, plan), machine.ram
    if export > ram:
        return [f"not enough memory: the export needs {_gb(export)} of RAM, {_gb(ram)} available"]
    if plan.validate:
        check = validate_ram(spec, plan)
        if check > ram:
            return [f"not enough memory: the parity check needs {_gb(check)} of RAM (the float32 transformers "
                    f"reference beside the bundle), {_gb(ram)} available; the export alone needs {_gb(export)}: "
                    f"pass {NO_VALIDATE} to export without the check (stamped in the manifest)"]
    return []


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


__all__ = ["ExportPlan", "Machine", "PreflightError", "bundle_bytes", "check_download", "check_export",
           "export_ram", "parameter_counts", "probe_machine", "validate_ram"]
