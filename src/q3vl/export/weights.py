"""Reading a Hugging Face checkpoint's tensors by name, shard by shard, without transformers."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from q3vl.errors import CheckpointError

REQUIRED_FILES = ("config.json", "tokenizer.json")


def check_checkpoint(path: Path) -> None:
    """Fail early, naming what is missing, before any heavy import or export work."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        missing.append("model.safetensors or model.safetensors.index.json")
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {missing}")


def weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> shard file name."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"corrupt {index}: {e}") from e
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


class Weights:
    """Lazy access to a checkpoint's tensors as float32 torch tensors, by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.map = weight_map(self.path)

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.map if n.startswith(prefix)]

    def get(self, name: str) -> Any:
        """One tensor, upcast to float32 (bf16 -> fp32 is exact)."""
        return self.many([name])[name]

    def many(self, names: Iterable[str]) -> dict[str, Any]:
        """Several tensors, reading each shard once."""
        import torch
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.map:
                raise CheckpointError(f"checkpoint {self.path} has no tensor {n!r}")
            by_file.setdefault(self.map[n], []).append(n)
        out = {}
        for fname, group in by_file.items():
            with safe_open(str(self.path / fname), framework="pt") as f:
                for n in group:
                    out[n] = f.get_tensor(n).to(torch.float32)
        return out


SAMPLES, SAMPLE_BYTES = 16, 64 * 1024  # per shard: 16 evenly spaced 64 KiB windows of the tensor data


def checkpoint_identity(path: Path) -> dict[str, str]:
    """Where a bundle came from: the path/name and two hashes, neither of which reads gigabytes.

    `sha256` covers config.json and, per shard, its name and size plus its safetensors header
    (tensor names, dtypes, shapes, offsets): it tells architectures and layouts apart, but every
    checkpoint of one shape has the same header, so it cannot tell two trainings (or an embedding
    and a reranker checkpoint) apart. `content_sha256` adds, per shard, `SAMPLES` evenly spaced
    windows of the tensor data and its last window (about 1 MiB a shard), which differ between
    any two sets of weights in practice; `q3vl parity` compares it when the bundle records it.
    """
    config = (path / "config.json").read_bytes()
    h, content = hashlib.sha256(config), hashlib.sha256(config)
    for fname in sorted(set(weight_map(path).values())):
        f = path / fname
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(min(n, 100_000_000))
            for part in (fname.encode(), str(size).encode(), header):
                h.update(part)
                content.update(part)
            start = 8 + n
            span = max(size - start - SAMPLE_BYTES, 0)
            for k in range(SAMPLES + 1):
                fh.seek(start + span * k // SAMPLES)
                content.update(fh.read(SAMPLE_BYTES))
    name = json.loads(config).get("_name_or_path") or path.name
    return {"path": str(path.resolve()), "name": str(name), "sha256": h.hexdigest(),
            "content_sha256": content.hexdigest()}


def read_chat_template(checkpoint: Path) -> str:
    """The checkpoint's chat template text (chat_template.jinja, else the JSON files that carry one)."""
    for name, key in (("chat_template.jinja", None), ("chat_template.json", "chat_template"),
                      ("tokenizer_config.json", "chat_template")):
        path = checkpoint / name
        if path.is_file():
            if key is None:
                return path.read_text(encoding="utf-8")
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
            if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
                value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"),
                             None)
            if isinstance(value, str):
                return value
    raise CheckpointError(f"checkpoint {checkpoint} has no chat template (chat_template.jinja/.json)")


@contextlib.contextmanager
def bars_only_on_a_terminal() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar off a terminal: in a log its carriage returns make one long line."""
    from transformers.utils import logging as hf_logging

    from q3vl.progress import on_terminal

    hide = hf_logging.is_progress_bar_enabled() and not on_terminal()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()
