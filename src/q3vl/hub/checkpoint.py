"""A checkpoint source (a local folder or a Hub repo id) -> a local checkpoint folder the export reads.

Only what the export and its parity check need is downloaded: `config.json`, the safetensors
weights (`model.safetensors`, or `model.safetensors.index.json` and exactly the shards it names),
the tokenizer (`tokenizer.json`, `tokenizer_config.json`, `vocab.json`, `merges.txt`, ...), the
chat template (`chat_template.jinja` / `.json`), the processor configs and `README.md` (its metadata
holds the license). Never other weight formats (`*.bin`, `*.pt`, `*.gguf`, ONNX, ...),
Sentence-Transformers modules, images or other folders.

Order (nothing large is fetched before every check that can refuse has passed): the repo listing
(one API call: commit sha, files, sizes, hashes) -> the disk pre-flight for the download -> the small
metadata files -> the architecture check (`config.json` must be Qwen3-VL) and the shape's memory and
disk pre-flight -> tokenizer and weights -> every file hashed against the listing -> a record in the
cache, so the same commit resolves later with the Hub unreachable or `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from q3vl.errors import CheckpointError, HubError
from q3vl.hub import cache, client, preflight
from q3vl.hub.client import Connection, Listing
from q3vl.hub.progress import DownloadBar
from q3vl.hub.source import RepoRef, parse_source
from q3vl.spec import ModelSpec, check_processor_configs

log = logging.getLogger(__name__)
KIND = "checkpoint"
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
# small files read before the pre-flight (config, index, templates, processor configs, card)
METADATA = ("config.json", INDEX, "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
            "video_preprocessor_config.json", "processor_config.json", "README.md")
TOKENIZER = ("tokenizer.json", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: the local folder, and where it came from when it came from the Hub."""

    path: Path
    repo: RepoRef | None = None  # as asked
    sha: str | None = None
    card: dict[str, Any] = field(default_factory=dict)  # the repo card's metadata (license, tags, ...)

    def source(self) -> dict[str, Any]:
        """The manifest's `source` fields that say where the weights came from."""
        if self.repo is None:
            return {}
        out: dict[str, Any] = {"repo_id": self.repo.repo_id, "revision": self.repo.revision or "main",
                               "sha": self.sha}
        for key in ("license", "license_name", "license_link", "pipeline_tag"):
            if self.card.get(key):
                out[key] = self.card[key]
        return out


def resolve_checkpoint(source: str | Path, plan: preflight.ExportPlan | None = None, *, token: str | None = None,
                       check_resources: bool = True, progress: bool = True) -> Checkpoint:
    """The checkpoint folder for `source` (module docstring); `plan` sizes the pre-flight."""
    where = parse_source(source)
    if isinstance(where, Path):
        return Checkpoint(where, card=_card(where))
    conn = Connection.from_env(token)
    hit = _from_cache(where, conn)
    if hit is not None:
        return hit
    try:
        listing = client.list_repo(where, conn)
    except HubError:
        hit = _from_cache(where, conn, offline_fallback=True)
        if hit is None:
            raise
        log.warning("the Hub is unreachable: using the cached %s@%s", where.repo_id, hit.sha)
        return hit
    return _download(listing, conn, plan, check_resources, progress)


def _from_cache(ref: RepoRef, conn: Connection, offline_fallback: bool = False) -> Checkpoint | None:
    """A verified cached snapshot, when the ref is a commit sha, the Hub may not be asked, or it failed."""
    if not (ref.pinned or conn.offline or offline_fallback):
        return None
    sha = client.cached_sha(ref)
    store = client.storage(ref.repo_id)
    record = cache.read_record(store, sha, KIND) if sha else None
    if record is None:
        if conn.offline:
            raise HubError(f"{ref} is not in the Hub cache ({store}) as a complete, verified checkpoint, and the Hub "
                           "may not be asked (HF_HUB_OFFLINE=1): run once with the Hub reachable")
        return None
    snapshot = store / "snapshots" / sha  # type: ignore[operator]
    if not conn.offline and not all((snapshot / n).exists() for n in record["files"]):
        return None  # files deleted from the cache since (`hf cache delete`): download them again
    cache.verify(snapshot, record["files"], str(ref), record, CheckpointError)
    return Checkpoint(snapshot, ref, sha, record.get("card", {}))


