"""Model cards and `q3vl push` against the loopback Hub (tests/hub_server.py implements the upload endpoints
the client calls: create repo, validate YAML, preupload, commit).

The card's oracle is the manifest (figures) and `huggingface_hub.ModelCard` (the YAML); its how-to-load
blocks run under tests/snippets.py against the pushed repo (`-m slow`: a server process per card).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import pytest

from q3vl.errors import BundleError
from tests.hub_server import LoopbackHub, hub_env, point_client_at
from tests.test_cli import one_error_line, q3vl


@pytest.fixture
def hub():
    with LoopbackHub() as server:
        yield server


@pytest.fixture(scope="module")
def int8_bundle(tiny_embedding_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from q3vl.export.quantize.weights import quantize_bundle

    return quantize_bundle(tiny_embedding_bundle, tmp_path_factory.mktemp("card") / "int8", "int8", method="dynamic",
                           progress=False)


def card_rows(text: str) -> dict[str, list[str]]:
    """The parity table's rows: case -> cells."""
    table = text.split("## Parity", 1)[1].split("## Files", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| case")]
    return {r[0]: r[1:] for r in rows}


def check_card(bundle: Path, text: str) -> None:
    """The card's metadata parses and its parity figures are the manifest's, exactly."""
    from huggingface_hub import ModelCard

    manifest = json.loads((bundle / "q3vl.json").read_text())
    card = ModelCard(text)  # parses the YAML front matter (raises on malformed metadata)
    assert card.data.library_name == "q3vl" and card.data.pipeline_tag == "feature-extraction"
    assert {"q3vl", "onnx", "embedding", manifest["graphs"]["text"]["precision"]} <= set(card.data.tags)
    parity, rows = manifest["parity"], card_rows(text)
    for case, figures in parity["cases"].items():
        cells = rows[case]
        assert cells[1] == ", ".join(map(str, figures["shapes"]))
        assert cells[2] == (repr(figures["vision_min_cos"]) if "vision_min_cos" in figures else "")
        assert float(cells[3]) == figures["embed_min_cos"]
    assert float(rows["**worst**"][3]) == parity["embed_min_cos"]
    assert rows["tolerance"][3] == f">= {parity['tolerance']['embed_cos']!r}"
    for name, meta in manifest["files"].items():
        assert f"| `{name}` | {meta['size']:,} | `{meta['sha256']}` |" in text


def test_the_fp32_card_parses_and_carries_the_manifests_figures(tiny_embedding_bundle):
    text = (tiny_embedding_bundle / "README.md").read_text()
    check_card(tiny_embedding_bundle, text)
    assert "the PyTorch reference (transformers, float32) of the source checkpoint" in text


@pytest.mark.slow  # quantizes a bundle and measures its parity (~10 s)
def test_the_int8_card_parses_and_carries_the_figures_against_the_fp32_bundle(int8_bundle):
    from huggingface_hub import ModelCard

    text = (int8_bundle / "README.md").read_text()
    check_card(int8_bundle, text)
    assert "the float32 bundle it was quantized from" in text and "int8, method dynamic" in text
    assert "int8" in ModelCard(text).data.tags


def test_push_uploads_the_bundle_and_its_card_in_one_commit(hub, tiny_embedding_bundle, tmp_path, monkeypatch):
    from q3vl.hub.push import push_bundle

    point_client_at(hub, tmp_path / "hf", monkeypatch)
    url = push_bundle(tiny_embedding_bundle, "me/tiny-q3vl")
    assert re.fullmatch(rf"{hub.url}/me/tiny-q3vl/commit/[0-9a-f]{{40}}", url)
    posts = [e["path"] for e in hub.log if e["method"] == "POST"]
    assert posts == ["/api/repos/create", "/api/validate-yaml", "/api/models/me/tiny-q3vl/preupload/main",
                     "/api/models/me/tiny-q3vl/commit/main"]
    repo = hub.repos["me/tiny-q3vl"]
    pushed = repo.commits[repo.refs["main"]]
    files = json.loads((tiny_embedding_bundle / "q3vl.json").read_text())["files"]
    assert sorted(pushed) == sorted(["q3vl.json", "README.md", *files])
    card = pushed["README.md"].data.decode()
    check_card(tiny_embedding_bundle, card)
    assert 'Embedder("me/tiny-q3vl")' in card and 'q3vl serve --embedding "me/tiny-q3vl"' in card
    for name, meta in files.items():  # what was uploaded is the bundle, byte for byte
        assert pushed[name].data == (tiny_embedding_bundle / name).read_bytes(), name
        assert len(pushed[name].data) == meta["size"]


def test_push_refuses_a_bundle_whose_parity_failed_before_uploading(hub, tiny_embedding_bundle, tmp_path,
                                                                    monkeypatch):
    from q3vl.hub.push import push_bundle

    failed = tmp_path / "failed"
    shutil.copytree(tiny_embedding_bundle, failed)
    manifest = json.loads((failed / "q3vl.json").read_text())
    manifest["parity"].update(passed=False, summary="embed min cos 0.91 < 0.9999")
    (failed / "q3vl.json").write_text(json.dumps(manifest))
    r = q3vl("push", str(failed), "me/failed", env=hub_env(hub, tmp_path / "hf"))
    assert ("refusing to push " + str(failed) + ": its export-time parity check failed (embed min cos 0.91 < "
            "0.9999)") in one_error_line(r)
    manifest["parity"].update(passed=None, summary="not validated (validate=False)")
    (failed / "q3vl.json").write_text(json.dumps(manifest))
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    with pytest.raises(BundleError, match="its parity was never measured .* pass allow_unvalidated=True"):
        push_bundle(failed, "me/failed")
    assert [e for e in hub.log if e["method"] == "POST"] == [] and "me/failed" not in hub.repos


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_the_pushed_cards_blocks_run_as_written(hub, tiny_embedding_bundle, int8_bundle, tmp_path, monkeypatch,
                                                which):
    from q3vl.hub.push import push_bundle
    from tests.snippets import run_all

    bundle = tiny_embedding_bundle if which == "fp32" else int8_bundle
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    push_bundle(bundle, f"me/card-{which}")
    repo = hub.repos[f"me/card-{which}"]
    card = repo.commits[repo.refs["main"]]["README.md"].data.decode().replace("8000", str(_free_port()))
    (tmp_path / "README.md").write_text(card)
    work = tmp_path / "work"
    work.mkdir()
    outcome = run_all([tmp_path / "README.md"], work, slow=True, env=hub_env(hub, tmp_path / "hf-reader"))
    assert outcome.failures == [], "\n".join(outcome.failures)
    assert len(outcome.ran) == 4  # Python, CLI, the server, a request to it
