"""`export_bundle`: checkpoint -> validated bundle (graphs, tokenizer, template, manifest)."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from q3vl.bundle import MANIFEST, TEXT_OUTPUTS, Manifest, describe_files
from q3vl.errors import CheckpointError, ParityError, missing_extra
from q3vl.export.onnx_export import export_graph, text_example, vision_example
from q3vl.export.weights import Weights, check_checkpoint, checkpoint_identity
from q3vl.spec import ModelSpec

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "bf16")
GRAPHS = ("fused", "plain")
WEIGHT_FORMATS = ("int8", "int4")


def detect_task(checkpoint: Path) -> str:
    """"embedding" or "reranker" from the checkpoint's name (directory or `_name_or_path`)."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    names = f"{checkpoint.resolve().name} {cfg.get('_name_or_path', '')}".lower()
    found = [t for t, key in (("reranker", "rerank"), ("embedding", "embed")) if key in names]
    if len(found) != 1:
        raise CheckpointError(f"cannot tell whether {checkpoint} is an embedding or a reranker checkpoint "
                              "from its name; pass task='embedding' or task='reranker' (--task)")
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


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; pass overwrite=True (--overwrite)")
        if not (out / MANIFEST).is_file() and not any(out.glob("*.onnx")):
            raise FileExistsError(f"refusing to overwrite {out}: it does not look like a q3vl bundle")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _require_bf16_kernels() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError("bf16 graphs need an ONNX Runtime provider with bf16 kernels (CUDA); this "
                         "onnxruntime has only the CPU provider, which cannot run or validate them. Export "
                         "fp16 instead, or pass validate=False (--no-validate) to write an unvalidated bf16 "
                         "bundle for the CUDA backend")


