"""A non-editable install has the package data: built as a wheel and installed into a fresh folder, the package
finds its head set presets and shipped world models (nothing is read from the source tree)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_attn_ext.headset import preset_names

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import json, sys
from importlib.resources import files
import diffusers_attn_ext
from diffusers_attn_ext.headset import HeadSet, preset_names
package = files("diffusers_attn_ext")
print(json.dumps({
    "file": diffusers_attn_ext.__file__,
    "presets": preset_names(),
    "preset_heads": {name: len(HeadSet.preset(name)) for name in preset_names()},
    "shipped": sorted(item.name for item in (package / "shipped").iterdir() if item.is_dir()),
    "weights": sorted(str(path.relative_to(path.parents[2])) for path in
                      __import__("pathlib").Path(str(package / "shipped")).rglob("*.safetensors")),
}))
"""


def test_presets_are_package_data():
    assert preset_names(), "no head set preset found in the package"


def test_a_wheel_install_finds_presets_and_shipped_models(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "diffusers_attn_ext", source / "diffusers_attn_ext",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path),
                            str(source)], capture_output=True, text=True)
    if build.returncode and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("*.whl"))
    site = tmp_path / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    shutil.rmtree(source)  # nothing left to read but the installed copy
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["file"].startswith(str(site))
    assert found["presets"] == preset_names()
    assert all(found["preset_heads"].values())
    shipped = sorted(p.name for p in (ROOT / "diffusers_attn_ext" / "shipped").iterdir() if p.is_dir())
    assert found["shipped"] == shipped
    shipped_root = ROOT / "diffusers_attn_ext" / "shipped"
    weights = sorted(str(p.relative_to(p.parents[2])) for p in shipped_root.rglob("*.safetensors"))
    assert weights, "no shipped weights found in the source tree"
    assert found["weights"] == weights  # every weight file of every shipped model, at any depth
