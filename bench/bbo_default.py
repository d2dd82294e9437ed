"""The black-box default (`python -m sqdf_fast.bbo`) against the default training job, back to back, same machine.

    python bench/bbo_default.py [--repeats N] [--json PATH]

Runs `python -m sqdf_fast.train` and `python -m sqdf_fast.bbo` with no options (each in a fresh process, with a
temporary --out), alternating, N times each, and appends one JSON row to bench/results/bbo_default.jsonl (or PATH):
both process wall times per repeat, their medians and ratio (target: the black-box default within 3x the
training job), the training job's final figures (a change meant to leave results alone keeps them equal), the
black-box run's time split summed over its rounds and the share of the proxy fit and bonus in the rounds' time
(target: under 10%), its oracle reward base and final, and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bbo_default.jsonl"
TIME_KEYS = ("sampling", "oracle", "proxy", "finetune", "eval")


def timed(module: str, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", module, "--out", str(out), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    walls = {"train": [], "bbo": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            walls["train"].append(timed("sqdf_fast.train", Path(tmp) / f"train{i}"))
            walls["bbo"].append(timed("sqdf_fast.bbo", Path(tmp) / f"bbo{i}"))
        summary = json.loads((Path(tmp) / f"bbo{args.repeats - 1}" / "summary.json").read_text())
        trained = json.loads((Path(tmp) / f"train{args.repeats - 1}" / "summary.json").read_text())
    train_s, bbo_s = statistics.median(walls["train"]), statistics.median(walls["bbo"])
    split = {k: summary[f"time_{k}_s"] for k in TIME_KEYS}
    rounds_s = sum(split.values())
    row = {
        "bench": "bbo_default", "commands": ["python -m sqdf_fast.train", "python -m sqdf_fast.bbo"],
        "train_wall_s": [round(w, 1) for w in walls["train"]], "bbo_wall_s": [round(w, 1) for w in walls["bbo"]],
        "train_median_s": round(train_s, 1), "bbo_median_s": round(bbo_s, 1), "ratio": round(bbo_s / train_s, 2),
        "split_s": split, "proxy_share": round(split["proxy"] / rounds_s, 4),
        "oracle_reward_base": summary["oracle_reward_base"], "oracle_reward_final": summary["oracle_reward_final"],
        "queries": summary["queries"], "diversity_final": summary["diversity_final"], "fd_final": summary["fd_final"],
        "kl_final": summary["kl_final"],
        # the training job's own figures: a change meant to leave results alone keeps them equal
        "train_summary": {k: trained[k] for k in ("reward_final", "diversity_final", "fd_final", "path_kl_final")},
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()[0], "torch": torch.__version__,
        "python": platform.python_version(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(f"train {train_s:.1f} s | bbo {bbo_s:.1f} s | ratio {row['ratio']:.2f} (target <= 3) | proxy fit and bonus "
          f"{100 * row['proxy_share']:.2f}% of the rounds (target < 10%) | split {split}")
    print(f"appended to {args.json}")


if __name__ == "__main__":
    main()
