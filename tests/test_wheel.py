"""A wheel built from the repository carries everything `xmr repo` needs: nothing is read from a checkout.

The wheel goes NOT editable into a fresh virtual environment. To spare reinstalling torch and friends, that
environment sees this one's site-packages through a `.pth` path line; a path line adds the folder without
processing the `.pth` files inside it, so this checkout's editable finder stays inactive and `xmr` can only
come from the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from xmr.export.repository import MODELS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# a copy of the checkout without what is not source (the build writes build/ and *.egg-info next to it)
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "runs", "artifacts", "tests"
)


def run(cmd, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed (not editable); returns its folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", ignore=NOT_SOURCE)
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", "."],
        cwd=tmp / "src",
    )
    (wheel,) = (tmp / "dist").glob("xmr-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
        cwd=tmp,
    )
    site = Path(
        run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).strip()
    )
    (site / "outer-site-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def env_of(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_wheel_holds_every_subpackage(wheel_env):
    """`packages` in pyproject.toml must name each one; a forgotten one is missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    (xmr,) = wheel_env.glob("lib/python*/site-packages/xmr")
    for package, folder in package_dir.items():
        source = {p.parent.relative_to(ROOT / folder) for p in (ROOT / folder).rglob("__init__.py")}
        installed = xmr / package.removeprefix("xmr.")
        missing = sorted(
            str(Path(folder) / d) for d in source if not (installed / d / "__init__.py").is_file()
        )
        assert not missing, f"not in the wheel (add them to `packages` in pyproject.toml): {missing}"


def test_installed_wheel_writes_a_complete_repository(wheel_env, tiny_artifacts, tmp_path):
    work = tmp_path / "work"  # not the checkout: nothing relative to it may be found
    work.mkdir()
    env, python = env_of(wheel_env), wheel_env / "bin" / "python"
    where = run([python, "-c", "import xmr.export.repository as r; print(r.__file__)"], cwd=work, env=env)
    assert Path(where.strip()).resolve().is_relative_to(wheel_env.resolve()), where

    run(
        [wheel_env / "bin" / "xmr", "repo", tiny_artifacts, "--target", "cpu", "--out", "repo"],
        cwd=work,
        env=env,
    )
    repo = work / "repo"
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert json.loads((repo / "manifest.json").read_text()) == manifest
    assert {p.name for p in repo.iterdir() if p.is_dir()} == set(manifest["specs"])
    for name in manifest["specs"]:
        assert (repo / name / "config.pbtxt").is_file(), name
        version = repo / name / "1"
        assert version.is_dir(), name
        if name not in MODELS:  # an ensemble: an empty version folder
            assert not any(version.iterdir()), name
            continue
        expected = {"model.py", "spec.json", *MODELS[name].files, *MODELS[name].specs}
        files = {p.name for p in version.iterdir()}
        assert files - {"bounds.json"} == expected, name  # bounds.json: the models with input ranges
        if "bounds.json" in files:
            assert all("tensor" in b for b in json.loads((version / "bounds.json").read_text())), name
        for dest, src in MODELS[name].files.items():
            assert (version / dest).read_bytes() == (tiny_artifacts / src).read_bytes(), f"{name}/1/{dest}"

    # the python backend loads `TritonPythonModel` from each model.py: it must resolve in the wheel
    check = (
        "import importlib.util, sys\n"
        "for path in sys.argv[1:]:\n"
        "    spec = importlib.util.spec_from_file_location('model', path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    cls = module.TritonPythonModel\n"
        "    print(cls.__name__, sys.modules[cls.__module__].__file__)\n"
    )
    shims = sorted(repo.glob("*/1/model.py"))
    loaded = run([python, "-c", check, *shims], cwd=work, env=env).splitlines()
    assert [line.split()[0] for line in loaded] == [MODELS[p.parent.parent.name].adapter for p in shims]
    assert all(Path(line.split()[1]).resolve().is_relative_to(wheel_env.resolve()) for line in loaded), loaded
