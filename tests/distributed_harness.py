"""Runs a function on several gloo ranks, each in its own process, for the tests.

A worker that fails or hangs fails the test in bounded time: the others are killed
rather than left waiting in a collective, and the report carries each rank's
traceback.
"""

import os
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# fork shares the already imported torch with the workers: a run starts in
# about a second instead of the many seconds a fresh interpreter takes.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
RUN_TIMEOUT_S = 120
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


class DistributedRunError(AssertionError):
    """A worker failed, died or did not finish in time."""


def _worker(rank, world_size, store_path, out_dir, scenario, args):
    torch.set_num_threads(1)  # ranks share the machine's cores
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        results = scenario(rank, world_size, *args)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_distributed(tmp_path, world_size, scenario, *args, timeout=RUN_TIMEOUT_S):
    """Runs scenario(rank, world_size, *args) on `world_size` gloo ranks; returns
    each rank's result. Raises DistributedRunError as soon as a worker exits with
    an error (the others are killed rather than left waiting in a collective),
    or when the run takes longer than `timeout` seconds."""
    context = mp.get_context(START_METHOD)
    store_path = tmp_path / "store"
    workers = [
        context.Process(
            target=_worker,
            args=(rank, world_size, str(store_path), str(tmp_path), scenario, args),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + timeout
    running = list(workers)
    failed = False
    while running and not failed and time.monotonic() < deadline:
        wait([w.sentinel for w in running], timeout=max(0.0, deadline - time.monotonic()))
        running = [w for w in running if w.exitcode is None]
        failed = any(w.exitcode not in (None, 0) for w in workers)
    for worker in running:
        worker.kill()
    for worker in workers:
        worker.join()
    if running or failed:
        raise DistributedRunError(_failure_report(tmp_path, workers, timed_out=not failed))
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]


def _failure_report(tmp_path, workers, timed_out):
    lines = [f"distributed run {'timed out' if timed_out else 'failed'}:"]
    for rank, worker in enumerate(workers):
        lines.append(f"rank {rank}: exit code {worker.exitcode}")
        error = tmp_path / f"rank{rank}.err"
        if error.exists():
            lines.append(error.read_text())
    return "\n".join(lines)
