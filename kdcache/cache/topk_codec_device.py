"""The sqrt-delta top-k decoder in torch, so that a trainer ships the codes to its device and decodes them there.

Why: on the host the decoder is the largest cost of reading a coded cache (about half of it, docs/benchmarks.md);
the codes are also half the bytes of the decoded int32 ids and float32 log-probs, so copying codes and decoding on
a GPU takes that work off the CPU and halves the host-to-device traffic. The arithmetic is the one of
``topk_codec._decode_block`` (ids in ascending order, the order a set needs), op for op in float32, so both decode
the same ids and log-probabilities to float32 rounding (tests/test_topk_codec_device.py compares them).

Corruption is checked on the device and reported with one host sync per call, as the numpy decoder reports it;
codes beyond the grid are clamped before any table lookup (an index out of range would be a device-side assert).
"""

from __future__ import annotations

from typing import Mapping

import torch

import kdcache.cache.topk_codec as topk_codec


def decode(streams: Mapping[str, torch.Tensor], params: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """{stream: uint8 [N, width]} (``topk_codec.stream_widths``) on any device -> (ids [N, k] int64 ascending,
    logprobs [N, k] float32, tail_logprob [N] float32) on that device. Raises ValueError on corrupt codes."""
    k, V, step, nb_ids, nb_val, max_code = topk_codec._layout(params)
    widths = topk_codec.stream_widths(params)
    missing = sorted(set(widths) - set(streams))
    if missing:
        raise ValueError(f"missing streams {missing}; a {topk_codec.CODEC} blob has {list(widths)}")
    n = streams["ids_b0"].shape[0]
    for name, w in widths.items():
        if tuple(streams[name].shape) != (n, w) or streams[name].dtype != torch.uint8:
            raise ValueError(f"stream {name} is {streams[name].dtype} {tuple(streams[name].shape)}, expected uint8 ({n}, {w})")
    device = streams["ids_b0"].device
    gaps = _join([streams[f"ids_b{j}"] for j in range(nb_ids)])
    ids = torch.cumsum(gaps, dim=1).add_(torch.arange(k, device=device))
    vals = _join([streams[f"val_b{j}"] for j in range(nb_val)])
    codes = vals[:, :k] + vals[:, k : k + 1]
    tail_codes = vals[:, k + 1]
    mass, logmass = (torch.from_numpy(t).to(device) for t in topk_codec._tables(step))
    centred = codes.float().sub_(1)
    total = (centred * centred).sum(1).add_(k / 12)
    total.sub_((codes == 0).sum(1).float() * (13 / 12))  # exact zeros (-inf log-probs) carry no mass
    too_big = torch.maximum(codes.max(), tail_codes.max()) > max_code if n else None
    codes, tail_codes = codes.clamp_(max=max_code), tail_codes.clamp(max=max_code)  # no lookup out of the tables
    total.mul_(step * step).add_(mass[tail_codes])
    if n:
        bad = torch.stack([ids[:, -1].max() >= V, ids.min() < 0, too_big, ~(total.min() > 0)])
        flags = bad.tolist()  # the one sync
        if any(flags):
            what = ["decoded ids reach the vocabulary size or beyond", "decoded ids are negative",
                    f"a value code exceeds {max_code}, the code of p = 1", "a row decodes to no probability mass"]
            raise ValueError(f"corrupt {topk_codec.CODEC} data: " + "; ".join(w for w, f in zip(what, flags) if f))
    log_total = total.log()
    return ids, logmass[codes].sub_(log_total[:, None]), logmass[tail_codes].sub_(log_total)


def _join(planes: list[torch.Tensor]) -> torch.Tensor:
    """Byte planes (least significant first) -> int64."""
    out = planes[-1].long()
    for p in planes[-2::-1]:
        out.bitwise_left_shift_(8).bitwise_or_(p)
    return out
