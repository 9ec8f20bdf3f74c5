"""`export_bundle`: checkpoint -> validated bundle (graphs, tokenizer, template, manifest)."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from q3vl.bundle import GraphEntry, Manifest, describe_files, looks_like_bundle
from q3vl.errors import CheckpointError, ConfigError, ParityError, missing_extra, option
from q3vl.export.onnx_export import export_graph, text_example, vision_example
from q3vl.export.quantize.int8 import PLAN_FILE
from q3vl.export.quantize.quantized import Int8Hook, NBitsHook
from q3vl.export.recipe import ExportRecipe
from q3vl.export.weights import Weights, check_checkpoint, checkpoint_identity
from q3vl.options import of
from q3vl.outputs import check_output, staged_dir
from q3vl.precision import GRAPH_KINDS, GRAPH_PRECISIONS, weights_precision
from q3vl.progress import Progress
from q3vl.spec import ModelSpec
from q3vl.tasks import TASKS, Task, task_for

log = logging.getLogger(__name__)
PRECISIONS, GRAPHS = GRAPH_PRECISIONS, GRAPH_KINDS  # what `export_bundle` accepts
TASK_EMBEDDING, TASK_RERANKER = "task='embedding'", "task='reranker'"


def detect_task(checkpoint: Path) -> Task:
    """The task from the checkpoint's name (directory or `_name_or_path`): "...Reranker..." or "...Embedding..."."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    names = f"{checkpoint.resolve().name} {cfg.get('_name_or_path', '')}".lower()
    found = [t for t in TASKS.values() if t.name_hint in names]
    if len(found) != 1:
        raise CheckpointError(f"cannot tell whether {checkpoint} is an embedding or a reranker checkpoint "
                              f"from its name; pass {option(TASK_EMBEDDING, '--task embedding')} or "
                              f"{option(TASK_RERANKER, '--task reranker')}")
    return found[0]


def _chat_template(checkpoint: Path) -> str:
    for name, key in (("chat_template.jinja", None), ("chat_template.json", "chat_template"),
                      ("tokenizer_config.json", "chat_template")):
        path = checkpoint / name
        if path.is_file():
            if key is None:
                return path.read_text(encoding="utf-8")
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
            if isinstance(value, str):
                return value
    raise CheckpointError(f"checkpoint {checkpoint} has no chat template (chat_template.jinja/.json)")


def _require_bf16_kernels() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ConfigError("bf16 graphs need an ONNX Runtime provider with bf16 kernels (CUDA); this "
                         "onnxruntime has only the CPU provider, which cannot run or validate them. Export "
                         f"fp16 instead, or pass {option('validate=False', '--no-validate')} to write an "
                         "unvalidated bf16 bundle for the CUDA backend")


