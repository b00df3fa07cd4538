"""`pip install .` gets the same package as the editable install: every module, py.typed included."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_every_module(tmp_path: Path) -> None:
    # Build from a clean copy: the working tree's build/ and *.egg-info could hide a missing file.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, source, ignore=ignore)
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--wheel-dir",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("meshkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # Configs are built in code (meshkit.render): the package is its modules, py.typed and the cache VCL.
    assert "meshkit/render/__init__.py" in names
    modules = {f"meshkit/{p.relative_to(ROOT / 'mesh')}" for p in (ROOT / "mesh").rglob("*.py")}
    modules |= {
        f"meshkit/extproc/{p.relative_to(ROOT / 'extproc')}" for p in (ROOT / "extproc").rglob("*.py")
    }
    assert modules <= names, sorted(modules - names)
    assert "meshkit/py.typed" in names
    assert "meshkit/varnish/meshkit.vcl" in names  # the cache VCL ships as package data
    assert {"meshkit/nats/origin.conf", "meshkit/nats/leaf.conf", "meshkit/nats/leaf-mirror.conf"} <= set(
        names
    )  # the NATS topology
