"""The bundle: the contract between export and runtime (docs/architecture.md, "The bundle").

A directory with the graphs (`vision.onnx`, `text.onnx` + `.data`), `tokenizer.json`,
`chat_template.jinja` and the manifest `q3vl.json`. The manifest records the format version, the
task, the model facts, each graph's precision, the preprocessing parameters, the source
checkpoint's identity, the q3vl version, the parity report, and the size and sha256 of every file,
so a truncated, corrupt or inconsistent bundle, or one from a newer format, is rejected at load
with a `BundleError` that names the field or file, never as a shape error (or a wrong vector) mid-run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from q3vl._version import __version__
from q3vl.errors import BundleError, CheckpointError, ConfigError
from q3vl.precision import BundlePrecision, GraphKind, check_bundle_precision
from q3vl.spec import SPECIAL_TOKENS, ModelSpec, read_json
from q3vl.tasks import TASKS

FORMAT_VERSION = 2  # 2: DeepStack row-major ([V, K, D] text input, [S, m, K, D] vision output)
MIN_FORMAT_VERSION = 2
MANIFEST = "q3vl.json"
HASH_LIMIT = 64 * 1024**2  # files up to this size are hashed at every load; larger ones on request

# Graph I/O names: the contract between the exported graphs and the runtime (text outputs: per task).
VISION_INPUTS = ("pixel_values", "pos_ids", "interp_idx", "interp_w")
VISION_OUTPUTS = ("visual_embeds", "deepstack_embeds")
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "visual_embeds", "deepstack_embeds")
GRAPHS = ("vision", "text")


@dataclass
class GraphEntry:
    """One graph of the bundle as the manifest records it."""

    file: str
    precision: BundlePrecision
    kind: GraphKind = "plain"
    outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, name: str, d: Any) -> GraphEntry:
        if not isinstance(d, dict):
            raise BundleError(f"manifest field graphs.{name} must be an object")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BundleError(f"manifest field graphs.{name} has unknown keys {unknown}")
        entry = cls(file=_typed(d, "file", str, f"graphs.{name}"), precision=_typed(d, "precision", str,
                    f"graphs.{name}"), kind=d.get("kind", "plain"), outputs=list(d.get("outputs", [])))
        if entry.kind not in ("fused", "plain"):
            raise BundleError(f"manifest field graphs.{name}.kind is {entry.kind!r}, not 'fused' or 'plain'")
        try:
            check_bundle_precision(entry.precision)
        except ConfigError as e:
            raise BundleError(f"manifest field graphs.{name}.precision: {e}") from None
        return entry


def _typed(d: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
    """`d[key]`, which must exist and be a `kind`; a BundleError naming the field otherwise."""
    path = f"{where}.{key}" if where else key
    if key not in d:
        raise BundleError(f"manifest lacks the field {path}")
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BundleError(f"manifest field {path} must be a {kind.__name__}, not {type(value).__name__}")
    return value


@dataclass
class Manifest:
    """The parsed `q3vl.json`."""

    task: str
    spec: ModelSpec
    token_ids: dict[str, int]
    graphs: dict[str, GraphEntry]
    preprocess: dict[str, Any]
    source: dict[str, Any]
    parity: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # quantization, engines, ...
    format_version: int = FORMAT_VERSION
    q3vl_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "q3vl_version": self.q3vl_version, "task": self.task,
                "model": self.spec.to_dict(), "token_ids": self.token_ids,
                "graphs": {k: g.to_dict() for k, g in self.graphs.items()}, "preprocess": self.preprocess,
                "source": self.source, "parity": self.parity, "files": self.files, **self.extra}

    def write(self, directory: Path) -> None:
        """Write `q3vl.json` atomically (a new file renamed over the old: a kill never leaves half a manifest)."""
        tmp = directory / f".{MANIFEST}.partial-{os.getpid()}"
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, directory / MANIFEST)

    @property
    def precision(self) -> str:
        """The text graph's precision (what parity tolerances are looked up by)."""
        return self.graphs["text"].precision

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        version = _typed(d, "format_version", int)
        if version > FORMAT_VERSION:
            raise BundleError(f"bundle format {version} is newer than this q3vl ({__version__}) reads "
                              f"(format {FORMAT_VERSION}): upgrade q3vl")
        if version < MIN_FORMAT_VERSION:
            raise BundleError(f"bundle format {version} is older than this q3vl reads (format {MIN_FORMAT_VERSION}: "
                              "graph I/O layouts changed): export it again with `q3vl export`")
        task = _typed(d, "task", str)
        if task not in TASKS:
            raise BundleError(f"manifest task {task!r} is not one of {sorted(TASKS)}")
        graphs = _typed(d, "graphs", dict)
        missing = [g for g in GRAPHS if g not in graphs]
        if missing:
            raise BundleError(f"manifest field graphs lacks {missing}")
        token_ids = _typed(d, "token_ids", dict)
        for name, value in token_ids.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BundleError(f"manifest field token_ids.{name} must be a non-negative integer, not {value!r}")
        try:
            spec = ModelSpec.from_dict(_typed(d, "model", dict))
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest field model is malformed: {e}") from None
        known = {"format_version", "q3vl_version", "task", "model", "token_ids", "graphs", "preprocess", "source",
                 "parity", "files"}
        return cls(task=task, spec=spec, token_ids=dict(token_ids),
                   graphs={name: GraphEntry.from_dict(name, g) for name, g in graphs.items()},
                   preprocess=_typed(d, "preprocess", dict), source=_typed(d, "source", dict),
                   parity=dict(d.get("parity") or {}), files=_typed(d, "files", dict) if "files" in d else {},
                   extra={k: v for k, v in d.items() if k not in known}, format_version=version,
                   q3vl_version=str(d.get("q3vl_version", "?")))

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        directory = Path(directory)
        if not directory.is_dir():
            raise BundleError(f"bundle directory not found: {directory}")
        if not (directory / MANIFEST).is_file() and (directory / "config.json").is_file():
            raise BundleError(f"{directory} is a model checkpoint, not a q3vl bundle: export it first with "
                              f"`q3vl export {directory} -o BUNDLE_DIR` and load BUNDLE_DIR")
        manifest = cls.from_dict(read_json(directory / MANIFEST, BundleError))
        manifest.check_consistency(directory)
        return manifest

    def check_consistency(self, directory: Path) -> None:
        """The manifest's own facts agree with each other and stay inside the bundle directory."""
        for name in [*self.files, *(g.file for g in self.graphs.values())]:
            inside(directory, name)
        spec = self.spec
        expected = {"image_pad": spec.image_token_id, "video_pad": spec.video_token_id,
                    "vision_start": spec.vision_start_token_id, "vision_end": spec.vision_end_token_id}
        for key, value in expected.items():
            if key in self.token_ids and self.token_ids[key] != value:
                raise BundleError(f"manifest token_ids.{key} is {self.token_ids[key]} but model.{key}_token_id "
                                  f"is {value}: the bundle is inconsistent; export it again")
        pre = self.preprocess
        for key, value in (("patch_size", spec.vision.patch_size),
                           ("temporal_patch_size", spec.vision.temporal_patch_size),
                           ("merge_size", spec.vision.spatial_merge_size)):
            if key in pre and pre[key] != value:
                raise BundleError(f"manifest preprocess.{key} is {pre[key]!r} but the model's vision config says "
                                  f"{value}: the bundle is inconsistent; export it again")
        for key in ("image_mean", "image_std"):
            if key in pre and pre[key] != [0.5, 0.5, 0.5]:
                raise BundleError(f"manifest preprocess.{key} is {pre[key]!r}; q3vl's preprocessing implements "
                                  "mean = std = 0.5 (the Qwen3-VL processor's) only")
        outputs = TASKS[self.task].outputs
        if self.graphs["text"].outputs and tuple(self.graphs["text"].outputs) != outputs:
            raise BundleError(f"text graph outputs {self.graphs['text'].outputs} are not the {self.task} task's "
                              f"{list(outputs)}")

    def check_tokenizer(self, special: dict[str, int]) -> None:
        """The tokenizer's special-token ids must be the manifest's (a swapped tokenizer.json would
        silently place image rows at the wrong tokens).
        """
        for key in SPECIAL_TOKENS:
            if key in self.token_ids and special.get(key) != self.token_ids[key]:
                raise BundleError(f"tokenizer.json gives {SPECIAL_TOKENS[key]} the id {special.get(key)}, the "
                                  f"manifest records {self.token_ids[key]}: the bundle's tokenizer was replaced")


