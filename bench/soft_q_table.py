"""Medians over seeds of a `python -m sqdf_fast.compare` folder, with the target metrics its report leaves out.

    python bench/soft_q_table.py bench/results/soft-q-gmm2d-ring [more folders]

compare's report gives mean +- std of the metrics it knows (results.json); this reads the same rows and, where the
runs' folders are still there (OUT/runs/<label>-seed<k>/summary.json), every `*_final` key of their summaries (the
digits task's fd_to_target, target_ess and target_reward among them), and writes per label the median over seeds of
each metric, the seeds' values and the base model's median, to OUT/medians.json and OUT/medians.md.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = ("reward", "diversity", "fd", "path_kl", "dist_to_target", "fd_to_target", "mode_weight_error",
           "mode_coverage", "target_reward", "target_ess", "wall_s")


def per_run(folder: Path, row: dict) -> dict:
    """The row's metrics, plus every *_final (and *_base) of its run's summary.json where the run folder is kept."""
    values = {k: v for k, v in row.items() if k not in ("method", "seed")}
    summary = folder / "runs" / f"{row['method']}-seed{row['seed']}" / "summary.json"
    if summary.is_file():
        for key, value in json.loads(summary.read_text()).items():
            if key.endswith("_final"):
                values.setdefault(key.removesuffix("_final"), value)
            elif key.endswith("_base"):
                values.setdefault("base_" + key.removesuffix("_base"), value)
    return values


def medians(folder: Path) -> dict:
    rows = [r for r in json.loads((folder / "results.json").read_text()) if "failed" not in r]
    runs = [(r["method"], r["seed"], per_run(folder, r)) for r in rows]
    labels = list(dict.fromkeys(label for label, _, _ in runs))
    table = {}
    base = [v for _, _, v in runs]
    table["base model"] = {"seeds": sorted({seed for _, seed, _ in runs})}   # its evaluation seeds
    for c in COLUMNS:
        present = [v[f"base_{c}"] for v in base if v.get(f"base_{c}") is not None]
        if present:
            table["base model"][c] = statistics.median(present)
    for label in labels:
        values = [(seed, v) for name, seed, v in runs if name == label]
        entry = {"seeds": [seed for seed, _ in values]}
        for column in COLUMNS:
            present = [v[column] for _, v in values if v.get(column) is not None]
            if present:
                entry[column] = statistics.median(present)
                entry[f"{column}_per_seed"] = present
        table[label] = entry
    return table


def markdown(folder: Path, table: dict) -> str:
    columns = [c for c in COLUMNS if any(c in e for e in table.values())]
    lines = [f"# Medians over seeds: `{folder.name}`", "",
             f"From `{folder}/results.json` and its runs' summary.json (`python bench/soft_q_table.py {folder}`); "
             "per-seed values in medians.json.", "",
             "| method | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for label, entry in table.items():
        cells = [f"{entry[c]:.4g}" if c in entry else "" for c in columns]
        lines.append(f"| {label} | {len(entry.get('seeds', []))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    for name in (sys.argv[1:] if argv is None else argv):
        folder = Path(name)
        table = medians(folder)
        (folder / "medians.json").write_text(json.dumps(table, indent=1) + "\n")
        (folder / "medians.md").write_text(markdown(folder, table))
        print(markdown(folder, table))


if __name__ == "__main__":
    main()
