"""Hub ids in: the real `huggingface_hub` client against a loopback Hub (tests/hub_server.py), never the real one.

Every test points the client at a server on 127.0.0.1 started here (HF_ENDPOINT, and the client's
constants in this process) with its cache in a temporary HF_HOME; the session keeps HF_HUB_OFFLINE=1
for everything else (tests/conftest.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from q3vl.errors import BundleError, CheckpointError, ConfigError, HubError
from tests.hub_server import Blob, LoopbackHub, hub_env, point_client_at
from tests.test_cli import one_error_line, q3vl

NEEDED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
          "merges.txt", "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json",
          "model.safetensors", "README.md"}
EXTRAS = {  # what a real repo carries beside the export's files: none of it may be downloaded
    "pytorch_model.bin": b"\0" * 4096, "onnx/model.onnx": b"\0" * 2048, "images/architecture.png": b"\x89PNG" * 64,
    "modules.json": json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]).encode(),
    "config_sentence_transformers.json": b'{"similarity_fn_name": "cosine"}',
    "1_Pooling/config.json": b'{"pooling_mode_lasttoken": true}',
    "README.md": b"---\nlicense: apache-2.0\npipeline_tag: sentence-similarity\nlibrary_name: transformers\n---\n"
                 b"# model\n",
}


def serve_checkpoint(hub: LoopbackHub, repo_id: str, folder: Path, extras: dict[str, bytes] | None = None) -> str:
    files = {p.relative_to(folder).as_posix(): Blob(p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    return hub.add_files(repo_id, {**files, **{k: Blob(v) for k, v in (extras or EXTRAS).items()}})


@pytest.fixture
def hub():
    with LoopbackHub() as server:
        yield server


# ------------------------------------------------------------------ ids
@pytest.mark.parametrize("source, message", [
    ("org/..", "'..' and '--' are not allowed"),
    ("org/na..me", "'..' and '--' are not allowed"),
    ("org--x/name", "'..' and '--' are not allowed"),
    ("org/name with space", "must be 1-96 ASCII letters"),
    ("org/-name", "must be 1-96 ASCII letters"),
    ("org/name.", "must be 1-96 ASCII letters"),
    ("org/" + "n" * 97, "must be 1-96 ASCII letters"),
    ("org/name.git", "must not end in '.git'"),
    ("org/name@../../etc", "is not a branch, tag or commit name"),
    ("org/name@", "is not a branch, tag or commit name"),
    ("org/name@-rf", "is not a branch, tag or commit name"),
    ("org/name@a b", "is not a branch, tag or commit name"),
])
def test_malformed_repo_ids_are_refused_before_any_network_or_disk(source, message):
    from q3vl.hub.source import parse_source

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_source(source)


def test_an_existing_local_path_wins_over_a_repo_id(tmp_path, monkeypatch):
    from q3vl.hub.source import RepoRef, parse_source

    monkeypatch.chdir(tmp_path)
    assert parse_source("org/name") == RepoRef("org/name")
    assert parse_source("org/name@refs/pr/1") == RepoRef("org/name", "refs/pr/1")
    assert parse_source("org/name@" + "a" * 40).pinned
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_source("org/name") == Path("org/name")  # the folder, as transformers decides
    for path_like in ("/abs/missing", "./org/x", "a/b/c", "~/x", "single"):  # paths: the caller's "not found"
        assert isinstance(parse_source(path_like), Path)
    assert isinstance(parse_source(Path("org/other")), Path)  # a Path object is always a path


def test_cli_refuses_a_malformed_id_in_one_line_and_touches_nothing(tmp_path):
    r = q3vl("export", "org/../../etc", "-o", str(tmp_path / "b"), env={"HF_HOME": str(tmp_path / "hf")})
    assert "checkpoint directory not found: org/../../etc" in one_error_line(r)  # a path-shaped string: a path
    r = q3vl("export", "org/na..me@main", "-o", str(tmp_path / "b"), env={"HF_HOME": str(tmp_path / "hf")})
    assert "not a valid Hub repo id: '..' and '--' are not allowed" in one_error_line(r)
    r = q3vl("embed", "/abs/not/here", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "v.npy"))
    assert "bundle directory not found: /abs/not/here" in one_error_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------ export by id
# The parity check is the export's largest part (~60% of it): the default suite exports with
# --no-validate and checks that every file is byte-identical to the local export, whose parity passed
# (the session fixture); `-m slow` runs the check itself on the bundle made by id.
@pytest.mark.parametrize("validate", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_export_by_id_downloads_only_what_it_needs_records_the_commit_and_passes_parity(
        hub, tiny_embedding, tiny_embedding_bundle, tmp_path, monkeypatch, validate):
    sha = serve_checkpoint(hub, "tiny-org/ckpt", tiny_embedding)
    home, cache, out = tmp_path / "hf", tmp_path / "cache", tmp_path / "b"
    r = q3vl("export", f"tiny-org/ckpt@{sha}", "-o", str(out), *([] if validate else ["--no-validate"]),
             env=hub_env(hub, home, HF_HUB_CACHE=str(cache)))
    assert r.returncode == 0, r.stderr
    assert "download tiny-org/ckpt@" in r.stderr  # the progress report (a log line off a terminal)
    assert sorted(hub.downloads()) == sorted(NEEDED)  # once each; no .bin, ONNX, images or ST modules
    m = json.loads((out / "q3vl.json").read_text())
    local = json.loads((tiny_embedding_bundle / "q3vl.json").read_text())
    if validate:
        assert "parity: PASSED" in r.stdout and m["parity"]["passed"] is True
    else:
        assert local["parity"]["passed"] is True and m["parity"]["passed"] is None
        assert {n: f["sha256"] for n, f in m["files"].items()} == {n: f["sha256"] for n, f in local["files"].items()}
    assert m["source"]["repo_id"] == "tiny-org/ckpt" and m["source"]["sha"] == sha
    assert m["source"]["license"] == "apache-2.0"
    assert m["source"]["path"] == str(cache / "models--tiny-org--ckpt" / "snapshots" / sha)  # HF_HUB_CACHE
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md").data
    assert (card.base_model, card.base_model_revision, card.license) == ("tiny-org/ckpt", sha, "apache-2.0")
    assert card.pipeline_tag == "sentence-similarity"  # the base model's own
    for name in ("text.onnx.data", "vision.onnx.data", "tokenizer.json"):  # the same bytes as the local export
        assert m["files"][name]["sha256"] == local["files"][name]["sha256"]
    point_client_at(hub, home, monkeypatch, cache=cache)
    from q3vl.hub.checkpoint import resolve_checkpoint

    assert resolve_checkpoint("tiny-org/ckpt", check_resources=False, progress=False).sha == sha  # by branch
    hub.__exit__()  # the server is gone: a second export runs from the cache alone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from q3vl.export.exporter import export_bundle

    for ref in (f"tiny-org/ckpt@{sha}", "tiny-org/ckpt"):  # pinned, and by the branch the cache recorded
        again = export_bundle(ref, tmp_path / ref.replace("/", "-"), validate=False, progress=False)
        assert json.loads((again / "q3vl.json").read_text())["files"]["text.onnx.data"] == m["files"]["text.onnx.data"]
    with pytest.raises(HubError, match=r"not in the Hub cache .*\(HF_HUB_OFFLINE=1\)"):
        export_bundle("tiny-org/other", tmp_path / "b3", progress=False)


def test_content_that_does_not_match_the_listing_is_refused_naming_the_file(hub, tiny_embedding, tmp_path, monkeypatch):
    from q3vl.hub.checkpoint import resolve_checkpoint

    sha = serve_checkpoint(hub, "tiny-org/ckpt", tiny_embedding)
    hub.corrupt.add("tiny-org/ckpt/model.safetensors")
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    with pytest.raises(HubError, match=r"tiny-org/ckpt@\w+: the downloaded model.safetensors has sha256 .*, expected "
                                       r".*: the content does not match what the repo lists"):
        resolve_checkpoint(f"tiny-org/ckpt@{sha}", progress=False)
    blobs = list((tmp_path / "hf" / "hub" / "models--tiny-org--ckpt" / "blobs").iterdir())
    assert len(blobs) == len(NEEDED) - 1  # the bad one is gone from the cache: the next run fetches it again
    hub.corrupt.clear()
    ckpt = resolve_checkpoint(f"tiny-org/ckpt@{sha}", progress=False)
    assert hub.downloads().count("model.safetensors") == 2 and hub.downloads().count("config.json") == 1
    assert (ckpt.path / "model.safetensors").read_bytes() == (tiny_embedding / "model.safetensors").read_bytes()


def test_a_stalled_transfer_resumes_with_a_ranged_request(hub, tiny_embedding, tmp_path, monkeypatch):
    from q3vl.hub.checkpoint import resolve_checkpoint

    sha = serve_checkpoint(hub, "tiny-org/ckpt", tiny_embedding)
    hub.stall["tiny-org/ckpt/model.safetensors"] = (15_000_000, 1)  # 15 of its 20.8 MB, then silence, once
    point_client_at(hub, tmp_path / "hf", monkeypatch, download_timeout=1)
    ckpt = resolve_checkpoint(f"tiny-org/ckpt@{sha}", progress=False)
    gets = [e for e in hub.log if e["method"] == "GET" and e["path"].endswith("/model.safetensors")]
    # the client writes in 10 MiB chunks: it resumes after the last whole chunk it received
    assert [e["status"] for e in gets] == [-1, 206] and gets[1]["range"] == f"bytes={10 * 1024 * 1024}-"
    assert (ckpt.path / "model.safetensors").read_bytes() == (tiny_embedding / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_server_that_stalls_for_good_fails_in_bounded_time_and_a_later_run_completes(
        hub, tiny_embedding, tmp_path, monkeypatch):
    import time

    from q3vl.hub.checkpoint import resolve_checkpoint

    sha = serve_checkpoint(hub, "tiny-org/ckpt", tiny_embedding)
    hub.stall["tiny-org/ckpt/model.safetensors"] = (15_000_000, -1)
    point_client_at(hub, tmp_path / "hf", monkeypatch, download_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(HubError, match="did not answer for .*model.safetensors.*run again to download the rest"):
        resolve_checkpoint(f"tiny-org/ckpt@{sha}", progress=False)
    took = time.monotonic() - t0
    assert took < 30, took  # 6 tries x (1 s read timeout + 1 s pause), not forever
    del hub.stall["tiny-org/ckpt/model.safetensors"]
    before = len(hub.downloads())
    resolve_checkpoint(f"tiny-org/ckpt@{sha}", progress=False)
    assert hub.downloads()[before:] == ["model.safetensors"]  # the files already complete are not fetched again


def test_a_revision_that_does_not_exist_and_a_private_repo(hub, tiny_embedding, tmp_path, monkeypatch):
    from q3vl.hub.checkpoint import resolve_checkpoint

    serve_checkpoint(hub, "tiny-org/ckpt", tiny_embedding)
    hub.repos["tiny-org/ckpt"].token = "s3cret"
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    with pytest.raises(HubError, match="tiny-org/ckpt was not found on http://127.0.0.1:.* needs a token"):
        resolve_checkpoint("tiny-org/ckpt", progress=False)
    with pytest.raises(HubError, match="tiny-org/ckpt has no revision 'v9' on http://127.0.0.1"):
        resolve_checkpoint("tiny-org/ckpt@v9", token="s3cret", progress=False)
    monkeypatch.setenv("HF_TOKEN", "s3cret")  # the client's own variable
    assert (resolve_checkpoint("tiny-org/ckpt", progress=False).path / "config.json").is_file()


def test_a_repo_that_is_not_an_exportable_checkpoint_is_refused_before_downloading(hub, tmp_path, monkeypatch):
    from q3vl.hub.checkpoint import resolve_checkpoint

    hub.add_files("org/bin-only", {"config.json": b"{}", "tokenizer.json": b"{}", "pytorch_model.bin": b"0"})
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    with pytest.raises(CheckpointError, match=r"lacks model.safetensors or model.safetensors.index.json \(it has "
                                              r"\['pytorch_model.bin'\]: q3vl reads safetensors only\)"):
        resolve_checkpoint("org/bin-only", progress=False)
    assert hub.downloads() == []


# ------------------------------------------------------------------ pre-flight
def _two_b_repo(hub: LoopbackHub, shard: int = 2_200_000_000) -> None:
    """A repo shaped like Qwen3-VL-Embedding-2B: the real config; weights listed with sizes, never served."""
    from q3vl.testing.shapes import config_dict

    cfg = config_dict("2b", "embedding")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    hub.add_files("tiny-org/big", {"config.json": json.dumps(cfg).encode(), "tokenizer.json": b"{}",
                                   "model.safetensors.index.json": json.dumps(index).encode(),
                                   "model-00001-of-00002.safetensors": Blob(None, shard),
                                   "model-00002-of-00002.safetensors": Blob(None, 2_000_000_000)})


def _probe(ram: float, disk: float):
    from q3vl.hub.preflight import Machine

    return lambda paths: Machine(int(ram * 1e9), {str(p): int(disk * 1e9) for p in paths})


def test_preflight_refuses_a_2b_export_with_the_figures_before_any_weight_is_downloaded(hub, tmp_path, monkeypatch):
    from q3vl.export.exporter import export_bundle
    from q3vl.hub import preflight

    _two_b_repo(hub)
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    monkeypatch.setattr(preflight, "probe_machine", _probe(ram=8, disk=100))
    with pytest.raises(preflight.PreflightError) as e:
        export_bundle("tiny-org/big", tmp_path / "b", progress=False)
    assert str(e.value) == ("tiny-org/big: not enough memory: the parity check needs 18.0 GB of RAM (the float32 "
                            "transformers reference beside the bundle), 8.0 GB available; the export alone needs "
                            "3.5 GB: pass validate=False (--no-validate) to export without the check (stamped in the "
                            "manifest)")
    assert set(hub.downloads()) <= {"config.json", "model.safetensors.index.json"}  # the shape, nothing else
    monkeypatch.setattr(preflight, "probe_machine", _probe(ram=2, disk=100))
    with pytest.raises(preflight.PreflightError, match="the export needs 3.5 GB of RAM, 2.0 GB available"):
        export_bundle("tiny-org/big", tmp_path / "b", validate=False, progress=False)
    monkeypatch.setattr(preflight, "probe_machine", _probe(ram=64, disk=5))
    with pytest.raises(preflight.PreflightError, match=r"not enough disk to download tiny-org/big: its files need "
                                                       r"4.2 GB in the Hub cache \(.*\), 5.0 GB free there|"
                                                       r"not enough disk: the download and the bundle need"):
        export_bundle("tiny-org/big", tmp_path / "b", progress=False)
    assert not any(name.endswith(".safetensors") for name in hub.downloads())
    assert not (tmp_path / "b").exists()


def test_a_file_list_claiming_a_100_gb_shard_is_refused_before_downloading(hub, tmp_path, monkeypatch):
    from q3vl.export.exporter import export_bundle
    from q3vl.hub import preflight

    _two_b_repo(hub, shard=100_000_000_000)
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    monkeypatch.setattr(preflight, "probe_machine", _probe(ram=64, disk=50))  # the disk cannot hold it
    with pytest.raises(preflight.PreflightError, match="its files need 102.0 GB in the Hub cache"):
        export_bundle("tiny-org/big", tmp_path / "b", progress=False)
    assert hub.downloads() == []
    monkeypatch.setattr(preflight, "probe_machine", _probe(ram=64, disk=1e6))  # a disk that could: still refused
    with pytest.raises(preflight.PreflightError, match="its weight files are listed at 102.0 GB, but the 28-layer "
                                                       "model of its config.json holds 2,127,532,032 parameters"):
        export_bundle("tiny-org/big", tmp_path / "b", progress=False)
    assert not any(name.endswith(".safetensors") for name in hub.downloads())


def test_parameter_counts_equal_transformers_and_the_bundle_estimate_its_size(tiny_embedding_bundle):
    import math

    from q3vl.hub.preflight import bundle_bytes, parameter_counts
    from q3vl.spec import ModelSpec
    from q3vl.testing.checkpoint import parameter_shapes
    from q3vl.testing.shapes import config_dict

    for shape in ("tiny", "2b", "8b"):
        cfg = config_dict(shape, "embedding")
        shapes = parameter_shapes(cfg)  # transformers' own model, built on the meta device
        counts = parameter_counts(ModelSpec.from_config(cfg))
        for part, prefix in (("text", "model.language_model"), ("vision", "model.visual"), ("lm_head", "lm_head")):
            assert counts[part] == sum(math.prod(s) for n, s in shapes.items() if n.startswith(prefix)), (shape, part)
    manifest = json.loads((tiny_embedding_bundle / "q3vl.json").read_text())
    actual = sum(f["size"] for f in manifest["files"].values())
    estimate = bundle_bytes(ModelSpec.from_dict(manifest["model"]))
    assert abs(estimate - actual) / actual < 0.02, (estimate, actual)


# ------------------------------------------------------------------ bundles by id
def test_a_bundle_by_id_gives_the_local_vectors_and_downloads_each_file_once(
        hub, tiny_embedding_bundle, tmp_path, monkeypatch):
    from q3vl import Embedder

    sha = hub.add_folder("org/tiny-embedding-q3vl", tiny_embedding_bundle)
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    items = [{"text": "a cat on a sofa"}, {"text": "quarterly revenue", "instruction": "Find the report"}]
    with Embedder(tiny_embedding_bundle) as local, Embedder("org/tiny-embedding-q3vl") as remote:
        a, b = local.process(items), remote.process(items)
        assert remote.path == tmp_path / "hf" / "hub" / "models--org--tiny-embedding-q3vl" / "q3vl" / sha
    assert np.all(np.sum(a * b, axis=1) >= 0.999999)
    files = json.loads((tiny_embedding_bundle / "q3vl.json").read_text())["files"]
    assert sorted(hub.downloads()) == sorted(["q3vl.json", *files])
    requests = len(hub.log)
    with Embedder(f"org/tiny-embedding-q3vl@{sha}") as pinned:  # a pinned commit in the cache: no request at all
        assert np.allclose(pinned.process(items), a, atol=1e-6)
    assert len(hub.log) == requests


def test_q3vl_rerank_by_id_gives_the_local_scores_and_downloads_each_file_once(hub, tiny_reranker_bundle, tmp_path):
    from q3vl import Reranker

    sha = hub.add_folder("org/tiny-reranker-q3vl", tiny_reranker_bundle)
    query = {"text": "quarterly revenue"}
    docs = ["revenue rose 4% in the quarter", "a cat on a sofa", "the board met on Tuesday"]
    (tmp_path / "q.json").write_text(json.dumps(query))
    lines = [json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    r = q3vl("rerank", f"org/tiny-reranker-q3vl@{sha}", str(tmp_path / "q.json"), str(tmp_path / "d.jsonl"),
             "-o", str(tmp_path / "s.jsonl"), env=hub_env(hub, tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    with Reranker(tiny_reranker_bundle) as local:
        expected = local.process({"query": query, "documents": [{"text": t} for t in docs]})
    assert [g["id"] for g in got] == ["d0", "d1", "d2"]
    assert np.max(np.abs(np.array([g["score"] for g in got]) - np.asarray(expected))) <= 1e-6
    files = json.loads((tiny_reranker_bundle / "q3vl.json").read_text())["files"]
    assert sorted(hub.downloads()) == sorted(["q3vl.json", *files])


def test_what_is_not_a_bundle_is_refused_in_one_line(hub, tiny_embedding, tiny_embedding_bundle, tmp_path,
                                                      monkeypatch):
    from q3vl.hub.bundle import resolve_bundle

    serve_checkpoint(hub, "tiny-org/ckpt", tiny_embedding)
    newer = json.loads((tiny_embedding_bundle / "q3vl.json").read_text())
    newer["format_version"] = 99
    hub.add_files("org/future", {"q3vl.json": json.dumps(newer).encode()})
    hub.add_files("org/onnx-export", {"model.onnx": b"\0" * 64, "config.json": b"{}"})
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "a"}\n')
    r = q3vl("embed", "tiny-org/ckpt", str(items), "-o", str(tmp_path / "v.npy"), env=hub_env(hub, tmp_path / "hf"))
    assert ("tiny-org/ckpt is not a q3vl bundle: it has no q3vl.json (it is a model checkpoint: export it with "
            "`q3vl export tiny-org/ckpt -o BUNDLE_DIR`)") in one_error_line(r)
    assert not (tmp_path / "v.npy").exists()
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    for repo, error, message in (
            ("org/future", BundleError, "bundle format 99 is newer than this q3vl"),
            ("org/onnx-export", BundleError, r"it holds ONNX files \['model.onnx'\] but no q3vl manifest"),
            ("org/missing", HubError, "org/missing was not found on http://127.0.0.1")):
        with pytest.raises(error, match=message):
            resolve_bundle(repo, progress=False)
    assert hub.downloads() == ["q3vl.json"]  # only the newer-format manifest was read


@pytest.mark.parametrize("name", ["../../escape.onnx", "/etc/passwd", "graphs/../../escape.onnx"])
def test_a_repo_whose_files_name_paths_outside_it_is_refused_before_fetching_them(
        hub, tiny_embedding, tiny_embedding_bundle, tmp_path, monkeypatch, name):
    """A hostile repo: its manifest (bundle) or its shard index (checkpoint) names a path outside the snapshot."""
    from q3vl.hub.bundle import resolve_bundle
    from q3vl.hub.checkpoint import resolve_checkpoint

    manifest = json.loads((tiny_embedding_bundle / "q3vl.json").read_text())
    manifest["files"][name] = {"size": 3, "sha256": "0" * 64}
    hub.add_files("org/escape", {"q3vl.json": json.dumps(manifest).encode()})
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors", "b": name}}
    config = (tiny_embedding / "config.json").read_bytes()
    hub.add_files("org/escape-ckpt", {"config.json": config, "tokenizer.json": b"{}",
                                      "model.safetensors.index.json": json.dumps(index).encode(),
                                      "model-00001-of-00001.safetensors": Blob(None, 1000)})
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    with pytest.raises(BundleError, match=f"org/escape: the manifest names the file {re.escape(repr(name))}: bundle "
                                          "paths must be relative"):
        resolve_bundle("org/escape", progress=False)
    with pytest.raises(CheckpointError, match=r"org/escape-ckpt: model.safetensors.index.json names shards the repo "
                                              f"does not list: \\[{re.escape(repr(name))}\\]"):
        resolve_checkpoint("org/escape-ckpt", progress=False)
    assert sorted(hub.downloads()) == ["config.json", "model.safetensors.index.json", "q3vl.json"]
    assert not (tmp_path / "escape.onnx").exists() and not (tmp_path / "hf" / "escape.onnx").exists()


def test_a_bundle_file_whose_content_differs_from_the_manifest_is_refused(hub, tiny_embedding_bundle, tmp_path,
                                                                        monkeypatch):
    from q3vl.hub.bundle import resolve_bundle

    hub.add_folder("org/b", tiny_embedding_bundle)
    hub.corrupt.add("org/b/text.onnx")
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    with pytest.raises(BundleError, match="org/b: the downloaded text.onnx has sha256 .* removed from the cache"):
        resolve_bundle("org/b", progress=False)
    assert not (tmp_path / "hf" / "hub" / "models--org--b" / "q3vl").exists()


def test_bench_takes_a_hub_bundle_as_a_labelled_system(hub, tiny_embedding_bundle, tmp_path, monkeypatch):
    from q3vl.cli.bench import _labelled

    sha = hub.add_folder("org/bench-me", tiny_embedding_bundle)
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    label, path = _labelled("hub=org/bench-me")
    assert (label, path) == ("hub", tmp_path / "hf" / "hub" / "models--org--bench-me" / "q3vl" / sha)
    assert (path / "text.onnx.data").read_bytes() == (tiny_embedding_bundle / "text.onnx.data").read_bytes()
    with pytest.raises(HubError, match="org/absent was not found on http://127.0.0.1"):
        _labelled("x=org/absent")


def test_serve_names_a_hub_bundle_by_its_repo_id(tmp_path):
    from q3vl.serve.config import ServeConfig

    assert ServeConfig(embedding="org/name@v1").model_names() == {"embedding": "org/name"}
    with pytest.raises(ConfigError, match="'..' and '--' are not allowed"):
        ServeConfig(embedding="org/na..me")


def test_runtime_imports_no_hub_client_for_a_local_bundle(tiny_embedding_bundle):
    import subprocess
    import sys

    code = ("import sys, q3vl, q3vl.runtime\nfrom q3vl.runtime.base import _local\n"
            f"assert _local({str(tiny_embedding_bundle)!r}).is_dir()\n"
            "assert not [m for m in sys.modules if m.startswith(('huggingface_hub', 'torch', 'transformers'))]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_hub_cache_copy_survives_a_moved_branch_and_a_second_process(hub, tiny_embedding_bundle, tmp_path,
                                                                         monkeypatch):
    from q3vl.hub.bundle import locate_bundle

    first = hub.add_folder("org/b", tiny_embedding_bundle)
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    a = locate_bundle("org/b", progress=False)
    assert a.source == f"org/b@{first}"
    changed = tmp_path / "changed"
    shutil.copytree(tiny_embedding_bundle, changed)
    template = (changed / "chat_template.jinja").read_bytes()
    (changed / "chat_template.jinja").write_bytes(template[::-1])  # same size, other bytes: a broken commit
    second = hub.add_folder("org/b", changed)
    with pytest.raises(BundleError, match="the downloaded chat_template.jinja"):
        locate_bundle("org/b", progress=False)
    assert locate_bundle(f"org/b@{first}", progress=False).path == a.path  # the verified commit still loads
    assert second != first


@pytest.mark.slow  # a server process (~10 s); the README's serve-by-id block runs in the default suite
def test_serve_by_id_gives_the_local_vectors_and_downloads_each_file_once(hub, tiny_embedding_bundle, tmp_path):
    from q3vl import Embedder
    from tests.serve_server import Server, request

    hub.add_folder("org/served", tiny_embedding_bundle)
    server = Server(["--embedding", "org/served"], tmp_path, env=hub_env(hub, tmp_path / "hf"))
    try:
        server.wait_ready()
        texts = ["a cat on a sofa", "quarterly revenue"]
        status, _, body = request(server.base, "POST", "/v1/embeddings", {"model": "org/served", "input": texts})
        assert status == 200, body
    finally:
        assert server.stop() == 0, server.log()
    remote = np.array([d["embedding"] for d in body["data"]])
    with Embedder(tiny_embedding_bundle) as local:
        expected = local.process([{"text": t} for t in texts])
    assert np.all(np.sum(remote * expected, axis=1) >= 0.999999)
    files = json.loads((tiny_embedding_bundle / "q3vl.json").read_text())["files"]
    assert sorted(hub.downloads()) == sorted(["q3vl.json", *files])


def test_without_the_hub_extra_a_repo_id_names_it_in_one_line(tmp_path, monkeypatch):
    from q3vl.errors import BackendUnavailableError
    from q3vl.hub import client

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nclass B:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'huggingface_hub':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, B())\n")
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = q3vl("embed", "org/name", str(tmp_path / "items.jsonl"), "-o", str(tmp_path / "v.npy"), env=env)
    assert "huggingface_hub is not installed; it comes with the 'hub' extra: pip install 'q3vl[hub]'" in \
        one_error_line(r)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "__version__", "0.36.0")  # what an old tokenizers pin may bring
    with pytest.raises(BackendUnavailableError, match=r"huggingface_hub 0.36.0 is too old .* >= 2.4"):
        client.hf()
