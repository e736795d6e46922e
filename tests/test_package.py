"""A non-editable install carries everything moeq reads at run time: recipes, registry, claims, devices, tasks."""
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_ships_the_data_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, ROOT],
                   check=True, capture_output=True)
    names = set(zipfile.ZipFile(next(tmp_path.glob("moeq-*.whl"))).namelist())
    recipes = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert recipes and {f"moeq/recipes/{r}" for r in recipes} <= names
    assert {"moeq/models.yaml", "moeq/devices.yaml", "moeq/cli.py", "moeq/evaluate/report/claims.yaml",
            "moeq/evaluate/tasks/moeq_data.py", "moeq/quantize/verbs/quantize.py"} <= names
    assert not any(n.startswith(("evaluate/", "quantize/", "core/")) for n in names), "nothing outside moeq"
