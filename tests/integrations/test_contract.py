"""The integrations' contract: `import q3vl` imports no framework, and each integration used without
its extra fails with one line naming that extra (`pip install 'q3vl[<extra>]'`).
"""

from __future__ import annotations

import json
import subprocess
import sys

from q3vl.errors import missing_extra

FRAMEWORKS = ("langchain_core", "langchain_openai", "llama_index", "lancedb", "chromadb", "tiktoken")
INTEGRATIONS = {"langchain": ("langchain_core", "langchain"), "llama_index": ("llama_index.core", "llamaindex"),
                "lancedb": ("lancedb", "lancedb"), "chroma": ("chromadb", "chroma")}


def test_import_q3vl_imports_no_framework():
    code = "import q3vl, q3vl.integrations, q3vl.integrations.client, q3vl.integrations.models"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "q3vl" in imported and not imported & set(FRAMEWORKS), imported & set(FRAMEWORKS)


BLOCKED = """
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ModuleNotFoundError('blocked: ' + name, name=name)
sys.meta_path.insert(0, Block())
out = {{}}
for module in {modules!r}:
    try:
        __import__('q3vl.integrations.' + module)
    except Exception as e:
        out[module] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


def test_each_integration_without_its_extra_names_the_extra_in_one_line():
    code = BLOCKED.format(blocked=("langchain_core", "llama_index", "lancedb", "chromadb"), modules=list(INTEGRATIONS))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout)
    for module, (package, extra) in INTEGRATIONS.items():
        kind, message = errors[module]
        assert kind == "BackendUnavailableError" and message == str(missing_extra(package, extra)), (module, message)
        assert "\n" not in message and f"pip install 'q3vl[{extra}]'" in message
