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
from q3vl.export.quantize.int8 import PLAN_FILE, plan_for_alpha
from q3vl.export.quantize.quantized import Int8Hook, NBitsHook
from q3vl.export.recipe import ExportRecipe
from q3vl.export.weights import Weights, check_checkpoint, checkpoint_identity, read_chat_template
from q3vl.hub.card import write_card
from q3vl.hub.preflight import ExportPlan
from q3vl.options import of
from q3vl.outputs import check_output, staged_dir
from q3vl.precision import GRAPH_KINDS, GRAPH_PRECISIONS, weights_precision
from q3vl.progress import Progress
from q3vl.spec import ModelSpec, check_processor_configs
from q3vl.tasks import TASKS, Task, task_for

log = logging.getLogger(__name__)
PRECISIONS, GRAPHS = GRAPH_PRECISIONS, GRAPH_KINDS  # what `export_bundle` accepts
TASK_EMBEDDING, TASK_RERANKER = "task='embedding'", "task='reranker'"


def detect_task(checkpoint: Path, hint: str = "") -> Task:
    """The task from the checkpoint's name (directory, `_name_or_path`, or `hint`: the Hub repo id it came
    from): "...Reranker..." or "...Embedding...".
    """
    cfg = json.loads((checkpoint / "config.json").read_text())
    names = f"{checkpoint.resolve().name} {cfg.get('_name_or_path', '')} {hint}".lower()
    found = [t for t in TASKS.values() if t.name_hint in names]
    if len(found) != 1:
        raise CheckpointError(f"cannot tell whether {checkpoint} is an embedding or a reranker checkpoint "
                              f"from its name; pass {option(TASK_EMBEDDING, '--task embedding')} or "
                              f"{option(TASK_RERANKER, '--task reranker')}")
    return found[0]


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
                  progress: bool = True, int8_plan: Any = None, token: str | None = None, preflight: bool = True,
                  **recipe_keywords: object) -> Path:
    """Export a Qwen3-VL-Embedding/Reranker checkpoint to a self-contained, validated bundle.

    Args:
        checkpoint: Hugging Face format directory (config.json, safetensors, tokenizer files), or a Hub
            repo id `namespace/name[@revision]` (an existing local path wins): only the files the
            export needs are downloaded into the Hub cache (`q3vl.hub.checkpoint`), and the repo id and
            commit sha are recorded in the manifest. Needs the `hub` extra.
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
        token: Hub token for a private or gated repo (default: `HF_TOKEN` or the stored login).
        preflight: compare the memory and disk the export needs with what the machine has first
            (`q3vl.hub.preflight`): a Hub export that cannot fit is refused before its weights are
            downloaded; a local one gets a warning.

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
    int8_plan = int8_plan if int8_plan is not None else plan_for_alpha(recipe.int8_alpha)
    out = Path(out_dir)
    if precision == "bf16" and validate:
        _require_bf16_kernels()
    check_output(out, overwrite=overwrite, directory=True, replaceable=looks_like_bundle, what="bundle directory")
    source = _checkpoint(checkpoint, ExportPlan(precision, graph, weights, validate, out), token, preflight, progress)
    ckpt = source.path
    check_checkpoint(ckpt)
    spec = ModelSpec.from_checkpoint(ckpt)
    check_processor_configs(ckpt, spec)
    kind = task_for(task) if task != "auto" else detect_task(ckpt, source.repo.repo_id if source.repo else "")
    tokenizer = TextTokenizer(ckpt / "tokenizer.json")
    token_ids = {**tokenizer.special.as_dict(), **kind.head_token_ids(tokenizer)}
    template = read_chat_template(ckpt)
    calibrating = weights == "int8" and not (int8_plan is not None and int8_plan.projections)
    with Progress((3 if validate else 2) + calibrating, "export", unit="step", enabled=progress) as steps, \
            staged_dir(out, overwrite=overwrite) as tmp:
        if calibrating:
            steps.step("int8 calibration")
        quant = _quant_hook(ckpt, kind, weights, block_size, int8_plan)
        if calibrating:
            steps.update()
        origin = {**source.source(), "command": _command(checkpoint, out, precision, task, graph, weights, validate),
                  "bundle": str(out)}
        manifest = _write_bundle(ckpt, tmp, spec, kind, precision, graph, token_ids, template, validate, steps,
                                 quant, origin)
    if validate and not manifest.parity["passed"]:
        raise ParityError(f"exported graphs do not match transformers: {manifest.parity['summary']}",
                          manifest.parity)
    return out


def _checkpoint(source: str | Path, plan: ExportPlan, token: str | None, preflight: bool, progress: bool) -> Any:
    """The checkpoint folder (a Hub id is downloaded after its pre-flight); a local one gets the pre-flight
    figures as a warning.
    """
    from q3vl.hub.checkpoint import resolve_checkpoint

    resolved = resolve_checkpoint(source, plan, token=token, check_resources=preflight, progress=progress)
    if resolved.repo is None and preflight and (resolved.path / "config.json").is_file():
        from q3vl.hub.preflight import check_export

        check_export(str(resolved.path), ModelSpec.from_checkpoint(resolved.path), plan, 0, plan.output,
                     warn_only=True)
    return resolved


def _command(source: str | Path, out: Path, precision: str, task: str, graph: str, weights: str | None,
             validate: bool) -> str:
    """The `q3vl export` command line that makes this bundle (the model card's recipe)."""
    parts = ["q3vl export", str(source), "-o", out.name]
    for flag, value, default in (("--precision", precision, "fp32"), ("--task", task, "auto"),
                                 ("--graph", graph, "fused"), ("--weights", weights, None)):
        if value != default:
            parts += [flag, str(value)]
    return " ".join(parts + ([] if validate else ["--no-validate"]))


def _write_bundle(ckpt: Path, out: Path, spec: ModelSpec, kind: Task, precision: str, graph: str,
                  token_ids: dict[str, int], template: str, validate: bool, steps: Progress,
                  quant: Any = None, origin: dict[str, Any] | None = None) -> Manifest:
    """Graphs, tokenizer, template, manifest and model card into `out` (the staging directory), then validation.

    `quant` (a `q3vl.export.quantize.quantized` hook, fused fp32 graphs only) writes the weights quantized;
    the graphs are then recorded, and validated, at that weight format's precision. `origin`: the Hub
    repo id, revision and commit sha (recorded in the manifest's source) and the export command.
    """
    origin = dict(origin or {})
    final = origin.pop("bundle", str(out))
    started = time.perf_counter()
    if graph == "fused":
        seconds = _build_fused(ckpt, out, spec, kind, precision, token_ids, steps, quant)
    else:
        seconds = _export_graphs(ckpt, out, spec, kind, precision, token_ids, steps)
    shutil.copyfile(ckpt / "tokenizer.json", out / "tokenizer.json")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    names = ["vision.onnx", "vision.onnx.data", "text.onnx", "text.onnx.data", "tokenizer.json",
             "chat_template.jinja"]
    extra: dict[str, Any] = {"export": {"seconds": seconds, "command": origin.pop("command", None)}}
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
        source={**checkpoint_identity(ckpt), **({"name": origin["repo_id"]} if "repo_id" in origin else {}), **origin},
        parity={"passed": None, "summary": "not validated (validate=False)"},
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
    write_card(out, final)
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
