"""Cost of capturing top-k, tail mass and entropy over the logits forward of a teacher, per capture
(kdcache/pipeline/teachers/capture.py), on the teacher scoring path: decoder forward, then the head and
the capture chunk by chunk, exactly as TransformersTeacher.score runs them.

The teacher is a randomly initialised Llama with Llama-3.2-1B's shapes (1.24B parameters, vocab 128,256)
in bf16: capture cost depends on shapes and dtype, not on trained weights, and the GPU machine has no
downloads. Rounds interleave the modes (forward only, then each capture) so the ratios come from one run;
a sanity row gives each capture's largest difference from naive. Under 5 minutes on one H100/H200.

    python benchmarks/gpu.py                                 # CUDA, 1.2B, bf16
    python benchmarks/gpu.py --small --device cpu            # a 20M model on this machine
    python benchmarks/gpu.py --smollm2 --device cpu --dtype float32   # the real SmolLM2-135M teacher
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the GPU machine runs it from a checkout

from kdcache.pipeline.teachers.capture import CaptureSpec, capture_names, capture_positions, get_capture  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "1b": (2048, 8192, 16, 32, 8, 128_256),
    "small": (256, 1024, 4, 4, 2, 49_152),
}


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, ff, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def load_smollm2(device: torch.device, dtype: torch.dtype):
    """The real SmolLM2-135M-Instruct teacher (the embedded GGUF; CPU machines with kdcache's set-up)."""
    from transformers import AutoModelForCausalLM

    from kdcache.pipeline.smollm2 import smollm2_gguf

    gguf = Path(smollm2_gguf())
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_only(logits, targets, spec, u) -> dict:
    """The logits are computed (the head runs) and dropped: the cost every capture is compared with."""
    return {}


@torch.inference_mode()
def run(model, ids: torch.Tensor, mode, spec: CaptureSpec, chunk: int) -> dict:
    out = model.get_decoder()(input_ids=ids)
    feats = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    return capture_positions(feats, model.get_output_embeddings(), targets, model.config.vocab_size, spec, mode, chunk)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a 20M model with SmolLM2's vocabulary (CPU-sized)")
    ap.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M teacher instead (needs kdcache's set-up)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch", type=int, default=None, help="sequences per forward (default 8 on CUDA, 2 on CPU)")
    ap.add_argument("--length", type=int, default=None, help="tokens per sequence (default 2048 on CUDA, 512 on CPU)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=1024, help="positions per logits chunk (the teacher's default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--captures", default=",".join(capture_names()))
    args = ap.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    B, T = args.batch or (8 if cuda else 2), args.length or (2048 if cuda else 512)
    model = load_smollm2(device, dtype) if args.smollm2 else build("small" if args.small else "1b", device, dtype)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    spec = CaptureSpec(args.k)
    modes = {"forward": forward_only, **{n: get_capture(n) for n in args.captures.split(",")}}

    for fn in modes.values():  # warm-up: kernels chosen, compiled capture compiled
        run(model, ids, fn, spec, args.chunk_tokens)
    sync(device)
    seconds: dict[str, list[float]] = {n: [] for n in modes}
    peak: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            run(model, ids, fn, spec, args.chunk_tokens)
            sync(device)
            seconds[name].append(time.perf_counter() - t0)
            if cuda:
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    ref = run(model, ids, get_capture("naive"), spec, args.chunk_tokens)
    tokens = B * (T - 1)
    base = statistics.median(seconds["forward"])
    name_gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"# {name_gpu}, Llama {params:.2f}B {args.dtype}, vocab {model.config.vocab_size}, {B}x{T} tokens per forward, "
          f"k={args.k}, chunks of {args.chunk_tokens}, median of {args.rounds} interleaved rounds")
    print("| mode | tokens/s | capture cost over forward | peak GiB | max |d top-k logp| | max |d tail| | max |d entropy| |")
    print("|---|---|---|---|---|---|---|")
    for name, fn in modes.items():
        t = statistics.median(seconds[name])
        diffs = ["", "", ""]
        if name != "forward":
            got = run(model, ids, fn, spec, args.chunk_tokens)
            tail_ok = torch.isfinite(ref["tail_logprob"])
            diffs = [f"{(got['topk_logprobs'] - ref['topk_logprobs']).abs().max().item():.1e}",
                     f"{(got['tail_logprob'] - ref['tail_logprob'])[tail_ok].abs().max().item():.1e}",
                     f"{(got['entropy'] - ref['entropy']).abs().max().item():.1e}"]
        cost = "" if name == "forward" else f"{(t / base - 1) * 100:+.1f}%"
        print(f"| {name} | {tokens / t:,.0f} | {cost} | {f'{peak[name]:.2f}' if name in peak else '-'} | {' | '.join(diffs)} |")


if __name__ == "__main__":
    main()
