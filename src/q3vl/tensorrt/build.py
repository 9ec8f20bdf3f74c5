"""`q3vl trt build`: TensorRT engines from a bundle's plain graphs, recorded in its manifest.

Written against TensorRT 10's documented Python API (`tensorrt.Builder`, `OnnxParser`,
`IBuilderConfig`, optimization profiles, timing cache). TensorRT cannot be installed on the
machines q3vl is developed on: this module is exercised only where TensorRT exists (tests marked
`tensorrt`); what can be checked without it (profiles, the static op check, the manifest entry,
the errors) is tested everywhere.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from q3vl.bundle import Manifest, describe_files
from q3vl.errors import BackendUnavailableError, BundleError
from q3vl.outputs import partial_name
from q3vl.precision import ENGINE_PRECISIONS, check
from q3vl.tensorrt.profiles import Limits, Profile, profiles
from q3vl.tensorrt.support import check_graph

log = logging.getLogger(__name__)


def require_tensorrt() -> Any:
    """Import tensorrt or explain what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(
            "TensorRT is not installed (pip install tensorrt-cu12 or tensorrt-cu13 matching your CUDA, on a "
            "machine with an NVIDIA GPU); the ONNX Runtime CUDA backend works without it") from e
    return trt


def check_bundle_for_tensorrt(bundle: Path) -> Manifest:
    """The bundle must hold plain graphs whose every op/dtype TensorRT 10 supports."""
    manifest = Manifest.read(bundle)
    kinds = {m.kind for m in manifest.graphs.values()}
    if kinds != {"plain"}:
        raise BundleError(f"{bundle} holds {sorted(kinds)} graphs; TensorRT needs the plain graphs (their fused "
                          "variants use ONNX Runtime contrib ops): export with --graph plain")
    if manifest.extra.get("quantization"):
        raise BundleError(f"{bundle} is weight-quantized for ONNX Runtime; build engines from the fp32/fp16 bundle")
    for graph, meta in manifest.graphs.items():
        report = check_graph(bundle / meta.file)
        if not report.ok:
            raise BundleError(f"{graph} graph is not TensorRT-compatible: {report.summary()}")
    return manifest


def _build_one(trt: Any, onnx_path: Path, engine_path: Path, profile: Profile, precision: str,
               cache: Any, workspace_gb: float) -> Any:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 1024**3))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.shapes.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"TensorRT failed to build an engine for {onnx_path} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    return config.get_timing_cache()


def build_engines(bundle: str | Path, limits: Limits | None = None, precision: str = "fp16",
                  workspace_gb: float = 8.0) -> Manifest:
    """Build `vision.engine` and `text.engine` in the bundle and record them (with profiles) in its manifest."""
    check(precision, ENGINE_PRECISIONS, "engine precision")
    bundle, limits = Path(bundle), limits or Limits()
    manifest = check_bundle_for_tensorrt(bundle)
    trt = require_tensorrt()
    profs = profiles(manifest.spec, limits)
    cache_path = bundle / "timing.cache"
    probe = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_builder_config()
    cache = probe.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    engines: dict[str, Any] = {}
    staged: dict[Path, Path] = {}  # partial -> final: engines appear in the bundle together, or not at all
    try:
        for graph, meta in manifest.graphs.items():
            t0 = time.perf_counter()
            engine = bundle / f"{graph}.engine"
            staged[partial_name(engine)] = engine
            cache = _build_one(trt, bundle / meta.file, partial_name(engine), profs[graph], precision, cache,
                               workspace_gb)
            engines[graph] = {"file": engine.name, "precision": precision, "profile": profs[graph].to_dict(),
                              "seconds": round(time.perf_counter() - t0, 1)}
            log.info("built %s in %.0f s", engine.name, engines[graph]["seconds"])
        staged[partial_name(cache_path)] = cache_path
        partial_name(cache_path).write_bytes(bytes(cache.serialize()))
    except BaseException:
        for partial in staged:
            partial.unlink(missing_ok=True)
        raise
    for partial, final in staged.items():
        os.replace(partial, final)
    manifest.extra["tensorrt"] = {"version": trt.__version__, "limits": limits.to_dict(), "engines": engines}
    manifest.files.update(describe_files(bundle, [e["file"] for e in engines.values()]))
    manifest.write(bundle)
    return manifest
