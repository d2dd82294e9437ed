"""Run the default job (`python -m sqdf_fast.train` with no options) and record its wall time and figures.

    python bench/default_job.py [--json PATH] [-- extra train options]

Prints a table and appends one JSON row to bench/results/default_job.jsonl (or PATH): the command, wall time,
summary.json, device, CPU count, torch version and a timestamp.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "default_job.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=RESULTS, help="results file to append to")
    parser.add_argument("train_args", nargs="*", help="extra options for sqdf_fast.train (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "sqdf_fast.train", "--out", str(out), "--no-progress", *args.train_args]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
    row = {
        "bench": "default_job", "command": "python -m sqdf_fast.train " + " ".join(args.train_args),
        "process_wall_s": round(wall, 1), **summary,
        "diversity_kept": summary["diversity_final"] / summary["diversity_base"],
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(f"\n{'figure':18s}{'value':>12s}")
    for key in ("process_wall_s", "reward_base", "reward_final", "diversity_base", "diversity_final",
                "diversity_kept", "fd_base", "fd_final", "path_kl_final"):
        print(f"{key:18s}{row[key]:12.4f}")
    print(f"appended to {args.json}")


if __name__ == "__main__":
    main()
