"""Weight-quantized bundles: int8, int4 (MatMulNBits) and fp16 weights, from an fp32 bundle.

- int8, method "smooth" (the default): calibrated smoothing folded into the norms, per-token
  activations, 7-bit weights, spike-carrying projections kept float (`q3vl.quantization.int8`;
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.bundle import EMBEDDING, MANIFEST, SCORE, Manifest, describe_files, sha256
from q3vl.errors import BundleError, ParityError
from q3vl.tolerances import tolerance

log = logging.getLogger(__name__)
WEIGHTS = ("int8", "int4", "fp16")
INT8_METHODS = ("smooth", "dynamic", "nbits")
PLAN_FILE = "int8_plan.npz"


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
        from q3vl.quantization.rewrite import rewrite

        rewrite(src, dst, plan)
    elif weights == "int8" and method == "nbits":
        _int4(src, dst, block_size, bits=8)
    elif weights == "int8":
        _int8(src, dst)
    elif weights == "int4":
        _int4(src, dst, block_size)
    else:
        _fp16(src, dst)


def compare_bundles(base: Path, quantized: Path, task: str) -> dict[str, Any]:
    """Outputs of the quantized bundle against the fp32 bundle on the export-time parity cases."""
    from q3vl.export.parity import cases
    from q3vl.preprocess.items import Content, EmbedItem
    from q3vl.runtime import Embedder, Reranker

    cls = Embedder if task == "embedding" else Reranker
    a, b = cls(base), cls(quantized, allow_unverified=True)
    rows: dict[str, Any] = {}
    for name, contents in cases().items():
        if task == "embedding":
            seqs = [a.encoder.embedding(EmbedItem(c, None, None, None), "Represent the user's input.")
                    for c in contents]
        else:
            q = Content(("which picture shows a gradient?",), (), ())
            seqs = [a.encoder.rerank_pair(q, c, "Retrieve.", None, None) for c in contents]
        blocks = [a.encoder.load(s.media) for s in seqs]
        ra, rb = a.runner.run(seqs, blocks), b.runner.run(seqs, blocks)
        if task == "embedding":
            x, y = ra[EMBEDDING].astype(np.float64), rb[EMBEDDING].astype(np.float64)
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            rows[name] = {"embed_min_cos": float(cos.min()), "finite": bool(np.isfinite(y).all())}
        else:
            rows[name] = {"score_max_abs_diff": float(np.abs(ra[SCORE] - rb[SCORE]).max()),
                          "finite": bool(np.isfinite(rb[SCORE]).all())}
    return rows


def _int8_plan(src: Path, manifest: Manifest, checkpoint: str | Path | None, plan: Any) -> Any:
    """The calibrated plan for method "smooth": `plan` if it is filled in, else calibrated (with its
    settings, or the defaults) on the bundle's source checkpoint, which must still be the same one.
    """
    from q3vl.quantization.int8 import Int8Plan

    if plan is not None and plan.projections:
        return plan
    if any(g.get("kind") != "fused" for g in manifest.graphs.values()):
        raise BundleError(f"{src} has plain graphs; int8 method 'smooth' rewrites the fused graphs "
                          "(export with --graph fused, or use method 'dynamic')")
    ckpt = Path(checkpoint) if checkpoint else Path(manifest.source.get("path", ""))
    if not (ckpt / "config.json").is_file():
        raise BundleError(f"int8 method 'smooth' calibrates on the source checkpoint, and {ckpt} is not one; "
                          "pass checkpoint= (--checkpoint) or use method 'dynamic'")
    from q3vl.export.weights import checkpoint_identity

    if checkpoint_identity(ckpt)["sha256"] != manifest.source.get("sha256"):
        raise BundleError(f"{ckpt} is not the checkpoint {src} was exported from (hash differs)")
    from q3vl.export.calibrate import calibrate

    return calibrate(ckpt, manifest.task, plan or Int8Plan())


def quantize_bundle(bundle: str | Path, out_dir: str | Path, weights: str = "int8", *, block_size: int = 32,
                    overwrite: bool = False, method: str | None = None, checkpoint: str | Path | None = None,
                    plan: Any = None) -> Path:
    """Write a weight-quantized copy of an fp32 bundle and measure its parity against it.

    Args:
        bundle: an fp32 bundle made by `export_bundle`.
        out_dir: the new bundle (must be empty unless `overwrite`).
        weights: "int8", "int4" or "fp16".
        block_size: int4 quantization block (32 keeps more accuracy, 128 is smaller).
        overwrite: replace `out_dir` if it is a bundle already.
        method: int8 only: "smooth" (default), "dynamic" or "nbits" (module docstring).
        checkpoint: int8 "smooth": the checkpoint to calibrate on (default: the bundle's recorded source).
        plan: int8 "smooth": an `Int8Plan`, calibrated (used as is) or empty (its settings are used).

    Returns:
        The new bundle directory. Raises `ParityError` (the bundle stays, marked failed) when
        its outputs fall outside the stated tolerance for `weights`.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, not {weights!r}")
    method = method or ("smooth" if weights == "int8" else None)
    if (weights == "int8") != (method in INT8_METHODS):
        raise ValueError(f"method is for int8 weights, one of {INT8_METHODS}; got {method!r} for {weights}")
    src, out = Path(bundle), Path(out_dir)
    manifest = Manifest.read(src)
    if any(g["precision"] != "fp32" for g in manifest.graphs.values()) or manifest.extra.get("quantization"):
        raise BundleError(f"{src} is not a plain fp32 bundle; quantize the fp32 export")
    plan = _int8_plan(src, manifest, checkpoint, plan) if method == "smooth" else None
    if out.exists() and any(out.iterdir()):
        if not overwrite or not (out / "q3vl.json").exists():
            raise FileExistsError(f"output directory {out} is not empty (pass overwrite=True for an old bundle)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copyfile(src / name, out / name)
    for graph, meta in manifest.graphs.items():
        log.info("quantizing %s graph to %s weights", graph, weights)
        _convert(src / meta["file"], out / meta["file"], weights, block_size, method, plan)
        meta["precision"] = f"{weights}-weights"
    files = [n for n in manifest.files if (out / n).exists()]
    if plan is not None:
        plan.save(out / PLAN_FILE)
        files.append(PLAN_FILE)
    manifest.files = describe_files(out, files)
    tol = tolerance(f"{weights}-weights")
    manifest.extra["quantization"] = {
        "weights": weights, "method": method, "int8_plan": plan.summary() if plan is not None else None,
        "block_size": block_size if weights == "int4" or method == "nbits" else None,
        "source_bundle": str(src.resolve()), "source_manifest_sha256": sha256(src / MANIFEST),
        "seconds": round(time.perf_counter() - started, 1)}
    manifest.parity = {"passed": None, "summary": "measuring"}
    manifest.write(out)
    rows = compare_bundles(src, out, manifest.task)
    if manifest.task == "embedding":
        key, worst = "embed_min_cos", min(r["embed_min_cos"] for r in rows.values())
    else:
        key, worst = "score_max_abs_diff", max(r["score_max_abs_diff"] for r in rows.values())
    ok = (worst >= tol.embed_cos if key == "embed_min_cos" else worst <= tol.score_abs) and all(
        r["finite"] for r in rows.values())
    manifest.parity = {"passed": ok, "against": "fp32 bundle", "cases": rows, key: worst, "tolerance": asdict(tol),
                       "summary": f"{key} {worst:.6f} vs the fp32 bundle ({weights} weights)"}
    manifest.write(out)
    if not ok:
        raise ParityError(f"{weights} bundle is outside tolerance: {manifest.parity['summary']}", manifest.parity)
    return out
