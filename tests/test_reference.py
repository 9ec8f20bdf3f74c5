"""The PyTorch reference against hand-computed oracles (docs/reference-behaviour.md)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from tests.conftest import noise_image

SYS = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
RERANK_SYS = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
              'Note that the answer can only be "yes" or "no".')


def image_block(n: int) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"


def video_blocks(times: list[str], n: int) -> str:
    return "".join(f"<{t} seconds><|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>" for t in times)


def rendered(ref, inputs) -> list[str]:
    batch = ref.preprocess(inputs)
    out = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        out.append(ref.processor.tokenizer.decode(ids[mask.bool()]))
    return out


@pytest.mark.parametrize("instruction,expected", [
    (None, "Represent the user's input."),
    ("", "Represent the user's input."),
    ("Find the image", "Find the image."),
    ("  Find the image  ", "Find the image."),
    ("Is this a cat?", "Is this a cat?"),
    ("找到图片。", "找到图片。"),          # U+3002 is category Po: no period appended
    ("Retrieve «quotes»", "Retrieve «quotes»"),  # Pf counts as punctuation too
    ("Answer: 42", "Answer: 42."),
])
def test_embedder_instruction_rule(ref_embedder, instruction, expected):
    item = {"text": "hello"} if instruction is None else {"text": "hello", "instruction": instruction}
    assert rendered(ref_embedder, [item]) == [SYS.format(expected, "hello")]


def test_embedder_content_order_and_null(ref_embedder, video_file):
    img = noise_image(100, 150)  # smart_resize -> 96 x 160 -> 15 tokens
    items = [
        {"text": ["a", "b"], "image": [img, img], "video": str(video_file)},
        {},
        {"text": ""},
        {"image": img},
    ]
    got = rendered(ref_embedder, items)
    d = "Represent the user's input."
    vid = video_blocks(["0.5", "2.4"], 135)
    assert got[0] == SYS.format(d, vid + image_block(15) * 2 + "ab")
    assert got[1] == SYS.format(d, "NULL")
    assert got[2] == SYS.format(d, "")
    assert got[3] == SYS.format(d, image_block(15))


def test_embedder_token_ids_match_tokenizer(ref_embedder):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ref_embedder.processor.tokenizer.name_or_path) + "/tokenizer.json")
    text = "Multilingual: 你好, мир, مرحبا!\n\n  spaces"
    batch = ref_embedder.preprocess([{"text": text}])
    expected = tok.encode(SYS.format("Represent the user's input.", text), add_special_tokens=False).ids
    assert batch["input_ids"][0].tolist() == expected
    assert expected[-5:] == [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n


def test_pooled_position_right_padding_and_l2(ref_embedder):
    items = [{"text": "short"}, {"text": "a much longer text " * 8}]
    batch = ref_embedder.preprocess(items)
    mask = batch["attention_mask"]
    assert ref_embedder.processor.tokenizer.padding_side == "right"
    assert mask[0, -1] == 0 and mask[1, -1] == 1  # row 0 is right-padded
    pooled = ref_embedder.process(items, normalize=False)
    raw = ref_embedder.model(**batch).last_hidden_state
    last0 = int(mask[0].sum()) - 1
    assert torch.equal(pooled[0], raw[0, last0])
    assert batch["input_ids"][0, last0] == 198  # the template's final "\n"
    alone = ref_embedder.process(items[:1], normalize=False)
    assert torch.allclose(alone[0], pooled[0], atol=1e-5)
    normed = ref_embedder.process(items)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert torch.allclose(normed, pooled / pooled.norm(dim=-1, keepdim=True), atol=1e-6)


def test_embeddings_are_discriminative(ref_embedder):
    emb = ref_embedder.process([{"text": "a cat"}, {"text": "quarterly earnings report"},
                                {"image": noise_image(64, 64, 1)}])
    sims = (emb @ emb.T).numpy()
    assert sims[np.triu_indices(3, 1)].max() < 0.99


def test_reranker_template(ref_reranker):
    conv = ref_reranker.format_pair({"text": "what is a cat"}, {"text": "a small animal"}, None, None, None)
    ids = ref_reranker.tokenize_pair(conv)["input_ids"]
    user = ("<Instruct>: Given a search query, retrieve relevant candidates that answer the query."
            "<Query>:what is a cat\n<Document>:a small animal")
    assert ref_reranker.processor.tokenizer.decode(ids) == SYS.format(RERANK_SYS, user)
    conv = ref_reranker.format_pair({"text": ("  custom instr", "q")}, {}, "ignored", None, None)
    text = ref_reranker.processor.tokenizer.decode(ref_reranker.tokenize_pair(conv)["input_ids"])
    assert "<Instruct>:   custom instr<Query>:q\n<Document>:NULL<|im_end|>" in text  # not stripped, NULL
    conv = ref_reranker.format_pair({"text": "q"}, {"text": ""}, "", None, None)
    text = ref_reranker.processor.tokenizer.decode(ref_reranker.tokenize_pair(conv)["input_ids"])
    assert "retrieve relevant candidates that answer the query.<Query>:q\n<Document>:<|im_end|>" in text


def test_reranker_score_equals_lm_head_softmax(ref_reranker):
    query, docs = {"text": "what is a cat"}, [{"text": "a cat is an animal"}, {"image": noise_image(64, 96)}]
    scores = ref_reranker.process({"query": query, "documents": docs})
    for doc, score in zip(docs, scores):
        pair = ref_reranker.tokenize_pair(ref_reranker.format_pair(query, doc, None, None, None))
        h = ref_reranker.hidden_last(ref_reranker.collate([pair]))
        logits = ref_reranker.lm_head(h)[0]
        p = torch.softmax(logits[[ref_reranker.no_id, ref_reranker.yes_id]], dim=-1)[1]
        assert abs(float(p.detach()) - score) < 1e-6
    assert isinstance(scores[0], float)
    assert ref_reranker.process({"query": {}, "documents": docs}) == []


def test_reranker_truncation_keeps_tail_and_specials(ref_reranker):
    special = set(range(151643, 151657))
    assert ref_reranker.special_ids == special
    query = {"text": "q " * 30}
    doc = {"text": "long document " * 40, "image": noise_image(64, 64)}
    conv = ref_reranker.format_pair(query, doc, None, None, None)
    full = ref_reranker.tokenize_pair(conv)["input_ids"]
    old = ref_reranker.max_length
    ref_reranker.max_length = 60
    try:
        cut = ref_reranker.tokenize_pair(conv)["input_ids"]
        score = ref_reranker.process({"query": query, "documents": [doc]})
    finally:
        ref_reranker.max_length = old
    assert cut[-5:] == full[-5:] == [151645, 198, 151644, 77091, 198]
    assert [t for t in cut if t in special] == [t for t in full if t in special]
    n_special = sum(t in special for t in full[:-5])
    plain_kept = [t for t in cut[:-5] if t not in special]
    assert plain_kept == [t for t in full[:-5] if t not in special][:60 - n_special]
    assert len(cut) == 65 and 0 <= score[0] <= 1


def test_reranker_batched_equals_one_pair_per_pass(ref_reranker, video_file):
    query = {"text": "find the clip"}
    docs = [{"text": "short"}, {"text": "a much longer document " * 10}, {"image": noise_image(96, 64)},
            {"video": str(video_file)}, {"text": "x", "image": [noise_image(64, 64), noise_image(32, 128)]}, {}]
    single = ref_reranker.process({"query": query, "documents": docs})
    ref_reranker.batch_size = 4
    try:
        batched = ref_reranker.process({"query": query, "documents": docs})
    finally:
        ref_reranker.batch_size = 1
    assert np.abs(np.array(single) - np.array(batched)).max() <= 1e-5
    assert np.ptp(single) > 1e-3  # scores differ between documents


# ---------------------------------------------------------------- preprocessing oracles
def smart_resize_by_hand(h: int, w: int, factor: int, lo: int, hi: int) -> tuple[int, int]:
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def patchify_by_hand(rgb: np.ndarray, t: int = 2) -> np.ndarray:
    """[H, W, 3] uint8 -> rows of (C, T, 16, 16) in 2x2 merge-block order, (x - 127.5) / 127.5."""
    x = (rgb.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    h, w = x.shape[0] // 16, x.shape[1] // 16
    rows = []
    for bi in range(h // 2):
        for bj in range(w // 2):
            for i in range(2):
                for j in range(2):
                    p = x[(2 * bi + i) * 16:(2 * bi + i + 1) * 16, (2 * bj + j) * 16:(2 * bj + j + 1) * 16]
                    rows.append(np.repeat(p.transpose(2, 0, 1)[:, None], t, axis=1).reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize("h,w,grid", [(80, 208, (1, 4, 12)), (100, 150, (1, 6, 10)), (20, 700, (1, 2, 44)),
                                      (3000, 2000, None)])
def test_image_smart_resize_and_pixel_values(ref_embedder, h, w, grid):
    from PIL import Image

    img = noise_image(h, w, 3)
    rh, rw = smart_resize_by_hand(h, w, 32, 4096, 1_843_200)
    if grid:
        assert (1, rh // 16, rw // 16) == grid  # ties to even: 80 -> 64, 208 -> 192
    batch = ref_embedder.preprocess([{"image": img}])
    assert batch["image_grid_thw"].tolist() == [[1, rh // 16, rw // 16]]
    expected = patchify_by_hand(np.asarray(img.resize((rw, rh), Image.BICUBIC)))
    assert np.array_equal(batch["pixel_values"].numpy(), expected)
    assert int((batch["input_ids"] == 151655).sum()) == rh * rw // 1024


def test_video_file_frames_grid_and_timestamps(ref_embedder, video_file):
    # 30 frames at 10 fps = 3 s; fps 1 -> 3 frames, clamped up to 4 -> indices 0, 10, 19, 29
    for item, idx in [({"video": str(video_file)}, [0, 10, 19, 29]),
                      ({"video": str(video_file), "fps": 2, "max_frames": 9}, None)]:
        batch = ref_embedder.preprocess([item])
        n = 4 if idx else 6  # 3 s x 2 fps = 6, max_frames 9 -> floor to even 8 -> 6
        idx = idx or np.linspace(0, 29, n).round().astype(int).tolist()
        times = [f"{(idx[k] / 10 + idx[k + 1] / 10) / 2:.1f}" for k in range(0, n, 2)]
        assert batch["video_grid_thw"].tolist() == [[n // 2, 18, 30]]  # 120x200 -> 288x480 (min per frame)
        text = ref_embedder.processor.tokenizer.decode(batch["input_ids"][0])
        assert re.findall(r"<([\d.]+) seconds>", text) == times
        assert text.count("<|video_pad|>") == n // 2 * 135


def test_frame_list_quirks(ref_embedder):
    frames = [noise_image(50, 70, i) for i in range(5)]
    batch = ref_embedder.preprocess([{"video": frames, "max_frames": 2, "fps": 5}])  # per-item values ignored
    # factor-64 image path: 50x70 -> 64x64 -> min 16384 -> 128x192; video min 131072 -> 320x448
    assert batch["video_grid_thw"].tolist() == [[3, 20, 28]]  # 5 frames padded to 6
    text = ref_embedder.processor.tokenizer.decode(batch["input_ids"][0])
    assert re.findall(r"<([\d.]+) seconds>", text) == ["0.2", "1.2", "2.2"]
    many = [noise_image(32, 32, i) for i in range(100)]
    batch = ref_embedder.preprocess([{"video": many}])
    assert batch["video_grid_thw"][0, 0].item() == 32  # 100 frames -> constructor max_frames 64 -> 32 pairs
