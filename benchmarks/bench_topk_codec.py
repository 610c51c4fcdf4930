"""Top-k codecs on the real teacher: stored bytes per token after Parquet zstd, codec KL, encode/decode speed.

SmolLM2-135M-Instruct (the embedded GGUF, fp32 on CPU) over held-out stdlib docstrings (rows from --skip on, past
the demo's 300; one example per docstring, at most --length tokens). Its fp32 logits are reduced once to the
top-128 ids and log-probs plus the exact tail log-mass at each k (from the full vocabulary, float64) and cached
in ``<work>/teacher_top128.npz``; reruns read that file.

For each k in {16, 32, 64, 128} and each layout, the examples are encoded and written to a real Parquet file
(zstd, one row per example, the columns the layout needs); bytes/token = the file's compressed column chunk sizes
/ positions. KL is over the k+1 buckets (the k probabilities and the tail mass) between the fp32 teacher
(float64 arithmetic) and the decoded cache, per position; mean and max over positions. Speeds are one thread,
the codec alone (numpy in, numpy out; no Parquet), median of --repeats.

    .venv/bin/python benchmarks/bench_topk_codec.py --work runs/topk-codec
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and torch load
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from common import file_column_bytes, machine, pin_one_core  # noqa: E402
from kdcache.cache import topk_codec as tc  # noqa: E402

KS = (16, 32, 64, 128)
KMAX = max(KS)


def collect(path: Path, positions: int, skip: int, length: int) -> dict[str, np.ndarray]:
    """Teacher top-128 over >= ``positions`` next-token positions; cached in ``path``."""
    if path.is_file():
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        if int(data["offsets"][-1]) >= positions:
            return data
    import torch

    from kdcache.pipeline.corpus import stdlib_docstrings
    from kdcache.pipeline.smollm2 import smollm2_gguf
    from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher

    teacher = TransformersTeacher(str(smollm2_gguf()), device="cpu", dtype="float32")
    teacher.load()
    tok = teacher.tokenizer
    ids_out, lp_out, tails, offsets = [], [], [], [0]
    t0 = time.perf_counter()
    for i, row in enumerate(stdlib_docstrings()):
        if i < skip:
            continue
        ids = tok(row["text"], add_special_tokens=False)["input_ids"][:length]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logits = teacher.model(torch.tensor([ids])).logits[0, :-1].float()
        logp = torch.log_softmax(logits.double(), dim=-1)
        values, index = logp.topk(KMAX, dim=-1)
        rest = torch.logsumexp(logp.scatter(-1, index, float("-inf")), dim=-1)  # exact mass outside the top-128
        # tail at k: the mass outside the top-k = rest + the top-k..128 values, all in float64
        tail = torch.stack([torch.logaddexp(rest, torch.logsumexp(values[:, k:], dim=-1)) if k < KMAX else rest for k in KS], 1)
        ids_out.append(index.int().numpy())
        lp_out.append(values.float().numpy())
        tails.append(tail.numpy())
        offsets.append(offsets[-1] + len(ids) - 1)
        if offsets[-1] >= positions:
            break
    print(f"teacher: {offsets[-1]:,} positions from {len(offsets) - 1} docstrings in {time.perf_counter() - t0:.0f} s")
    data = {"ids": np.concatenate(ids_out), "logprobs": np.concatenate(lp_out), "tails": np.concatenate(tails),
            "offsets": np.asarray(offsets, dtype=np.int64), "vocab": np.asarray(teacher.vocab_size)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


# -- layouts: each turns the examples' rows into Arrow columns (one row per example) and reads them back ----------------

@dataclass
class Layout:
    name: str
    encode: Callable  # (ids, lp, tail, lengths) -> {column: Arrow array}
    decode: Callable  # ({column: Arrow array}, lengths) -> (ids, lp, tail)
    codec_encode: Callable  # the codec alone: (ids, lp, tail, lengths) -> anything
    codec_decode: Callable  # the codec alone, on what codec_encode returned
    codec_decode_rank: Callable | None = None


def binary_column(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """A binary Arrow column from one buffer and per-row offsets, without copying."""
    return pa.BinaryArray.from_buffers(pa.binary(), len(offsets) - 1, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])


def binary_buffer(col: pa.ChunkedArray) -> memoryview:
    """The bytes of every row of a binary column back to back (zero-copy for one unsliced chunk)."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + len(arr) + 1]
    return memoryview(arr.buffers()[2])[offsets[0] : offsets[-1]]


