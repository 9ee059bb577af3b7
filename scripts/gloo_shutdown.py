"""How often a gloo worker aborts at exit, with and without ``close_process_group``.

Each trial spawns 2 processes that all-reduce a few tensors and return. With ``--leave`` the
process group is left to interpreter shutdown (what Lightning does); otherwise the workers call
:func:`dpexp.distributed.close_process_group`. Prints one line: trials, aborted workers' runs.
See docs/distributed.md.

    python scripts/gloo_shutdown.py --trials 80 --leave
    python scripts/gloo_shutdown.py --trials 80
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpexp.distributed import close_process_group


def _worker(rank: int, init_file: str, leave: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for _ in range(5):
        dist.all_reduce(torch.ones(100))
    if not leave:
        close_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--leave", action="store_true", help="do not close the process group")
    args = parser.parse_args()
    aborted = 0
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(args.trials):
            init_file = str(Path(tmp) / f"pg{trial}")
            try:
                mp.start_processes(_worker, args=(init_file, args.leave), nprocs=2)
            except mp.ProcessExitedException:
                aborted += 1
    mode = "left to shutdown" if args.leave else "closed"
    killed = f"{aborted} of {args.trials} trials had a worker killed by a signal"
    print(f"process group {mode}: {killed}")


if __name__ == "__main__":
    main()