def _download(listing: Listing, conn: Connection, plan: preflight.ExportPlan | None, check_resources: bool,
              progress: bool) -> Checkpoint:
    name, pinned = str(listing.ref), listing.pinned
    _require(listing)
    store = client.storage(listing.ref.repo_id)
    snapshot = store / "snapshots" / listing.sha
    present = [n for n in listing.files if n in METADATA]
    if check_resources:
        preflight.check_download(name, _missing_bytes(listing, snapshot, _wanted(listing, [])), store.parent)
    for n in present:  # the first one through the asked revision, so the cache records where it points
        path = client.download(pinned, n, conn, revision=(listing.ref.revision or "main") if n == present[0] else None)
        if path.parent != snapshot:
            raise HubError(f"{name} moved to another commit while downloading ({path.parent.name} instead of "
                           f"{listing.sha}): run again")
    spec = ModelSpec.from_checkpoint(snapshot)  # refuses another architecture, naming it
    check_processor_configs(snapshot, spec)
    wanted = _wanted(listing, _shards(snapshot, listing))
    if check_resources:
        _check_weight_sizes(name, listing, wanted, spec)
        if plan is not None:
            preflight.check_export(name, spec, plan, _missing_bytes(listing, snapshot, wanted), store.parent)
    rest = [n for n in wanted if n not in present]
    with DownloadBar(sum(listing.files[n].size for n in rest), f"download {name}", progress) as bar:
        for n in rest:
            client.download(pinned, n, conn, bar.tqdm_class(n))
    files = {n: listing.files[n].expected() for n in wanted}
    stats = cache.verify(snapshot, files, name)
    card = _card(snapshot) or listing.card
    cache.write_record(store, listing.sha, KIND, files, stats, {"card": card})
    return Checkpoint(snapshot, listing.ref, listing.sha, card)


def _require(listing: Listing) -> None:
    """Refuse a repo the export cannot read, naming what it has (before any download)."""
    missing = [n for n in ("config.json", "tokenizer.json") if n not in listing.files]
    if WEIGHTS not in listing.files and INDEX not in listing.files:
        other = sorted(n for n in listing.files if n.endswith((".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5")))
        missing.append(f"{WEIGHTS} or {INDEX}" + (f" (it has {other[:3]}: q3vl reads safetensors only)"
                                                   if other else ""))
    if missing:
        what = " (it is a q3vl bundle: load it with Embedder/Reranker or `q3vl serve`)" \
            if "q3vl.json" in listing.files else ""
        raise CheckpointError(f"{listing.ref} is not a checkpoint q3vl can export: it lacks {', '.join(missing)}{what}")


def _shards(snapshot: Path, listing: Listing) -> list[str]:
    """The weight files: the single file, or exactly the shards the index names (each must be listed)."""
    index = snapshot / INDEX
    if not index.is_file():
        return [WEIGHTS]
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{listing.ref}: corrupt {INDEX}: {e}") from None
    bad = [n for n in names if not isinstance(n, str) or n not in listing.files or n.startswith("/") or ".." in n]
    if bad:
        raise CheckpointError(f"{listing.ref}: {INDEX} names shards the repo does not list: {bad[:3]}")
    return names


def _wanted(listing: Listing, shards: list[str]) -> list[str]:
    """Every file to fetch, in fetch order (before the index is read, `shards` is empty: all weights count)."""
    weights = shards or [n for n in listing.files if n == WEIGHTS or (n.startswith("model-") and
                                                                     n.endswith(".safetensors") and "/" not in n)]
    return [n for n in listing.files if n in METADATA] + [n for n in TOKENIZER if n in listing.files] + weights


def _missing_bytes(listing: Listing, snapshot: Path, names: list[str]) -> int:
    return sum(listing.files[n].size for n in names if n in listing.files and not (snapshot / n).exists())


def _check_weight_sizes(name: str, listing: Listing, wanted: list[str], spec: ModelSpec) -> None:
    """The listed weights cannot exceed what the config's parameters take at 4 bytes each (plus headers)."""
    weights = sum(listing.files[n].size for n in wanted if n.endswith(".safetensors"))
    counts = preflight.parameter_counts(spec)
    most = 4 * (counts["text"] + counts["vision"] + counts["lm_head"]) * 1.05 + 50_000_000
    if weights > most:
        raise preflight.PreflightError(
            f"{name}: its weight files are listed at {weights / 1e9:.1f} GB, but the {spec.text.num_layers}-layer "
            f"model of its config.json holds {sum(counts.values()) - counts['embed']:,} parameters, at most "
            f"{most / 1e9:.1f} GB in float32: the file list does not describe this model; refusing to download")


def _card(folder: Path) -> dict[str, Any]:
    """The metadata of the checkpoint's README.md (license, base model, tags), if it has one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        text = readme.read_text(encoding="utf-8")
        if not text.startswith("---"):
            return {}
        import yaml

        data = yaml.safe_load(text.split("---", 2)[1])
    except Exception as e:  # unreadable, not UTF-8, no closing fence, a YAML error, no PyYAML
        log.debug("unreadable card metadata in %s: %s", readme, e)
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["Checkpoint", "resolve_checkpoint"]
