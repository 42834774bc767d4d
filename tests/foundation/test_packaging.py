"""One distribution, top-level folders mapped into the jaxlab namespace, for plain and editable installs."""

import pathlib
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR = PYPROJECT["tool"]["setuptools"]["package-dir"]
PACKAGES = PYPROJECT["tool"]["setuptools"]["packages"]


def _packages_on_disk():
    found = set()
    for name, folder in PACKAGE_DIR.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_package_folder_is_listed_in_pyproject():
    missing = _packages_on_disk() - set(PACKAGES)
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    assert {"jaxlab.kernels", "jaxlab.models", "jaxlab.rl", "jaxlab.parallel", "jaxlab.experiments"} <= set(PACKAGES)


def test_installed_modules_are_the_repository_files():
    import jaxlab.experiments.ssm_hippo
    import jaxlab.kernels.hippo

    for module, rel in [(jaxlab.kernels.hippo, "kernels/hippo.py"),
                        (jaxlab.experiments.ssm_hippo, "experiments/ssm_hippo.py")]:
        assert pathlib.Path(module.__file__).read_bytes() == (ROOT / rel).read_bytes()


@pytest.mark.slow
def test_plain_wheel_contains_the_mapped_namespace(tmp_path):
    """`pip install .` builds this wheel: every mapped package must be inside it, importable alone."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("jaxlab-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    for package in PACKAGES:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert "jaxlab/kernels/hippo.py" in names and "jaxlab/experiments/ssm_hippo.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    # Import from the unpacked wheel only (it shadows the development install on sys.path).
    site = tmp_path / "site"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import jaxlab.kernels.hippo, jaxlab.experiments, "
            "jaxlab.rl, jaxlab.models, jaxlab.parallel, jaxlab.cli; "
            "assert jaxlab.kernels.hippo.__file__.startswith(sys.argv[1]), jaxlab.kernels.hippo.__file__; "
            "print('ok')")
    run = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_test_files_have_unique_basenames():
    """pytest imports test modules by basename (no __init__.py in tests/): two files of one name collide."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert not {n for n in names if names.count(n) > 1}, "rename the test files that share a name"
