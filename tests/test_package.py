"""A non-editable install carries everything moeq reads at run time: recipes, registry, claims, devices, tasks."""
import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_ships_the_data_files(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools builds in the source folder (build/), which stays untouched
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "core", "quantize", "evaluate", "recipes"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        copy(ROOT / item, src / item, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, src],
                   check=True, capture_output=True)
    names = set(zipfile.ZipFile(next(tmp_path.glob("moeq-*.whl"))).namelist())
    recipes = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert recipes and {f"moeq/recipes/{r}" for r in recipes} <= names
    assert {"moeq/models.yaml", "moeq/devices.yaml", "moeq/cli.py", "moeq/evaluate/report/claims.yaml",
            "moeq/evaluate/tasks/moeq_data.py", "moeq/quantize/verbs/quantize.py"} <= names
    assert not any(n.startswith(("evaluate/", "quantize/", "core/")) for n in names), "nothing outside moeq"
