"""Weight-quantized bundles: int8, int4 (MatMulNBits) and fp16 weights, from an fp32 bundle.

- int8, method "smooth" (the default): calibrated smoothing folded into the norms, per-token
  activations, 7-bit weights, spike-carrying projections kept float (`q3vl.export.quantize.int8`;
  the plan is calibrated on the source checkpoint and stored in the bundle as int8_plan.npz).
  Method "dynamic" (the previous default): ONNX Runtime's dynamic quantization of every MatMul
  with a constant weight (per-channel int8 weights, one activation scale per call) ->
  MatMulInteger / DynamicQuantizeLinear; it breaks on activation outliers (docs/quantization.md).
  Method "nbits": MatMulNBits with 8-bit block-wise weights and accuracy_level 4 (block-wise int8
  activations): outlier-tolerant without calibration, but slower than fp32 on x86 CPUs.
- int4: ONNX Runtime's `MatMulNBitsQuantizer`: blockwise (default block 32) symmetric 4-bit
  weights in the `MatMulNBits` contrib op, `accuracy_level` 4 (int8 compute) for CPU speed.
- fp16: every constant MatMul weight and the token-embedding table stored in float16, with Casts
  around them, so the matmuls run in fp16 while norms, softmax, rotary, the residual stream and
  the heads stay float32 (the "sensitive ops").

The runtime loads the result with no extra arguments: it is a bundle like any other, its manifest
records what was done, and its parity against the fp32 bundle it came from (which was itself
validated against transformers) is measured here on the export-time cases and stored.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.bundle import MANIFEST, Manifest, describe_files, looks_like_bundle, sha256
from q3vl.errors import BundleError, CheckpointError, ConfigError, ParityError, missing_extra, option
from q3vl.export.recipe import QuantizeRecipe
from q3vl.options import of
from q3vl.outputs import check_output, staged_dir
from q3vl.precision import weights_precision
from q3vl.progress import Progress
from q3vl.tolerances import tolerance

log = logging.getLogger(__name__)
DYNAMIC = option("method='dynamic'", "--method dynamic")  # what a message suggests when "smooth" cannot run


def _matmul_weights(model: Any) -> set[str]:
    inits = {i.name for i in model.graph.initializer}
    return {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def _int8(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True,
                                    # the fused graphs' contrib ops defeat ONNX shape inference
                                    "DefaultTensorType": onnx.TensorProto.FLOAT})


def _int4(src: Path, dst: Path, block_size: int, bits: int = 4) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    quant = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4)
    quant.process()
    quant.model.save_model_to_file(str(dst), use_external_data_format=True)


def _fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    targets = _matmul_weights(model) | {n.input[0] for n in g.node if n.op_type == "Gather"
                                        and any(i.name == n.input[0] and len(i.dims) == 2 and i.dims[0] > 10000
                                                for i in g.initializer)}
    for init in g.initializer:
        if init.name in targets and init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    new_nodes: list[Any] = []
    casts: dict[str, str] = {}  # one Cast per activation, shared by the MatMuls that read it (q, k, v)
    for node in g.node:
        if node.op_type == "MatMul" and node.input[1] in targets:
            a16, y16 = casts.get(node.input[0]), node.output[0] + "__fp16"
            if a16 is None:
                a16 = casts[node.input[0]] = node.input[0] + "__fp16"
                new_nodes.append(helper.make_node("Cast", [node.input[0]], [a16], to=TensorProto.FLOAT16,
                                                  name=a16 + "_cast"))
            new_nodes.append(helper.make_node("MatMul", [a16, node.input[1]], [y16], name=node.name))
            new_nodes.append(helper.make_node("Cast", [y16], [node.output[0]], to=TensorProto.FLOAT,
                                              name=node.name + "_cast_out"))
        elif node.op_type == "Gather" and node.input[0] in targets:
            y16 = node.output[0] + "__fp16"
            new_nodes.append(helper.make_node("Gather", list(node.input), [y16], name=node.name,
                                              axis=next((a.i for a in node.attribute if a.name == "axis"), 0)))
            new_nodes.append(helper.make_node("Cast", [y16], [node.output[0]], to=TensorProto.FLOAT,
                                              name=node.name + "_cast_out"))
        else:
            new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale dtypes; ORT re-infers
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)


def _convert(src: Path, dst: Path, weights: str, block_size: int, method: str | None = None,
             plan: Any = None) -> None:
    for f in (dst, dst.with_name(dst.name + ".data")):
        f.unlink(missing_ok=True)
    if weights == "int8" and method == "smooth":
        from q3vl.export.quantize.rewrite import rewrite

        rewrite(src, dst, plan)
    elif weights == "int8" and method == "nbits":
        _int4(src, dst, block_size, bits=8)
    elif weights == "int8":
        _int8(src, dst)
    elif weights == "int4":
        _int4(src, dst, block_size)
    else:
        _fp16(src, dst)


def compare_bundles(base: Path, quantized: Path, weights: str) -> dict[str, Any]:
    """The quantized bundle against the fp32 bundle it came from, on the export-time cases."""
    from q3vl.export.cases import run_cases
    from q3vl.tasks import task_for

    task = task_for(Manifest.read(base).task)
    with task.runtime(base) as ref, task.runtime(quantized, allow_unverified=True) as model:
        report = run_cases(model, ref.run_batch, tolerance(weights_precision(weights)), weights_precision(weights))
    report["against"] = "fp32 bundle"
    report["summary"] += " vs the fp32 bundle"
    return report


def calibration_source(src: Path, manifest: Manifest, checkpoint: str | Path | None) -> Path:
    """The checkpoint int8 method "smooth" calibrates on: `checkpoint`, else the bundle's recorded
    source; it must be the checkpoint the bundle was exported from. Checked before any work.
    """
    ckpt = Path(checkpoint) if checkpoint else Path(manifest.source.get("path", ""))
    if not (ckpt / "config.json").is_file():
        where = f"{ckpt} is not a checkpoint" if checkpoint else f"its recorded source {ckpt} is gone"
        raise ConfigError(f"int8 method 'smooth' calibrates on the checkpoint {src} was exported from, and "
                          f"{where}; pass {option('checkpoint=PATH', '--checkpoint PATH')} or use {DYNAMIC}")
    from q3vl.export.weights import checkpoint_identity

    key = "content_sha256" if manifest.source.get("content_sha256") else "sha256"
    if checkpoint_identity(ckpt)[key] != manifest.source.get(key):
        raise CheckpointError(f"{ckpt} is not the checkpoint {src} was exported from ({key} differs); int8 "
                              "method 'smooth' must calibrate on the bundle's own source")
    return ckpt


def check_smooth(src: Path, manifest: Manifest, checkpoint: str | Path | None, plan: Any = None) -> Path | None:
    """Int8 method "smooth": the bundle must have fused graphs (the plan's folds target their
    initializers); returns the checkpoint to calibrate on, or None when `plan` is calibrated already.
    """
    if any(g.kind != "fused" for g in manifest.graphs.values()):
        raise BundleError(f"{src} has plain graphs; int8 method 'smooth' rewrites the fused graphs (export "
                          f"with --graph fused, or use {DYNAMIC})")
    if plan is not None and plan.projections:
        return None
    return calibration_source(src, manifest, checkpoint)


def quantize_bundle(bundle: str | Path, out_dir: str | Path, weights: str | None = None, *,
                    recipe: QuantizeRecipe | None = None, overwrite: bool = False, progress: bool = True,
                    checkpoint: str | Path | None = None, plan: Any = None, **recipe_keywords: object) -> Path:
    """Write a weight-quantized copy of an fp32 bundle and measure its parity against it.

    Args:
        bundle: an fp32 bundle made by `export_bundle`.
        out_dir: the new bundle (must be absent or empty unless `overwrite`); written beside itself
            and renamed when complete, so a failure or an interruption leaves no `out_dir`.
        weights: "int8" (default), "int4" or "fp16".
        recipe: the `QuantizeRecipe` (format, method, block size, smoothing strength, validated once);
            `weights` and `recipe_keywords` are applied on top.
        overwrite: replace `out_dir` if it is a bundle already.
        progress: report the steps (a bar on a terminal, log lines otherwise).
        checkpoint: int8 "smooth": the checkpoint to calibrate on (default: the bundle's recorded source).
        plan: int8 "smooth": an `Int8Plan`, calibrated (used as is) or empty (its settings are used;
            default: the recipe's `int8_alpha`, or the default search).
        **recipe_keywords: fields of `QuantizeRecipe`: `block_size` (int4 quantization block: 32 keeps
            more accuracy, 128 is smaller), `method` (int8 only: "smooth" (default), "dynamic" or
            "nbits"; module docstring), `int8_alpha`.

    Returns:
        The new bundle directory. Raises `ParityError` (the bundle stays, marked failed) when
        its outputs fall outside the stated tolerance for `weights`.
    """
    keywords = {**({"weights": weights} if weights is not None else {}), **recipe_keywords}
    recipe = of(QuantizeRecipe, keywords, "quantize_bundle", recipe)
    weights, method, block_size = recipe.weights, recipe.int8_method, recipe.block_size
    plan = plan if plan is not None else recipe.int8_plan()
    src, out = Path(bundle), Path(out_dir)
    manifest = check_quantizable(src)
    calibrate_on = check_smooth(src, manifest, checkpoint, plan) if method == "smooth" else None
    check_output(out, overwrite=overwrite, directory=True, replaceable=looks_like_bundle, what="bundle directory")
    require_onnx()
    if calibrate_on is not None:
        from q3vl.checks import require

        require("export", ["torch", "safetensors"])
    total = len(manifest.graphs) + 1 + (calibrate_on is not None)
    with Progress(total, f"quantize {weights}", unit="step", enabled=progress) as steps, \
            staged_dir(out, overwrite=overwrite) as tmp:
        if calibrate_on is not None:
            steps.step(f"int8 calibration on {calibrate_on}")
            from q3vl.export.quantize.calibrate import calibrate
            from q3vl.export.quantize.int8 import Int8Plan

            plan = calibrate(calibrate_on, manifest.task, plan or Int8Plan())
            steps.update()
        _write_quantized(src, tmp, manifest, weights, block_size, steps, method, plan if method == "smooth" else None)
    if not manifest.parity["passed"]:
        raise ParityError(f"{weights} bundle is outside tolerance: {manifest.parity['summary']}", manifest.parity)
    return out


def check_quantizable(src: Path) -> Manifest:
    """The source bundle's manifest, if it is a plain fp32 bundle (what weight quantization starts from)."""
    manifest = Manifest.read(src)
    if any(g.precision != "fp32" for g in manifest.graphs.values()) or manifest.extra.get("quantization"):
        raise BundleError(f"{src} is not a plain fp32 bundle; quantize the fp32 export")
    return manifest


def require_onnx() -> None:
    """The onnx package (the export extra) rewrites the graphs; say so before any work."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise missing_extra("onnx", "export")


def _write_quantized(src: Path, out: Path, manifest: Manifest, weights: str, block_size: int,
                     steps: Progress, method: str | None = None, plan: Any = None) -> None:
    """Quantize each graph of `src` into `out` (the staging directory), then measure parity."""
    from q3vl.export.quantize.int8 import PLAN_FILE

    started = time.perf_counter()
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copyfile(src / name, out / name)
    for graph, meta in manifest.graphs.items():
        steps.step(f"{graph} graph to {weights} weights")
        _convert(src / meta.file, out / meta.file, weights, block_size, method, plan)
        meta.precision = weights_precision(weights)  # type: ignore[assignment]
        steps.update()
    files = [n for n in manifest.files if (out / n).exists()]
    if plan is not None:
        plan.save(out / PLAN_FILE)
        files.append(PLAN_FILE)
    manifest.files = describe_files(out, files)
    manifest.extra["quantization"] = {
        "weights": weights, "method": method, "int8_plan": plan.summary() if plan is not None else None,
        "block_size": block_size if weights == "int4" or method == "nbits" else None,
        "source_bundle": str(src.resolve()), "source_manifest_sha256": sha256(src / MANIFEST),
        "seconds": round(time.perf_counter() - started, 1)}
    manifest.parity = {"passed": None, "summary": "measuring"}
    manifest.write(out)
    steps.step("parity against the fp32 bundle")
    manifest.parity = compare_bundles(src, out, weights)
    manifest.write(out)
    steps.update()