def _torch_dtype(precision: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _quant_hook(ckpt: Path, task: Task, weights: str | None, block_size: int, plan: Any) -> Any:
    """The builders' MatMul hook for `weights` (None: plain float graphs); int8 calibrates its plan here."""
    if weights is None:
        return None
    if weights == "int4":
        return NBitsHook(4, block_size)
    from q3vl.export.quantize.calibrate import calibrate
    from q3vl.export.quantize.int8 import Int8Plan

    return Int8Hook(plan if plan is not None and plan.projections else calibrate(ckpt, task.name, plan or Int8Plan()))


def _build_fused(ckpt: Path, out: Path, spec: ModelSpec, task: Task, precision: str,
                 token_ids: dict[str, int], steps: Progress, quant: Any = None) -> dict[str, float]:
    from q3vl.export.fused_text import TextGraph
    from q3vl.export.fused_vision import VisionGraph

    weights, seconds = Weights(ckpt), {}
    steps.step("vision graph")
    t0 = time.perf_counter()
    VisionGraph(spec, weights, out / "vision.onnx", precision, quant).build()
    seconds["vision"] = time.perf_counter() - t0
    steps.update()
    steps.step("text graph")
    t0 = time.perf_counter()
    TextGraph(spec, weights, out / "text.onnx", task, token_ids, precision, quant).build()
    seconds["text"] = time.perf_counter() - t0
    steps.update()
    return seconds


def _export_graphs(ckpt: Path, out: Path, spec: ModelSpec, task: Task, precision: str,
                   token_ids: dict[str, int], steps: Progress) -> dict[str, float]:
    from q3vl.export.modules import TextEncoder, VisionEncoder

    weights, dtype, seconds = Weights(ckpt), _torch_dtype(precision), {}
    steps.step("vision graph")
    t0 = time.perf_counter()
    vision = VisionEncoder(spec, weights, dtype).eval()
    export_graph(vision, vision_example(spec.vision.patch_dim, round(spec.vision.num_position_embeddings**0.5)),
                 out / "vision.onnx", "vision", ("visual_embeds", "deepstack_embeds"))
    del vision
    gc.collect()
    seconds["vision"] = time.perf_counter() - t0
    steps.update()
    steps.step("text graph")
    t0 = time.perf_counter()
    text = TextEncoder(spec, weights, task, token_ids, dtype).eval()
    export_graph(text, text_example(spec.text.hidden_size, spec.num_deepstack, spec.image_token_id),
                 out / "text.onnx", "text", task.outputs)
    del text
    gc.collect()
    seconds["text"] = time.perf_counter() - t0
    steps.update()
    return seconds


def _check_graphs(out: Path) -> None:
    import onnx

    for name in ("vision.onnx", "text.onnx"):
        onnx.checker.check_model(str(out / name), full_check=False)


def export_bundle(checkpoint: str | Path, out_dir: str | Path, precision: str | None = None, task: str = "auto", *,
                  recipe: ExportRecipe | None = None, overwrite: bool = False, validate: bool = True,
                  progress: bool = True, int8_plan: Any = None, **recipe_keywords: object) -> Path:
    """Export a Qwen3-VL-Embedding/Reranker checkpoint to a self-contained, validated bundle.

    Args:
        checkpoint: Hugging Face format directory (config.json, safetensors, tokenizer files).
        out_dir: bundle directory to create (must be absent or empty unless `overwrite`). It is
            written beside itself under a hidden name and renamed when complete, so a failed or
            interrupted export leaves no `out_dir` behind.
        precision: "fp32" (default), "fp16" or "bf16" for the graphs' weights and matmuls (norms,
            softmax, residual stream and heads stay float32).
        task: "embedding", "reranker" or "auto" (from the checkpoint's name).
        recipe: the `ExportRecipe` (graph kind x precision x weights, validated once); `precision`
            and `recipe_keywords` are applied on top. `graph`: "fused" (ONNX Runtime contrib ops: fused
            attention, rotary, norms; the fast default) or "plain" (traced with torch.onnx, standard ops
            only: the parity baseline, and what runtimes without ORT's contrib ops need). Both are
            held to the same parity tests. `weights`: None, or "int8" / "int4" to write quantized
            weights straight from the checkpoint tensors (fused fp32 graphs only): int8 with the
            calibrated smoothing plan of `q3vl quantize --weights int8`, int4 as MatMulNBits (in
            blocks of `block_size`). Parity is checked against transformers with the weight
            format's tolerance.
        **recipe_keywords: fields of `ExportRecipe` (`graph`, `weights`, `block_size`, `int8_alpha`).
        validate: run onnx.checker, load in ONNX Runtime and check parity against transformers; the
            report goes into the manifest and a failure raises `ParityError` (the bundle is kept,
            marked failed). When False, the manifest says parity was skipped.
        overwrite: replace `out_dir` if it already holds a bundle.
        progress: report the export steps (a bar on a terminal, log lines otherwise).
        int8_plan: int8 only: an `Int8Plan`, used as is when filled in, else its settings are
            used to calibrate one here (default: the recipe's `int8_alpha`, or the default search).

    Returns:
        The bundle directory.
    """
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise missing_extra("torch", "export") from e
    from q3vl.preprocess.prompt import TextTokenizer

    keywords = {**({"precision": precision} if precision is not None else {}), **recipe_keywords}
    recipe = of(ExportRecipe, keywords, "export_bundle", recipe or ExportRecipe())
    precision, graph, weights, block_size = recipe.precision, recipe.kind, recipe.weights, recipe.block_size
    int8_plan = int8_plan if int8_plan is not None else recipe.int8_plan()
    ckpt, out = Path(checkpoint), Path(out_dir)
    check_checkpoint(ckpt)
    spec = ModelSpec.from_checkpoint(ckpt)
    if precision == "bf16" and validate:
        _require_bf16_kernels()
    kind = task_for(task) if task != "auto" else detect_task(ckpt)
    check_output(out, overwrite=overwrite, directory=True, replaceable=looks_like_bundle, what="bundle directory")
    tokenizer = TextTokenizer(ckpt / "tokenizer.json")
    token_ids = {**tokenizer.special.as_dict(), **kind.head_token_ids(tokenizer)}
    template = _chat_template(ckpt)
    calibrating = weights == "int8" and not (int8_plan is not None and int8_plan.projections)
    with Progress((3 if validate else 2) + calibrating, "export", unit="step", enabled=progress) as steps, \
            staged_dir(out, overwrite=overwrite) as tmp:
        if calibrating:
            steps.step("int8 calibration")
        quant = _quant_hook(ckpt, kind, weights, block_size, int8_plan)
        if calibrating:
            steps.update()
        manifest = _write_bundle(ckpt, tmp, spec, kind, precision, graph, token_ids, template, validate, steps,
                                 quant)
    if validate and not manifest.parity["passed"]:
        raise ParityError(f"exported graphs do not match transformers: {manifest.parity['summary']}",
                          manifest.parity)
    return out


def _write_bundle(ckpt: Path, out: Path, spec: ModelSpec, kind: Task, precision: str, graph: str,
                  token_ids: dict[str, int], template: str, validate: bool, steps: Progress,
                  quant: Any = None) -> Manifest:
    """Graphs, tokenizer, template and manifest into `out` (the staging directory), then validation.

    `quant` (a `q3vl.export.quantize.quantized` hook, fused fp32 graphs only) writes the weights quantized;
    the graphs are then recorded, and validated, at that weight format's precision.
    """
    started = time.perf_counter()
    if graph == "fused":
        seconds = _build_fused(ckpt, out, spec, kind, precision, token_ids, steps, quant)
    else:
        seconds = _export_graphs(ckpt, out, spec, kind, precision, token_ids, steps)
    shutil.copyfile(ckpt / "tokenizer.json", out / "tokenizer.json")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    names = ["vision.onnx", "vision.onnx.data", "text.onnx", "text.onnx.data", "tokenizer.json",
             "chat_template.jinja"]
    extra: dict[str, Any] = {"export": {"seconds": seconds}}
    if quant is not None:
        extra["quantization"] = {**quant.summary(), "at_export": True}
        if isinstance(quant, Int8Hook):
            quant.plan.save(out / PLAN_FILE)
            names.append(PLAN_FILE)
    gp = weights_precision(quant.weights) if quant is not None else precision  # the graphs' recorded precision
    manifest = Manifest(
        task=kind.name, spec=spec, token_ids=token_ids,
        graphs={"vision": GraphEntry("vision.onnx", gp, graph, ["visual_embeds", "deepstack_embeds"]),  # type: ignore[arg-type]
                "text": GraphEntry("text.onnx", gp, graph, list(kind.outputs))},  # type: ignore[arg-type]
        preprocess={"patch_size": spec.vision.patch_size, "temporal_patch_size": spec.vision.temporal_patch_size,
                    "merge_size": spec.vision.spatial_merge_size, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        source=checkpoint_identity(ckpt), parity={"passed": None, "summary": "not validated (validate=False)"},
        files=describe_files(out, names), extra=extra)
    manifest.write(out)
    if validate:
        steps.step("validation against transformers")
        _check_graphs(out)
        from q3vl.export.parity import check as parity_check

        manifest.parity = parity_check(out, ckpt, kind.name, gp, backend="cuda" if precision == "bf16" else "cpu")
        steps.update()
    manifest.extra["export"]["total_seconds"] = round(time.perf_counter() - started, 1)
    manifest.write(out)
    return manifest


def summary(out: Path) -> str:
    """Human-readable summary of a bundle: files, sizes, parity."""
    m = Manifest.read(out)
    lines = [f"bundle {out} ({m.task}, {m.precision})"]
    lines += [f"  {name:24s} {meta['size'] / 1e6:10.1f} MB" for name, meta in m.files.items()]
    lines.append(f"  total {sum(f['size'] for f in m.files.values()) / 1e6:.1f} MB")
    status = {True: "PASSED", False: "FAILED", None: "not run"}[m.parity.get("passed")]
    lines.append(f"  parity: {status}: {m.parity.get('summary')}")
    return "\n".join(lines)
