"""Plain-torch reproduction of the gloo abort at process exit (no Lightning, no lightning_rank).

Two spawned gloo processes run a few collectives on Python tensors and return without destroying the
process group. Sometimes a gloo worker thread drops the last reference to a finished collective's
tensors while the interpreter finalizes. It then needs the GIL, Python ends the thread with
``pthread_exit``, and the forced unwind through a ``noexcept`` destructor calls ``std::terminate``.
The process prints "terminate called without an active exception" and dies with SIGABRT.
Destroying the group in an ``atexit`` handler, as ``lightning_rank`` now does, prevents it::

    python tests/stress/gloo_exit_repro.py --runs 40            # e.g. 31/40 passed
    python tests/stress/gloo_exit_repro.py --runs 40 --destroy  # 40/40 passed
"""

from __future__ import annotations

import argparse
import atexit
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank: int, port: int, destroy: bool) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if destroy:
        atexit.register(_destroy)
    for _ in range(20):
        dist.all_reduce(torch.randn(1000))
        dist.broadcast_object_list([rank], 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--destroy", action="store_true", help="destroy the process group at exit (the fix)")
    args = parser.parse_args()
    passed = 0
    for _ in range(args.runs):
        try:
            mp.spawn(_worker, args=(_free_port(), args.destroy), nprocs=2)
            passed += 1
        except mp.ProcessExitedException as err:
            print(err, flush=True)
    print(f"{passed}/{args.runs} passed (destroy at exit: {args.destroy})")


if __name__ == "__main__":
    main()
