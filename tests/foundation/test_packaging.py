"""One distribution, top-level folders mapped into the jaxlab namespace, for plain and editable installs."""

import json
import os
import pathlib
import site
import subprocess
import sys
import sysconfig
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


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """The wheel that `pip install .` builds, unpacked: (its file names, the folder it was unpacked to)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp.glob("jaxlab-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp / "site")
    return names, tmp / "site"


@pytest.mark.slow
def test_plain_wheel_contains_the_mapped_namespace(wheel_site):
    """`pip install .` builds this wheel: every mapped package must be inside it, importable alone."""
    names, site_dir = wheel_site
    for package in PACKAGES:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert "jaxlab/kernels/hippo.py" in names and "jaxlab/experiments/ssm_hippo.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    # Import from the unpacked wheel only (it shadows the development install on sys.path).
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import jaxlab.kernels.hippo, jaxlab.experiments, "
            "jaxlab.rl, jaxlab.models, jaxlab.parallel, jaxlab.cli; "
            "assert jaxlab.kernels.hippo.__file__.startswith(sys.argv[1]), jaxlab.kernels.hippo.__file__; "
            "print('ok')")
    run = subprocess.run([sys.executable, "-c", code, str(site_dir)], capture_output=True, text=True,
                         cwd=site_dir.parent)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def _plain_install(tmp_path: pathlib.Path, site_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A virtualenv holding jaxlab as `pip install .` leaves it (the unpacked wheel, no editable finder),
    with the dependencies taken from this environment's site-packages; and a stand-in for the `jaxlab`
    console script, whose sys.path[0] is its own folder as with the real one."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Plain path lines: the directories are appended without running their .pth files, so the
    # development install's editable finder (which would hide the bug) is not loaded.
    deps = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (pathlib.Path(purelib) / "jaxlab_test_paths.pth").write_text("\n".join([str(site_dir), *deps]) + "\n")
    script = tmp_path / "bin" / "jaxlab"
    script.parent.mkdir()
    script.write_text("import sys\nfrom jaxlab.cli import main\nsys.exit(main())\n")
    return python, script


@pytest.mark.slow
def test_child_process_experiment_from_plain_install_in_repository_root(wheel_site, tmp_path):
    """`pip install . && jaxlab reproduce` from a clone's root: an experiment's child process must import the
    installed jaxlab, not the source folder `jaxlab/` that `python -m` would put first on sys.path."""
    _, site_dir = wheel_site
    python, script = _plain_install(tmp_path, site_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "PYTHONPATH")}
    out = tmp_path / "results"
    # One device here, so zero-memory measures 2 devices in a child process.
    run = subprocess.run([str(python), str(script), "run", "zero-memory", "--device-counts", "1", "2",
                          "--vocab-size", "64", "--d-model", "32", "--num-layers", "1", "--seq-len", "8",
                          "--no-compile-steps", "--no-progress", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((out / "zero-memory.json").read_text())
    assert record["error"] is None and record["metrics"]["device_counts"] == [1, 2]
    assert record["claims"] and all(c["holds"] for c in record["claims"]), record["claims"]


def test_test_files_have_unique_basenames():
    """pytest imports test modules by basename (no __init__.py in tests/): two files of one name collide."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert not {n for n in names if names.count(n) > 1}, "rename the test files that share a name"
