"""The bundle's model card (`README.md`): Hub metadata, the export recipe, the parity proof, the files.

Why: a q3vl bundle carries its parity measurement in its manifest; published with a card that shows
it, a reader sees what the bundle was checked against, on which inputs, the worst figures and the
tolerances, without trusting anyone's word. Everything in the card is read from the manifest (so
`tests/test_hub_card.py` checks its figures equal the manifest's). The metadata block is the Hub's
YAML front matter (`huggingface_hub.ModelCard` parses it): library, base model (with the commit in
`base_model_revision`), pipeline tag, tags and the license found in the checkpoint's own card. The
how-to-load blocks name `source` (the repo id once pushed, the bundle path before) and run as they
are written (the project's snippet conventions: the HTML comments are hidden on the Hub).

Torch-free: written by `q3vl export` and `q3vl quantize`, rewritten with the repo id by `q3vl push`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from q3vl.bundle import MANIFEST, Manifest
from q3vl.tasks import task_for

CARD = "README.md"
PIPELINE_TAG = {"embedding": "feature-extraction", "reranker": "text-ranking"}
CASE_ITEMS = {"images": "3 images (224x224, 160x416, 480x96), two with text", "video": "a 4-frame video with text",
              "text_only": "3 texts (short, long, multilingual)",
              "mixed": "a text, a text with an image, an image with a video"}


def metadata(manifest: Manifest) -> dict[str, Any]:
    """The card's YAML metadata."""
    src, quant = manifest.source, manifest.extra.get("quantization") or {}
    weights = quant.get("weights")
    meta: dict[str, Any] = {"library_name": "q3vl"}
    if src.get("repo_id"):
        meta["base_model"] = src["repo_id"]
        meta["base_model_revision"] = src.get("sha")
        if weights or manifest.precision != "fp32":
            meta["base_model_relation"] = "quantized"
    meta["pipeline_tag"] = src.get("pipeline_tag") or PIPELINE_TAG[manifest.task]
    tags = ["q3vl", "onnx", "qwen3_vl", "multimodal", manifest.task, manifest.precision]
    meta["tags"] = list(dict.fromkeys([*tags, *([weights] if weights else [])]))
    for key in ("license", "license_name", "license_link"):
        if src.get(key):
            meta[key] = src[key]
    return meta


def render(bundle: Path, source: str | None = None, port: int = 8000) -> str:
    """The card for the bundle in `bundle`; `source` is what the how-to-load blocks load (default: `bundle`)."""
    import yaml

    manifest = Manifest.read(bundle)
    source = source or str(bundle)
    front = yaml.safe_dump(metadata(manifest), sort_keys=False, allow_unicode=True)
    parts = [f"---\n{front}---\n", _intro(manifest, source), _recipe(manifest), _parity(manifest),
             _files(manifest), _usage(manifest, source, port)]
    return "\n".join(parts)


def write_card(bundle: Path, source: str | None = None) -> Path:
    """Write `README.md` into the bundle directory."""
    path = Path(bundle) / CARD
    path.write_text(render(Path(bundle), source), encoding="utf-8")
    return path


def _origin(manifest: Manifest) -> str:
    src = manifest.source
    if src.get("repo_id"):
        return f"[{src['repo_id']}](https://huggingface.co/{src['repo_id']}) at commit `{src.get('sha')}`"
    return f"the checkpoint `{src.get('name', '?')}` (a local folder; config sha256 `{src.get('sha256', '?')[:16]}`)"


def _intro(manifest: Manifest, source: str) -> str:
    task = task_for(manifest.task)
    return (f"# {source.rstrip('/').split('/')[-1]}\n\n"
            f"A q3vl bundle of {_origin(manifest)}: the {task.model_name} model as ONNX graphs "
            f"(vision and text, the {manifest.task} head fused in), its tokenizer and chat template, and a manifest "
            f"(`{MANIFEST}`) that records the model facts, the size and sha256 of every file and the parity "
            "measured when it was made. It runs with `q3vl` (ONNX Runtime, no PyTorch) and gives the official "
            f"wrapper's `{task.class_name}` results within the tolerances below.\n")