def expected_io(spec: ModelSpec, task: str) -> dict[str, dict[str, tuple[int | None, ...]]]:
    """Every graph input and output with the shape the model facts imply (None: a dynamic axis)."""
    d, k, v = spec.text.hidden_size, spec.num_deepstack, spec.vision
    return {
        "vision": {"pixel_values": (None, None, v.patch_dim), "pos_ids": (None, None, 2),
                   "interp_idx": (None, None, 4), "interp_w": (None, None, 4),
                   "visual_embeds": (None, None, d), "deepstack_embeds": (None, None, k, d)},
        "text": {"input_ids": (None, None), "attention_mask": (None, None), "position_ids": (3, None, None),
                 "visual_embeds": (None, d), "deepstack_embeds": (None, k, d), **TASKS[task].output_shapes(d)},
    }


def check_graph_io(graph: str, expected: dict[str, tuple[int | None, ...]], actual: dict[str, tuple[Any, ...]]
                   ) -> None:
    """A graph's declared inputs/outputs must be the ones the manifest's model facts imply."""
    if not actual:
        return  # the backend cannot tell (e.g. a serialized engine without shape information)
    if set(actual) != set(expected):
        raise BundleError(f"the {graph} graph has inputs/outputs {sorted(actual)}, the manifest's task and model "
                          f"imply {sorted(expected)}: graph and manifest do not belong together")
    for name, want in expected.items():
        got = actual[name]
        static = [(a, g) for a, g in zip(want, got) if a is not None and isinstance(g, int) and g >= 0]
        if len(got) != len(want) or any(a != g for a, g in static):
            raise BundleError(f"the {graph} graph's {name} has shape {list(got)}, the manifest's model facts imply "
                              f"{[a if a is not None else '*' for a in want]}: graph and manifest disagree")


def looks_like_bundle(path: Path) -> bool:
    """Whether `path` holds a bundle (or the remains of one): what `--overwrite` may replace."""
    return (path / MANIFEST).is_file() or any(path.glob("*.onnx"))


def inside(directory: Path, name: str) -> Path:
    """`directory / name`, refused unless it resolves (symlinks followed) inside `directory`."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise BundleError(f"manifest names the file {name!r}: bundle paths must be relative")
    root = directory.resolve()
    path = (directory / name).resolve()
    if root != path and root not in path.parents:
        raise BundleError(f"manifest names the file {name!r}, which resolves outside the bundle directory")
    return directory / name


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
        path = inside(directory, name)
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or \
                not isinstance(meta.get("sha256"), str):
            raise BundleError(f"manifest field files.{name} must hold an integer size and a sha256 string")
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}")
        size = path.stat().st_size
        if size != meta["size"]:
            raise BundleError(f"bundle file {path} is {size} bytes, the manifest says {meta['size']}: truncated "
                              "or replaced")
        if (full or size <= HASH_LIMIT) and sha256(path) != meta["sha256"]:
            raise BundleError(f"bundle file {path} is corrupt: sha256 does not match the manifest")
