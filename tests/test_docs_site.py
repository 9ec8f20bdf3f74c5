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