def _recipe(manifest: Manifest) -> str:
    quant, export = manifest.extra.get("quantization") or {}, manifest.extra.get("export") or {}
    graphs = ", ".join(f"{name} {g.kind} {g.precision}" for name, g in manifest.graphs.items())
    rows = [("source", _origin(manifest)), ("task", manifest.task), ("graphs", graphs),
            ("q3vl", f"{manifest.q3vl_version} (bundle format {manifest.format_version})")]
    if quant:
        how = f"{quant.get('weights')}, method {quant.get('method') or 'smooth'}"
        if quant.get("int8_plan"):
            plan = quant["int8_plan"]
            how += f", smoothing alpha {plan.get('alpha')}, {plan.get('projections')} projections"
        if quant.get("block_size"):
            how += f", block size {quant['block_size']}"
        rows.append(("weights", how + (" (written at export)" if quant.get("at_export") else
                                       " (quantized from an fp32 bundle)")))
    lines = ["## Export recipe\n", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if export.get("command"):
        lines += ["<!-- snippet: output -->", "```bash", export["command"], "```", ""]
    return "\n".join(lines)


def _parity(manifest: Manifest) -> str:
    p = manifest.parity
    if p.get("passed") is None:
        return f"## Parity\n\nNot measured: {p.get('summary', 'skipped')}.\n"
    quant = manifest.extra.get("quantization") or {}
    against = ("the float32 bundle it was quantized from" if quant and not quant.get("at_export") else
               "the PyTorch reference (transformers, float32) of the source checkpoint")
    task = task_for(manifest.task)
    metric = "embedding min cosine" if task.higher_is_better else "max |score diff|"
    tol = p.get("tolerance", {})
    limit = tol.get("embed_cos") if task.higher_is_better else tol.get("score_abs")
    lines = ["## Parity\n", f"Measured when the bundle was made: every case through this bundle (ONNX Runtime, "
             f"CPU) and through {against}, on identical token ids and pixels. Result: "
             f"**{'PASSED' if p['passed'] else 'FAILED'}** ({p.get('precision')} tolerances).\n",
             f"| case | inputs | tokens | vision min cosine | {metric} | finite |", "|---|---|---|---|---|---|"]
    for name, row in p.get("cases", {}).items():
        vision = _num(row.get("vision_min_cos"))
        lines.append(f"| {name} | {CASE_ITEMS.get(name, '')} | {', '.join(map(str, row.get('shapes', [])))} | "
                     f"{vision} | {_num(row.get(task.metric))} | {row.get('finite')} |")
    lines.append(f"| **worst** | | | {_num(p.get('vision_min_cos'))} | {_num(p.get(task.metric))} | |")
    lines.append(f"| tolerance | | | >= {_num(tol.get('vision_cos'))} | "
                 f"{'>=' if task.higher_is_better else '<='} {_num(limit)} | |")
    return "\n".join(lines) + "\n"


def _num(x: Any) -> str:
    """A figure exactly as the manifest holds it (the shortest repr that reads back to the same float)."""
    return "" if x is None else repr(x) if isinstance(x, float) else str(x)


def _files(manifest: Manifest) -> str:
    rows = [f"| `{name}` | {meta['size']:,} | `{meta['sha256']}` |" for name, meta in manifest.files.items()]
    total = sum(m["size"] for m in manifest.files.values())
    return "\n".join(["## Files\n", "Every file is checked against these sizes and hashes before it is used.\n",
                      "| file | bytes | sha256 |", "|---|---|---|", *rows, f"| total | {total:,} | |", ""])


def _usage(manifest: Manifest, source: str, port: int) -> str:
    task = task_for(manifest.task)
    url = f"http://127.0.0.1:{port}"
    if manifest.task == "embedding":
        py = (f'from q3vl import Embedder\n\nwith Embedder("{source}") as model:\n'
              '    vectors = model.process([{"text": "a cat on a sofa"}, {"text": "quarterly revenue"}])\n'
              "print(vectors.shape)\n")
        cli = ("printf '%s\\n' '{\"id\": \"a\", \"text\": \"a cat on a sofa\"}' > items.jsonl\n"
               f'q3vl embed "{source}" items.jsonl -o vectors.npy\n')
        curl = (f"curl -sf {url}/v1/embeddings -H 'Content-Type: application/json' "
                "-d '{\"input\": [\"a cat on a sofa\", \"quarterly revenue\"]}'\n")
    else:
        py = (f'from q3vl import Reranker\n\nwith Reranker("{source}") as model:\n'
              '    scores = model.process({"query": {"text": "a cat"},\n'
              '                            "documents": [{"text": "a cat on a sofa"}, {"text": "tax forms"}]})\n'
              "print(scores)\n")
        cli = ("echo '{\"text\": \"a cat\"}' > query.json\n"
               "printf '%s\\n' '{\"text\": \"a cat on a sofa\"}' '{\"text\": \"tax forms\"}' > documents.jsonl\n"
               f'q3vl rerank "{source}" query.json documents.jsonl\n')
        curl = (f"curl -sf {url}/v1/rerank -H 'Content-Type: application/json' "
                "-d '{\"query\": \"a cat\", \"documents\": [\"a cat on a sofa\", \"tax forms\"]}'\n")
    return "\n".join([
        "## How to load\n", "`pip install 'q3vl[hub]'` (add `serve` for the server). In Python:\n",
        f"```python\n{py}```\n", f"On the command line ({task.cli_command}):\n", f"```bash\n{cli}```\n",
        "Behind OpenAI-, Cohere- and vLLM-compatible HTTP APIs:\n",
        f"<!-- snippet: background ready={url}/ready timeout=120 -->",
        f'```bash\nq3vl serve --{manifest.task} "{source}" --port {port}\n```\n', f"```bash\n{curl}```\n"])


__all__ = ["CARD", "metadata", "render", "write_card"]
