"""Prompt-structure integrity: user text can never place a special token; linear-time truncation; bounded templates."""

from __future__ import annotations

import time

import numpy as np
import pytest

from q3vl.errors import BundleError, ConfigError, LimitError
from q3vl.preprocess.encode import Encoder, PreprocessConfig
from q3vl.preprocess.items import content, embed_item
from q3vl.preprocess.prompt import ChatTemplate, TextTokenizer
from q3vl.testing.checkpoint import chat_template

SYSTEM_RR = ('Judge whether the Document meets the requirements based on the Query and the Instruct '
             'provided. Note that the answer can only be "yes" or "no".')


@pytest.fixture(scope="module")
def tokenizer(tiny_embedding):
    return TextTokenizer(tiny_embedding / "tokenizer.json")


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return Encoder(tokenizer, ChatTemplate(chat_template()), PreprocessConfig(max_length=8192))


def oracle(tokenizer, parts):
    """Ids of a prompt given as [("special", token) | ("text", str)]: text is plain, specials are ids."""
    plain = tokenizer._plain  # the same tokenizer.json with encode_special_tokens on
    ids = []
    for kind, value in parts:
        if kind == "special":
            ids.append(tokenizer.special_tokens[value])
        else:
            ids += plain.encode(value, add_special_tokens=False).ids
    return ids


def embed_prompt(tokenizer, instruction, text):
    S = lambda t: ("special", t)  # noqa: E731
    return oracle(tokenizer, [S("<|im_start|>"), ("text", f"system\n{instruction}"), S("<|im_end|>"), ("text", "\n"),
                              S("<|im_start|>"), ("text", f"user\n{text}"), S("<|im_end|>"), ("text", "\n"),
                              S("<|im_start|>"), ("text", "assistant\n")])


def rerank_prompt(tokenizer, instruction, query, doc):
    S = lambda t: ("special", t)  # noqa: E731
    user = f"user\n<Instruct>: {instruction}<Query>:{query}\n<Document>:{doc}"
    return oracle(tokenizer, [S("<|im_start|>"), ("text", f"system\n{SYSTEM_RR}"), S("<|im_end|>"), ("text", "\n"),
                              S("<|im_start|>"), ("text", user), S("<|im_end|>"), ("text", "\n"),
                              S("<|im_start|>"), ("text", "assistant\n")])


def punct(instruction):
    return instruction if instruction[-1] in ".!?" else instruction + "."


def test_special_tokens_in_every_user_field_are_plain_text(encoder, tokenizer):
    specials = sorted(tokenizer.special_tokens)
    assert len(specials) == 14 and "<|im_end|>" in specials and "<|image_pad|>" in specials
    all_special = set(tokenizer.special_tokens.values())
    template_ids = set(embed_prompt(tokenizer, "Represent the user's input.", "x")) & all_special
    for tok in specials:
        half = len(tok) // 2
        text = f"before {tok} after"
        for texts in ([text], [f"before {tok[:half]}", f"{tok[half:]} after"]):  # whole, and split across elements
            got = encoder.embedding(embed_item({"text": texts}), "Represent the user's input.").ids.tolist()
            assert got == embed_prompt(tokenizer, "Represent the user's input.", "".join(texts)), (tok, texts)
            special_ids = [i for i in got if i in all_special]
            assert len(special_ids) == 5 and set(special_ids) <= template_ids, tok  # the template's own, only
        inst = f"Find {tok} now"
        got = encoder.embedding(embed_item({"text": "q", "instruction": inst}), "unused").ids.tolist()
        assert got == embed_prompt(tokenizer, punct(inst), "q"), tok
        got = encoder.embedding(embed_item({"text": "q"}), f"default {tok}").ids.tolist()
        assert got == embed_prompt(tokenizer, f"default {tok}", "q"), tok  # the constructor's default_instruction
        query, doc = content({"text": [f"q {tok[:half]}", tok[half:]]}), content({"text": f"d {tok} d"})
        got = encoder.rerank_pair(query, doc, f"I {tok}", None, None).ids.tolist()
        assert got == rerank_prompt(tokenizer, f"I {tok}", f"q {tok}", f"d {tok} d"), tok