def list_column(values: np.ndarray, lengths: np.ndarray) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))


def today_layout(k: int) -> Layout:
    """The cache today: list<int32> ids in rank order, list<fp16> log-probs, list<float32> tail."""
    def encode(ids, lp, tail, lengths):
        return {"topk_ids": list_column(ids.astype(np.int32), lengths * k), "topk_logprobs": list_column(lp.astype(np.float16), lengths * k),
                "tail_logprob": list_column(tail.astype(np.float32), lengths)}

    def decode(cols, lengths):
        flat = {n: c.combine_chunks().values.to_numpy() for n, c in cols.items()}
        return flat["topk_ids"].reshape(-1, k), flat["topk_logprobs"].astype(np.float32).reshape(-1, k), flat["tail_logprob"]

    return Layout("today: list<int32> + list<fp16> + list<f32>", encode, decode,
                  lambda ids, lp, tail, lengths: (ids.astype(np.int32), lp.astype(np.float16), tail.astype(np.float32)),
                  lambda enc: (enc[0], enc[1].astype(np.float32), enc[2]))


def codec_layout(k: int, vocab: int, kl: float, one_blob: bool = False) -> Layout:
    """The codec: a binary column per stream (or all streams in one blob per example), one blob per example."""
    params = tc.make_params(k, vocab, kl=kl)
    widths = tc.stream_widths(params)

    def encode(ids, lp, tail, lengths):
        many = tc.encode_many(ids, lp, tail, lengths, params)
        if not one_blob:
            return {f"topk_{n}": binary_column(d, o) for n, (d, o) in many.items()}
        per_example = [b"".join(d[o[e] : o[e + 1]].tobytes() for d, o in many.values()) for e in range(len(lengths))]
        return {"topk_blob": pa.array(per_example, pa.binary())}

    def decode(cols, lengths):
        if not one_blob:
            return tc.decode_many({n: binary_buffer(cols[f"topk_{n}"]) for n in widths}, lengths, params)
        blob = np.frombuffer(binary_buffer(cols["topk_blob"]), np.uint8)
        ends = np.cumsum(np.concatenate([[0], lengths])) * sum(widths.values())
        streams, at = {n: [] for n in widths}, ends[:-1].copy()
        for n, w in widths.items():  # the blob of example e is its streams back to back
            for e, m in enumerate(lengths):
                streams[n].append(blob[at[e] : at[e] + m * w])
            at += lengths * w
        return tc.decode_many({n: np.concatenate(s) for n, s in streams.items()}, lengths, params)

    name = f"codec kl={kl:g} (step {params['step']:.2e})" + (", one blob/example" if one_blob else f", {len(widths)} binary columns")
    return Layout(name, encode, decode, lambda ids, lp, tail, lengths: tc.encode(ids, lp, tail, params),
                  lambda enc: tc.decode(enc, params), lambda enc: tc.decode(enc, params, order="rank"))


# -- measurements ------------------------------------------------------------------------------------------------------

def parquet_bytes(cols: dict, lengths: np.ndarray, path: Path, row_group_tokens: int = 16_384) -> dict[str, int]:
    """Write ``cols`` as the cache writer does (zstd-1, no dictionary or statistics, 256 KiB v2 pages, page CRCs,
    row groups of ~16k tokens) and return the compressed size of each column's chunks."""
    table = pa.table(cols)
    with pq.ParquetWriter(path, table.schema, compression="zstd", compression_level=1, use_dictionary=False, write_statistics=False,
                          data_page_size=256 * 1024, data_page_version="2.0", write_page_checksum=True) as w:
        start, tokens = 0, 0
        for e, m in enumerate(lengths):
            tokens += int(m)
            if tokens >= row_group_tokens or e == len(lengths) - 1:
                w.write_table(table.slice(start, e + 1 - start))
                start, tokens = e + 1, 0
    return file_column_bytes(path)


