"""Package quality: `python -m sqdf_fast.info` names versions, backends and the optional extras; pyproject.toml
installs every package and offers the extras the README names."""
import importlib.metadata
import re
from pathlib import Path

import pytest

from sqdf_fast import info

try:
    import tomllib
except ImportError:   # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def test_info_prints_versions_backends_and_extras(capsys):
    info.main()
    out = capsys.readouterr().out
    assert re.match(r"python \S+ \| torch \S+ \| triton .* \| diffusers .* \| sqdf_fast ", out)
    assert "cpu tensors:" in out and "policy_step" in out
    extras = out.split("optional extras:\n")[1].splitlines()
    assert [line.split()[0] for line in extras] == ["tensorboard", "wandb", "open_clip", "xformers"]
    for line, (distribution, _, install) in zip(extras, info.EXTRAS.values()):
        try:
            assert f"{importlib.metadata.version(distribution)} installed" in line
        except importlib.metadata.PackageNotFoundError:
            assert "not installed" in line and install in line


def test_pyproject_installs_every_package_and_offers_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sqdf_fast").rglob("__init__.py")}
    assert found | {"sqdf_fast.kernels"} == packages   # a package left out would be missing after `pip install .`
    extras = project["project"]["optional-dependencies"]
    assert {"test", "tensorboard", "wandb", "rewards"} <= set(extras)
    assert any(r.startswith("tensorboard") for r in extras["test"])   # CI reads the events back
    readme = (ROOT / "README.md").read_text()
    for extra in ("tensorboard", "wandb", "rewards"):
        assert f".[{extra}]" in readme or f"sqdf_fast[{extra}]" in readme, extra
