"""SyncBatchNormReLU over gloo ranks on CPU against single-process BatchNormReLU.

    python -m benchmarks.sync_batchnorm [--ranks 2] [--shape 16 64 16 16] [--steps 30]

Each rank trains (forward + backward) on its own batch of `--shape`; the
single-process baseline runs BatchNormReLU on one batch of the same shape, so
the difference is the cost of synchronizing. Bytes are those of the buffers
handed to the collectives in one step (counted while they run), per rank:
the all-gather output of the forward and the all_reduce buffer of the backward.
Every process, the baseline included, uses one thread.
"""

import argparse
import multiprocessing
import multiprocessing.connection
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import fused_bn
from fused_bn.sync_batchnorm import communicated_bytes


def make_batch(shape, dtype, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    return x.requires_grad_(), torch.randn(shape, generator=g).to(dtype)


def time_steps(module, x, grad_output, steps, warmup=3):
    """Median wall time of one forward + backward, in milliseconds."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        module(x).backward(grad_output)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rank_main(rank, world_size, store_path, result_path, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size
    )
    module = fused_bn.SyncBatchNormReLU(args.shape[1]).to(args.dtype)
    x, grad_output = make_batch(args.shape, args.dtype, args.channels_last, seed=rank)
    dist.barrier()
    step_ms = time_steps(module, x, grad_output, args.steps)
    times = [None] * world_size
    dist.all_gather_object(times, step_ms)
    if rank == 0:
        torch.save(max(times), result_path)
    dist.destroy_process_group()


def run_ranks(args):
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        result_path = os.path.join(tmp, "result.pt")
        workers = [
            context.Process(
                target=rank_main, args=(rank, args.ranks, store_path, result_path, args)
            )
            for rank in range(args.ranks)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(args.timeout)
        alive = [w for w in workers if w.is_alive()]
        for worker in alive:
            worker.kill()
        if alive or any(w.exitcode != 0 for w in workers):
            raise SystemExit(
                f"rank failed or timed out: exit codes {[w.exitcode for w in workers]}"
            )
        return torch.load(result_path)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--shape",
        type=int,
        nargs="+",
        default=[16, 64, 16, 16],
        help="per-rank input shape (N, C, *)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per rank")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    args.shape = tuple(args.shape)
    return args


def main():
    args = parse_args()
    # The ranks are forked before this process runs any parallel kernel.
    synced_ms = run_ranks(args)
    torch.set_num_threads(1)
    local = {
        2: fused_bn.BatchNormReLU1d,
        3: fused_bn.BatchNormReLU1d,
        4: fused_bn.BatchNormReLU2d,
        5: fused_bn.BatchNormReLU3d,
    }[len(args.shape)]
    x, grad_output = make_batch(args.shape, args.dtype, args.channels_last, seed=0)
    single_ms = time_steps(local(args.shape[1]).to(args.dtype), x, grad_output, args.steps)

    layout = "channels_last" if args.channels_last else "contiguous"
    print(
        f"shape per rank {args.shape}, {str(args.dtype).replace('torch.', '')}, {layout}, "
        f"CPU, 1 thread per process, median of {args.steps} steps (forward + backward)"
    )
    print(
        "| module | ranks | step ms | vs single | bytes/step/rank (fwd gather + bwd all_reduce) |"
    )
    print("|---|---|---|---|---|")
    print(f"| BatchNormReLU | 1 | {single_ms:.3f} | 1.00x | 0 |")
    gathered, reduced = communicated_bytes(args.shape[1], args.ranks, args.dtype)
    print(
        f"| SyncBatchNormReLU (gloo) | {args.ranks} | {synced_ms:.3f} | "
        f"{synced_ms / single_ms:.2f}x | {gathered + reduced} ({gathered} + {reduced}) |"
    )


if __name__ == "__main__":
    main()
