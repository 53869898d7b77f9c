"""Run a test body in several processes joined by a gloo process group.

``run_ranks(body, directory, *args)`` spawns ``world_size`` processes; each
joins a gloo group through a file store in ``directory`` (with a timeout, so
a collective that never completes fails instead of hanging), runs
``body(rank, directory, *args)`` and hands back its return value through a
file. A rank that raises writes its traceback beside it. The parent fails the
test on a rank still running at the deadline or one that exited with an
error, showing every rank's traceback, and never leaves a process behind.

``body`` must be a module-level function: spawned processes import it.
"""

import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist

WORLD_SIZE = 2
GROUP_TIMEOUT_S = 60
DEADLINE_S = 180  # process start-up (import torch) included


def gloo_available():
    return dist.is_available() and dist.is_gloo_available()


def _rank_main(rank, body, directory, args, world_size):
    torch.set_num_threads(1)  # several processes on a small machine
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(directory, 'store')}", rank=rank,
            world_size=world_size, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        try:
            result = body(rank, directory, *args)
            # Every rank's collectives done before any rank tears the group
            # down: a rank that destroys it while the other still has gloo
            # work in flight can abort that one ("terminate called without an
            # active exception").
            dist.barrier()
        finally:
            dist.destroy_process_group()
        torch.save(result, os.path.join(directory, f"result{rank}.pt"))
    except BaseException:
        with open(os.path.join(directory, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)
    # The result is on disk: leave at once, skipping the interpreter's
    # teardown. A rank has aborted now and then after its body returned (exit
    # code -6, no traceback, in a few of many full test runs), even after the
    # barrier above; the parent's message says whether its result was saved.
    os._exit(0)


def run_ranks(body, directory, *args, world_size=WORLD_SIZE, deadline_s=DEADLINE_S):
    """[what ``body`` returned on rank 0, rank 1, ...]."""
    directory = str(directory)
    context = torch.multiprocessing.get_context("spawn")
    processes = [context.Process(target=_rank_main,
                                 args=(rank, body, directory, args, world_size), daemon=True)
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        deadline = time.monotonic() + deadline_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        errors = [os.path.join(directory, f"error{rank}.txt") for rank in range(world_size)]
        reports = "\n".join(open(path).read() for path in errors if os.path.exists(path))
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        assert not hung, f"ranks {hung} still running after {deadline_s} s\n{reports}"
        codes = [process.exitcode for process in processes]
        saved = [os.path.exists(os.path.join(directory, f"result{rank}.pt"))
                 for rank in range(world_size)]
        assert codes == [0] * world_size, f"exit codes {codes}, results saved {saved}\n{reports}"
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(os.path.join(directory, f"result{rank}.pt"), weights_only=False)
            for rank in range(world_size)]
