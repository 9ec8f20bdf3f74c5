"""The documentation site builds in strict mode: a broken link, a page left out of the navigation, an
API reference that cannot be resolved or a docstring mkdocstrings cannot render fails the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_docs_site_builds_strict_with_the_api_reference(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-4000:]
    api = (site / "api" / "runtime" / "index.html").read_text(encoding="utf-8")
    for name in ("Embedder", "Reranker", "process_details", "MediaPolicy"):
        assert name in api, name
    # every public API page renders its objects (an id per documented object), not just its title
    pages = {"q3vl": ["q3vl.export.exporter.export_bundle"],
             "runtime": ["q3vl.runtime.Plan", "q3vl.runtime.Loaded", "q3vl.runtime.BatchPolicy",
                         "q3vl.runtime.Details"],
             "codes": ["q3vl.codes.Calibration", "q3vl.codes.quantize_embeddings", "q3vl.codes.index.BinaryIndex"],
             "errors": ["q3vl.errors.InputError", "q3vl.errors.missing_extra"],
             "integrations": ["q3vl.integrations.langchain.Q3VLEmbeddings", "q3vl.integrations.chroma.Q3VLLoader"],
             "ray": ["q3vl.ray.job.embed_corpus", "q3vl.ray.udf.EmbedBatch"]}
    for page, ids in pages.items():
        html = (site / "api" / page / "index.html").read_text(encoding="utf-8")
        assert all(f'id="{i}"' in html for i in ids), (page, [i for i in ids if f'id="{i}"' not in html])
    # the home page includes the README's status table and benchmarks/README.md is a page, not a copy
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "built, not run on a GPU" in home and "--8&lt;--" not in home
    assert "CPU speed" in (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
