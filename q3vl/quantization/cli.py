"""`q3vl quantize` (weight-quantized bundles, calibration files) and `q3vl index build|search`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from q3vl.cli import command


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="an fp32 bundle")
    p.add_argument("--weights", choices=["int8", "int4", "fp16"], required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--block-size", type=int, default=32, help="int4 (and int8 nbits) block size")
    p.add_argument("--method", choices=["smooth", "dynamic", "nbits"],
                   help="int8 only: smooth (default: calibrated smoothing, per-token activations, spiking "
                        "projections kept float), dynamic (ONNX Runtime dynamic quantization, the previous "
                        "default), nbits (MatMulNBits 8-bit, accuracy level 4)")
    p.add_argument("--checkpoint", type=Path,
                   help="int8 smooth: the checkpoint to calibrate on (default: the bundle's recorded source)")
    p.add_argument("--overwrite", action="store_true")


@command("quantize", _quantize_args)
def _quantize(a: argparse.Namespace) -> int:
    """Write a weight-quantized copy of a bundle, with its parity measured and stored."""
    from q3vl.export.exporter import summary
    from q3vl.quantization.weights import quantize_bundle

    if a.method and a.weights != "int8":
        sys.stderr.write("q3vl: error: --method is for --weights int8\n")
        return 2
    out = quantize_bundle(a.bundle, a.output, a.weights, block_size=a.block_size, overwrite=a.overwrite,
                          method=a.method, checkpoint=a.checkpoint)
    sys.stdout.write(summary(out) + "\n")
    return 0


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", type=Path, help=".npy float32 [N, D] sample (e.g. from q3vl embed)")
    p.add_argument("-o", "--output", type=Path, required=True, help="calibration .json")
    p.add_argument("--dim", type=int, help="Matryoshka dimension the codes will use")
    p.add_argument("--percentile", type=float, default=100.0)


@command("calibrate", _calibrate_args)
def _calibrate(a: argparse.Namespace) -> int:
    """Fit int8/uint8 calibration ranges on a sample of embeddings."""
    from q3vl.quantization.embeddings import Calibration, truncate

    emb = np.load(a.embeddings)
    emb = emb[~np.isnan(emb).any(axis=1)]
    Calibration.fit(truncate(emb, a.dim) if a.dim else emb, a.percentile).save(a.output)
    sys.stdout.write(f"calibration for dim {a.dim or emb.shape[1]} from {len(emb)} vectors -> {a.output}\n")
    return 0


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="embedding bundle")
    p.add_argument("inputs", type=Path, help="JSONL of items to index (an optional 'id' key is kept)")
    p.add_argument("-o", "--output", type=Path, required=True, help="index directory")
    p.add_argument("--dim", type=int, help="Matryoshka dimension")
    p.add_argument("--rescore", choices=["int8", "float32", "none"], default="int8")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default="cpu")


@command("index build", _build_args)
def _index_build(a: argparse.Namespace) -> int:
    """Embed a JSONL file and build a binary index with rescoring vectors."""
    from q3vl.quantization.embeddings import truncate
    from q3vl.quantization.index import BinaryIndex
    from q3vl.runtime import Embedder
    from q3vl.runtime.cli import read_jsonl

    items = read_jsonl(a.inputs)
    ids = [it.pop("id", i) for i, it in enumerate(items)]
    emb = Embedder(a.bundle, batch_size=a.batch_size, backend=a.backend).process(items, progress=True)
    emb = truncate(emb, a.dim) if a.dim else emb
    index = BinaryIndex.build(emb, rescore=a.rescore, meta={"bundle": str(a.bundle.resolve()), "ids": ids,
                                                             "matryoshka_dim": a.dim})
    index.save(a.output)
    sys.stdout.write(f"indexed {len(index)} items (dim {index.dim}, rescore {a.rescore}) -> {a.output}\n")
    return 0


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", type=Path)
    p.add_argument("query", help="query text, or a path to a JSON file holding a query item")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--rescore-multiplier", type=int, default=4)
    p.add_argument("--instruction", help="query instruction")
    p.add_argument("--exact", action="store_true", help="brute-force Hamming search instead of HNSW")


@command("index search", _search_args)
def _index_search(a: argparse.Namespace) -> int:
    """Search an index with a text or a JSON query item; prints id and score per hit."""
    from q3vl.quantization.embeddings import truncate
    from q3vl.quantization.index import BinaryIndex
    from q3vl.runtime import Embedder

    index = BinaryIndex.load(a.index)
    path = Path(a.query)
    item = json.loads(path.read_text()) if path.suffix == ".json" and path.is_file() else {"text": a.query}
    if a.instruction:
        item["instruction"] = a.instruction
    q = Embedder(index.meta["bundle"]).process([item])
    q = truncate(q, index.dim) if index.meta.get("matryoshka_dim") else q
    keys, scores = index.search(q, a.k, a.rescore_multiplier, exact=a.exact)
    ids = index.meta.get("ids")
    for key, score in zip(keys[0], scores[0]):
        if key >= 0:
            sys.stdout.write(json.dumps({"id": ids[key] if ids else int(key), "score": float(score)}) + "\n")
    return 0
