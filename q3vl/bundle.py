"""The bundle: the contract between export and runtime (DESIGN.md "The bundle").

A directory with the graphs (`vision.onnx`, `text.onnx` + `.data`), `tokenizer.json`,
`chat_template.jinja` and the manifest `q3vl.json`. The manifest records the format version, the
task, the model facts, each graph's precision, the preprocessing defaults, the source checkpoint's
identity, the q3vl version, the parity report, and the size and sha256 of every file, so a
truncated or corrupt bundle, or one from a newer format, is rejected at load with a message that
says so, never as a shape error mid-run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from q3vl._version import __version__
from q3vl.errors import BundleError
from q3vl.spec import ModelSpec, read_json

FORMAT_VERSION = 2  # 2: DeepStack row-major ([V, K, D] text input, [S, m, K, D] vision output)
MIN_FORMAT_VERSION = 2
MANIFEST = "q3vl.json"
TASKS = ("embedding", "reranker")
HASH_LIMIT = 64 * 1024**2  # files up to this size are hashed at every load; larger ones on request

# Graph I/O names: the contract between the exported graphs and the runtime. Output names must not
# be names the exporter gives to intermediate values ("embedding" is the aten op's own output name).
VISION_INPUTS = ("pixel_values", "pos_ids", "interp_idx", "interp_w")
VISION_OUTPUTS = ("visual_embeds", "deepstack_embeds")
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "visual_embeds", "deepstack_embeds")
EMBEDDING, POOLED, SCORE = "sentence_embedding", "pooled_state", "relevance_score"
TEXT_OUTPUTS = {"embedding": (EMBEDDING, POOLED), "reranker": (SCORE,)}


@dataclass
class Manifest:
    """The parsed `q3vl.json`."""

    task: str
    spec: ModelSpec
    token_ids: dict[str, int]
    graphs: dict[str, dict[str, Any]]  # name -> {"file", "precision", "inputs", "outputs", ...}
    preprocess: dict[str, Any]
    source: dict[str, Any]
    parity: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # quantization, engines, ...
    format_version: int = FORMAT_VERSION
    q3vl_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "q3vl_version": self.q3vl_version, "task": self.task,
                "model": self.spec.to_dict(), "token_ids": self.token_ids, "graphs": self.graphs,
                "preprocess": self.preprocess, "source": self.source, "parity": self.parity,
                "files": self.files, **self.extra}

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        version = d.get("format_version")
        if not isinstance(version, int):
            raise BundleError("manifest has no integer format_version")
        if version > FORMAT_VERSION:
            raise BundleError(f"bundle format {version} is newer than this q3vl ({__version__}) reads "
                              f"(format {FORMAT_VERSION}): upgrade q3vl")
        if version < MIN_FORMAT_VERSION:
            raise BundleError(f"bundle format {version} is older than this q3vl reads (format {MIN_FORMAT_VERSION}: "
                              "graph I/O layouts changed): export it again with `q3vl export`")
        if d.get("task") not in TASKS:
            raise BundleError(f"manifest task {d.get('task')!r} is not one of {TASKS}")
        known = {"format_version", "q3vl_version", "task", "model", "token_ids", "graphs", "preprocess", "source",
                 "parity", "files"}
        try:
            return cls(task=d["task"], spec=ModelSpec.from_dict(d["model"]), token_ids=dict(d["token_ids"]),
                       graphs=dict(d["graphs"]), preprocess=dict(d["preprocess"]), source=dict(d["source"]),
                       parity=dict(d.get("parity", {})), files=dict(d.get("files", {})),
                       extra={k: v for k, v in d.items() if k not in known}, format_version=version,
                       q3vl_version=str(d.get("q3vl_version", "?")))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest is incomplete or malformed: {e!r}") from e

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        if not directory.is_dir():
            raise BundleError(f"bundle directory not found: {directory}")
        return cls.from_dict(read_json(directory / MANIFEST, BundleError))


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file, for the manifest."""
    return {n: {"size": (directory / n).stat().st_size, "sha256": sha256(directory / n)} for n in names}


def verify_files(directory: Path, files: dict[str, dict[str, Any]], full: bool = False) -> None:
    """Every listed file exists with its recorded size; small files (all files if `full`) hash-match."""
    if not files:
        raise BundleError(f"{directory / MANIFEST} lists no files")
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}")
        size = path.stat().st_size
        if size != meta["size"]:
            raise BundleError(f"bundle file {path} is {size} bytes, the manifest says {meta['size']}: truncated "
                              "or replaced")
        if (full or size <= HASH_LIMIT) and sha256(path) != meta["sha256"]:
            raise BundleError(f"bundle file {path} is corrupt: sha256 does not match the manifest")
