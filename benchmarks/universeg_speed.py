"""Throughput of our UniverSeg network at the paper's setting (S=64 support items, 128x128).

Times the network the way UniverSegSegmenter calls it: one support set shared by a chunk of
queries (an ``expand``-ed view), no grad, fp32 on CPU, fp32 and bf16 autocast on CUDA. The
weights are random: this measures speed only, never accuracy.

    python benchmarks/universeg_speed.py [--queries 8] [--chunk 4] [--cuda-queries 64]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from spe_lightning.reverse.universeg import UniverSeg

SIZE = 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_queries(
    model: UniverSeg, device: torch.device, n_queries: int, chunk: int, support: int, bf16: bool
) -> tuple[float, float]:
    """(queries per second, peak CUDA memory in GiB or nan) for ``n_queries`` after one warm-up chunk."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(1, support, 1, SIZE, SIZE, generator=gen).to(device)
    labels = (torch.rand(1, support, 1, SIZE, SIZE, generator=gen) > 0.5).float().to(device)
    queries = torch.rand(n_queries, 1, SIZE, SIZE, generator=gen).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def run(batch: torch.Tensor) -> None:
        q = batch.shape[0]
        with torch.no_grad(), amp:
            model(batch, images.expand(q, -1, -1, -1, -1), labels.expand(q, -1, -1, -1, -1))

    run(queries[:chunk])  # warm-up: kernel selection, allocator
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(0, n_queries, chunk):
        run(queries[i : i + chunk])
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return n_queries / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--support", type=int, default=64)
    parser.add_argument("--queries", type=int, default=8, help="CPU queries timed")
    parser.add_argument("--chunk", type=int, default=4, help="CPU queries per forward pass")
    parser.add_argument("--cuda-queries", type=int, default=64)
    parser.add_argument("--cuda-chunk", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = UniverSeg().eval().requires_grad_(False)
    print(f"# UniverSeg speed: S={args.support}, {SIZE}x{SIZE}, RANDOM weights (timing only, not accuracy)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print()
    print("| device | precision | queries | chunk | queries/s | peak GPU mem (GiB) |")
    print("|---|---|---:|---:|---:|---:|")
    rows = [("cpu", False, args.queries, args.chunk)]
    if torch.cuda.is_available():
        rows += [("cuda", bf16, args.cuda_queries, args.cuda_chunk) for bf16 in (False, True)]
    for dev_name, bf16, n, chunk in rows:
        device = torch.device(dev_name)
        model.to(device)
        qps, peak = time_queries(model, device, n, chunk, args.support, bf16)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        mem = "-" if peak != peak else f"{peak:.1f}"
        print(f"| {label} | {'bf16 autocast' if bf16 else 'fp32'} | {n} | {chunk} | {qps:.2f} | {mem} |")
    if not torch.cuda.is_available():
        print("\n(CUDA not available: GPU rows skipped.)")


if __name__ == "__main__":
    main()
