"""sqdf_fast: fast SQDF fine-tuning of diffusion models toward a reward. See README.md.

The Python API (docs/api.md), for notebooks and scripts; the same as the commands:

    from sqdf_fast import make_config, run, resume, load_results, sample_run, export_run

    cfg = make_config(task="digits", steps=40, out="runs/nb")   # a validated TrainConfig, the task's defaults applied
    summary = run(cfg)                                          # python -m sqdf_fast.train; returns summary.json
    summary = resume("runs/nb", steps=80)                       # --resume: only config.RESUMABLE options change
    results = load_results("runs/nb")                           # config, summary, metrics rows, .curve("reward")
    images, cond = sample_run("runs/nb", per_class=8)           # samples of the fine-tuned model
    export_run("runs/sd-run")                                   # python -m sqdf_fast.export (SD tasks)

and `sqdf_fast.compare.compare(...)`, `sqdf_fast.bbo.optimise(...)`. They are imported on first use, so `import
sqdf_fast` stays light.
"""

__version__ = "0.1.0"

# name -> the module that defines it
_API = {"TrainConfig": "sqdf_fast.config", "make_config": "sqdf_fast.config", "run": "sqdf_fast.train",
        "resume": "sqdf_fast.train", "load_results": "sqdf_fast.train", "Results": "sqdf_fast.train",
        "sample_run": "sqdf_fast.sample", "export_run": "sqdf_fast.export"}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'sqdf_fast' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(_API[name]), "make" if name == "make_config" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