def kl_per_position(ids, lp, tail, d_ids, d_lp, d_tail) -> np.ndarray:
    """KL(teacher || decoded) over the k+1 buckets, float64, buckets matched by id; both sides normalised."""
    p = np.exp(np.concatenate([np.take_along_axis(lp.astype(np.float64), np.argsort(ids, 1), 1), tail[:, None]], 1))
    q = np.exp(np.concatenate([np.take_along_axis(d_lp.astype(np.float64), np.argsort(d_ids, 1), 1), d_tail.astype(np.float64)[:, None]], 1))
    if not (np.sort(ids, 1) == np.sort(d_ids, 1)).all():
        raise AssertionError("decoded id sets differ from the teacher's")
    p /= p.sum(1, keepdims=True)
    q /= q.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(1)


def read_columns(path: Path) -> dict[str, pa.ChunkedArray]:
    table = pq.read_table(path, use_threads=False, page_checksum_verification=True)
    return {name: table.column(name) for name in table.column_names}


def tokens_per_s(fn: Callable, n: int, repeats: int) -> float:
    fn()  # warm: first-call allocations and page faults are not the steady state
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/topk-codec")
    ap.add_argument("--positions", type=int, default=12_000)
    ap.add_argument("--skip", type=int, default=600, help="docstrings skipped (the demo trains on the first 300)")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    pin_one_core()
    work = Path(args.work)
    data = collect(work / "teacher_top128.npz", args.positions, args.skip, args.length)
    vocab, lengths = int(data["vocab"]), np.diff(data["offsets"])
    n = int(lengths.sum())
    print(f"machine: {machine()}; one thread; {n:,} positions in {len(lengths)} examples (docstrings), V = {vocab:,}; "
          f"bytes/token = Parquet zstd-1 column chunks / positions; speeds: median of {args.repeats}, tokens (positions) / s\n")
    print("| k | layout | B/token | of which ids | mean KL | max KL | encode (codec) | decode (codec, id order) | "
          "decode (codec, rank order) | read + decode (Parquet -> numpy) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in KS:
        ids = np.ascontiguousarray(data["ids"][:, :k])
        lp = np.ascontiguousarray(data["logprobs"][:, :k])
        tail64 = data["tails"][:, KS.index(k)]
        tail = tail64.astype(np.float32)
        layouts = [today_layout(k), codec_layout(k, vocab, tc.DEFAULT_KL), codec_layout(k, vocab, tc.DEFAULT_KL, one_blob=True),
                   codec_layout(k, vocab, 3e-5), codec_layout(k, vocab, 3e-4)]
        for lay in layouts:
            cols = lay.encode(ids, lp, tail, lengths)
            path = work / f"k{k}.parquet"
            sizes = parquet_bytes(cols, lengths, path)
            size = sum(sizes.values())
            id_bytes = sum(v for c, v in sizes.items() if c.startswith(("topk_ids", "topk_ids_b")))
            read = lambda: lay.decode(read_columns(path), lengths)  # noqa: E731
            d_ids, d_lp, d_tail = read()
            kl = kl_per_position(ids, lp, tail64, d_ids, d_lp, d_tail)
            enc = lay.codec_encode(ids, lp, tail, lengths)
            speeds = [tokens_per_s(lambda: lay.codec_encode(ids, lp, tail, lengths), n, args.repeats),
                      tokens_per_s(lambda: lay.codec_decode(enc), n, args.repeats),
                      tokens_per_s(lambda: lay.codec_decode_rank(enc), n, args.repeats) if lay.codec_decode_rank else None,
                      tokens_per_s(read, n, args.repeats)]
            cells = " | ".join("—" if s is None else f"{s / 1e6:.2f}M" for s in speeds)
            ids_cell = f"{id_bytes / n:.1f}" if id_bytes else "—"
            print(f"| {k} | {lay.name} | {size / n:.1f} | {ids_cell} | {kl.mean():.2e} | {kl.max():.2e} | {cells} |")
            path.unlink()
        floor = (math.lgamma(vocab + 1) - math.lgamma(k + 1) - math.lgamma(vocab - k + 1)) / math.log(2) / 8
        print(f"| {k} | floor: log2 C(V, k) / 8 (a uniformly random id set; no values) | {floor:.1f} | {floor:.1f} | | | | | | |")
        for peer_k, peer_bytes, peer_kl in PEER:
            if peer_k == k:
                print(f"| {k} | peer (reported, not measured here) | {peer_bytes} | | {peer_kl:.1e} | | | | | |")


PEER = [(64, 184, 3.5e-4), (128, 312, 2.3e-4)]


if __name__ == "__main__":
    main()