def _torch_dtype(precision: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _quant_hook(ckpt: Path, task: str, weights: str | None, block_size: int, plan: Any) -> Any:
    """The builders' MatMul hook for `weights` (None: plain float graphs); int8 calibrates its plan here."""
    if weights is None:
        return None
    from q3vl.export.quantized import Int8Hook, NBitsHook

    if weights == "int4":
        return NBitsHook(4, block_size)
    from q3vl.export.calibrate import calibrate
    from q3vl.quantization.int8 import Int8Plan

    return Int8Hook(plan if plan is not None and plan.projections else calibrate(ckpt, task, plan or Int8Plan()))


def _build_fused(ckpt: Path, out: Path, spec: ModelSpec, task: str, precision: str,
                 yes_no: tuple[int, int] | None, steps: Any, quant: Any = None) -> dict[str, float]:
    from q3vl.export.fused_text import TextGraph
    from q3vl.export.fused_vision import VisionGraph

    weights, seconds = Weights(ckpt), {}
    steps.set_description("vision graph")
    t0 = time.perf_counter()
    VisionGraph(spec, weights, out / "vision.onnx", precision, quant).build()
    seconds["vision"] = time.perf_counter() - t0
    steps.update()
    steps.set_description("text graph")
    t0 = time.perf_counter()
    TextGraph(spec, weights, out / "text.onnx", task, yes_no, precision, quant).build()
    seconds["text"] = time.perf_counter() - t0
    steps.update()
    return seconds


def _export_graphs(ckpt: Path, out: Path, spec: ModelSpec, task: str, precision: str,
                   yes_no: tuple[int, int] | None, steps: Any) -> dict[str, float]:
    from q3vl.export.modules import TextEncoder, VisionEncoder

    weights, dtype, seconds = Weights(ckpt), _torch_dtype(precision), {}
    steps.set_description("vision graph")
    t0 = time.perf_counter()
    vision = VisionEncoder(spec, weights, dtype).eval()
    export_graph(vision, vision_example(spec.vision.patch_dim, round(spec.vision.num_position_embeddings**0.5)),
                 out / "vision.onnx", "vision", ("visual_embeds", "deepstack_embeds"))
    del vision
    gc.collect()
    seconds["vision"] = time.perf_counter() - t0
    steps.update()
    steps.set_description("text graph")
    t0 = time.perf_counter()
    text = TextEncoder(spec, weights, task, yes_no, dtype).eval()
    export_graph(text, text_example(spec.text.hidden_size, spec.num_deepstack, spec.image_token_id),
                 out / "text.onnx", "text", TEXT_OUTPUTS[task])
    del text
    gc.collect()
    seconds["text"] = time.perf_counter() - t0
    steps.update()
    return seconds


def _check_args(graph: str, precision: str, weights: str | None, validate: bool) -> None:
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, not {graph!r}")
    if graph == "fused" and precision == "bf16":
        raise ValueError("fused graphs are built in fp32 or fp16; export bf16 with graph='plain'")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if weights is not None and (weights not in WEIGHT_FORMATS or graph != "fused" or precision != "fp32"):
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, with the fused fp32 graphs (got weights="
                         f"{weights!r}, graph={graph!r}, precision={precision!r})")
    if precision == "bf16" and validate:
        _require_bf16_kernels()


def _check_graphs(out: Path) -> None:
    import onnx

    for name in ("vision.onnx", "text.onnx"):
        onnx.checker.check_model(str(out / name), full_check=False)


def export_bundle(checkpoint: str | Path, out_dir: str | Path, precision: str = "fp32", task: str = "auto", *,
                  graph: str = "fused", overwrite: bool = False, validate: bool = True, progress: bool = True,
                  weights: str | None = None, block_size: int = 32, int8_plan: Any = None) -> Path:
    """Export a Qwen3-VL-Embedding/Reranker checkpoint to a self-contained, validated bundle.

    Args:
        checkpoint: Hugging Face format directory (config.json, safetensors, tokenizer files).
        out_dir: bundle directory to create (must be empty unless `overwrite`).
        precision: "fp32", "fp16" or "bf16" for the graphs' weights and matmuls (norms, softmax,
            residual stream and heads stay float32).
        task: "embedding", "reranker" or "auto" (from the checkpoint's name).
        graph: "fused" (ONNX Runtime contrib ops: fused attention, rotary, norms; the fast default)
            or "plain" (traced with torch.onnx, standard ops only: the parity baseline, and what
            runtimes without ORT's contrib ops need). Both are held to the same parity tests.
        validate: run onnx.checker, load in ONNX Runtime and check parity against transformers; the
            report goes into the manifest and a failure raises `ParityError`. When False, the
            manifest says parity was skipped.
        overwrite: replace `out_dir` if it already holds a bundle.
        progress: show a progress bar over the export steps.
        weights: None, or "int8" / "int4" to write quantized weights straight from the checkpoint
            tensors (fused fp32 graphs only): int8 with the calibrated smoothing plan of `q3vl
            quantize --weights int8`, int4 as MatMulNBits. Parity is checked against transformers
            with the weight format's tolerance.
        block_size: int4 block size.
        int8_plan: int8 only: an `Int8Plan`, used as is when filled in, else its settings are
            used to calibrate one here.

    Returns:
        The bundle directory.
    """
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise missing_extra("torch", "export") from e
    from tqdm.auto import tqdm

    from q3vl.preprocess.prompt import TextTokenizer

    ckpt, out = Path(checkpoint), Path(out_dir)
    check_checkpoint(ckpt)
    spec = ModelSpec.from_checkpoint(ckpt)
    _check_args(graph, precision, weights, validate)
    task = detect_task(ckpt) if task == "auto" else task
    if task not in ("embedding", "reranker"):
        raise ValueError(f"task must be 'embedding', 'reranker' or 'auto', not {task!r}")
    tokenizer = TextTokenizer(ckpt / "tokenizer.json")
    token_ids = {k: getattr(tokenizer.special, k) for k in ("image_pad", "video_pad", "vision_start", "vision_end",
                                                            "im_start", "im_end", "endoftext")}
    yes_no = None
    if task == "reranker":
        yes, no = tokenizer.token_id("yes"), tokenizer.token_id("no")
        if yes is None or no is None:
            raise CheckpointError("the tokenizer has no 'yes'/'no' tokens, which the reranker head needs")
        token_ids.update(yes=yes, no=no)
        yes_no = (yes, no)
    template = _chat_template(ckpt)
    _prepare_dir(out, overwrite)
    started = time.perf_counter()
    quant = _quant_hook(ckpt, task, weights, block_size, int8_plan)
    steps = tqdm(total=3 if validate else 2, disable=not progress, unit="step")
    try:
        if graph == "fused":
            seconds = _build_fused(ckpt, out, spec, task, precision, yes_no, steps, quant)
        else:
            seconds = _export_graphs(ckpt, out, spec, task, precision, yes_no, steps)
        shutil.copyfile(ckpt / "tokenizer.json", out / "tokenizer.json")
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        names = ["vision.onnx", "vision.onnx.data", "text.onnx", "text.onnx.data", "tokenizer.json",
                 "chat_template.jinja"]
        extra: dict[str, Any] = {"export": {"seconds": seconds}}
        if quant is not None:
            extra["quantization"] = {**quant.summary(), "at_export": True}
            if hasattr(quant, "plan"):
                quant.plan.save(out / "int8_plan.npz")
                names.append("int8_plan.npz")
        outputs = TEXT_OUTPUTS[task]
        gp = f"{weights}-weights" if weights else precision
        manifest = Manifest(
            task=task, spec=spec, token_ids=token_ids,
            graphs={"vision": {"file": "vision.onnx", "precision": gp, "kind": graph,
                               "outputs": ["visual_embeds", "deepstack_embeds"]},
                    "text": {"file": "text.onnx", "precision": gp, "kind": graph, "outputs": list(outputs)}},
            preprocess={"patch_size": spec.vision.patch_size, "temporal_patch_size": spec.vision.temporal_patch_size,
                        "merge_size": spec.vision.spatial_merge_size, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
            source=checkpoint_identity(ckpt), parity={"passed": None, "summary": "not validated (validate=False)"},
            files=describe_files(out, names), extra=extra)
        manifest.write(out)
        if validate:
            steps.set_description("validation")
            _check_graphs(out)
            from q3vl.export.parity import check

            manifest.parity = check(out, ckpt, task, gp, backend="cuda" if precision == "bf16" else "cpu")
            steps.update()
        manifest.extra["export"]["total_seconds"] = round(time.perf_counter() - started, 1)
        manifest.write(out)
    finally:
        steps.close()
    if validate and not manifest.parity["passed"]:
        raise ParityError(f"exported graphs do not match transformers: {manifest.parity['summary']}",
                          manifest.parity)
    return out


def summary(out: Path) -> str:
    """Human-readable summary of a bundle: files, sizes, parity."""
    m = Manifest.read(out)
    lines = [f"bundle {out} ({m.task}, {m.graphs['text']['precision']})"]
    lines += [f"  {name:24s} {meta['size'] / 1e6:10.1f} MB" for name, meta in m.files.items()]
    lines.append(f"  total {sum(f['size'] for f in m.files.values()) / 1e6:.1f} MB")
    status = {True: "PASSED", False: "FAILED", None: "not run"}[m.parity.get("passed")]
    lines.append(f"  parity: {status}: {m.parity.get('summary')}")
    return "\n".join(lines)
