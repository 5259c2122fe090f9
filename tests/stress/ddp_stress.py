"""Run the DDP tests many times in fresh processes and print how many runs passed (not collected by pytest).

An intermittent failure at process exit (a worker killed by SIGABRT after training completed) shows
up only in some runs, so one green run proves little. Usage, from the repository root::

    python tests/stress/ddp_stress.py                 # 30 runs of every DDP test, one after the other
    python tests/stress/ddp_stress.py --jobs 2 --load 1 -k test_ddp_parameters_identical_after_finetuning

``--jobs N`` runs N at a time and ``--load N`` keeps N busy-looping processes running meanwhile, to
raise CPU contention (the failure depended on thread timing at exit). Failed runs keep their output
under ``--log-dir``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DDP_TESTS = [
    "tests/test_compression.py::test_ddp_parameters_identical_after_finetuning",
    "tests/test_monitor.py::test_ddp_spawn_two_processes_equal_one",
    "tests/test_ddp.py",
]


def _burn() -> None:
    while True:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (more contention)")
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes to run alongside")
    parser.add_argument("-k", default=None, help="pytest -k expression to select among the DDP tests")
    parser.add_argument("--log-dir", type=Path, default=Path("ddp_stress_logs"))
    parser.add_argument("tests", nargs="*", default=None, help=f"pytest node ids (default: {' '.join(DDP_TESTS)})")
    args = parser.parse_args()

    tests = args.tests or [t for t in DDP_TESTS if (ROOT / t.split("::")[0]).exists()]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    if args.k:
        command += ["-k", args.k]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(" ".join(command), flush=True)

    def one(run: int) -> bool:
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        ok = done.returncode == 0
        tail = (done.stdout.strip().splitlines() or [""])[-1]
        print(f"run {run:2d}/{args.runs}: {'pass' if ok else 'FAIL'} in {time.perf_counter() - start:.0f}s  {tail}",
              flush=True)
        if not ok:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            (args.log_dir / f"run{run:02d}.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
        return ok

    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.load)]
    for burner in burners:
        burner.start()
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            passed = sum(pool.map(one, range(1, args.runs + 1)))
    finally:
        for burner in burners:
            burner.terminate()
    print(f"{passed}/{args.runs} passed")
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