def test_ordinary_text_still_tokenizes_as_the_reference(encoder, tokenizer):
    """Without specials in user text, the marker-based tokenization is the plain whole-string one."""
    for text in ("hello", "多语言文本 and mixed text", "x²+y² = r² 🚀", "a\nb\n\n c", ":leading punctuation"):
        full = ("<|im_start|>system\nRepresent the user's input.<|im_end|>\n<|im_start|>user\n" + text
                + "<|im_end|>\n<|im_start|>assistant\n")
        got = encoder.embedding(embed_item({"text": text}), "Represent the user's input.").ids.tolist()
        assert got == tokenizer.encode(full), text


def test_truncation_of_many_texts_is_linear(tokenizer):
    enc = Encoder(tokenizer, ChatTemplate(chat_template()), PreprocessConfig(max_length=512))
    for n in (2000, 12000):
        texts = [f"w{k} " for k in range(n)]
        t0 = time.perf_counter()
        out = enc.embedding(embed_item({"text": texts}), "Represent the user's input.")
        took = time.perf_counter() - t0
        assert len(out.ids) <= 512 and out.ids[-5:].tolist() == [151645, 198, 151644, 77091, 198]
        kept = tokenizer.decode(out.ids.tolist())
        assert "w0 w1 w2 " in kept and f"w{n - 1} " not in kept  # the first texts survive, the last go
        assert took < 5.0, (n, took)


def test_reranker_truncation_cuts_document_text_then_query_text(tokenizer):
    enc = Encoder(tokenizer, ChatTemplate(chat_template()), PreprocessConfig(max_length=300))
    query, doc = content({"text": [f"q{k} " for k in range(3000)]}), content({"text": [f"d{k} " for k in range(5000)]})
    t0 = time.perf_counter()
    out = enc.rerank_pair(query, doc, "I", None, None)
    assert time.perf_counter() - t0 < 5.0 and 290 <= len(out.ids) <= 300
    kept = tokenizer.decode(out.ids.tolist())
    assert "d0 " not in kept and "q0 q1 " in kept and kept.endswith("<|im_start|>assistant\n")
    short = enc.rerank_pair(content({"text": "q"}), content({"text": "d " * 2000}), "I", None, None)
    assert len(short.ids) == 300 and "<Query>:q\n<Document>:d d" in tokenizer.decode(short.ids.tolist())


def test_millions_of_tiny_strings_are_refused_at_once(tokenizer):
    enc = Encoder(tokenizer, ChatTemplate(chat_template()), PreprocessConfig(max_length=512))
    t0 = time.perf_counter()
    with pytest.raises(LimitError, match="max_parts=16384"):
        enc.embedding(embed_item({"text": ["a"] * 1_000_000}), "x")
    assert time.perf_counter() - t0 < 5.0


def test_text_length_is_capped_before_tokenizing(tokenizer):
    enc = Encoder(tokenizer, ChatTemplate(chat_template()), PreprocessConfig(max_length=512, max_text_chars=1000))
    with pytest.raises(LimitError, match="max_text_chars=1000"):
        enc.embedding(embed_item({"text": ["a" * 600, "b" * 600]}), "x")
    enc.embedding(embed_item({"text": "a" * 900}), "x")


def test_templates_are_bounded(tmp_path):
    with pytest.raises(BundleError, match="does not parse"):
        ChatTemplate("{% for x in %}")
    slow = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{{ j.real }}{% endfor %}"
                        "{% endfor %}")
    t0 = time.perf_counter()
    with pytest.raises(BundleError, match="longer than"):
        slow.render([])
    assert time.perf_counter() - t0 < 15
    with pytest.raises(BundleError, match="too large"):
        ChatTemplate("{{ 'x' * 10000000000 }}").render([])
    with pytest.raises(BundleError, match="exponent"):
        ChatTemplate("{{ 10 ** 100000000 }}").render([])


def test_bad_default_instruction_is_a_config_error(tiny_embedding_bundle):
    from q3vl.runtime import Embedder

    with pytest.raises(ConfigError, match="default_instruction is not valid Unicode"):
        Embedder(tiny_embedding_bundle, default_instruction="bad \ud800")
    emb = Embedder(tiny_embedding_bundle, default_instruction="Find <|im_end|> things")
    a = emb.process([{"text": "x"}])
    assert np.isfinite(a).all()
