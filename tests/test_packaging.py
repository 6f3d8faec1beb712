"""kernels/ and cli/ install under trimix_probe, never as top-level `kernels` / `cli`."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_subpackages():
    import trimix_probe.cli.app
    import trimix_probe.kernels

    assert Path(trimix_probe.kernels.__file__).parent == ROOT / "kernels"
    assert Path(trimix_probe.cli.app.__file__).parent == ROOT / "cli"
    assert importlib.util.find_spec("cli") is None or "trimix" not in str(importlib.util.find_spec("cli").origin)


def test_regular_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("trimix_probe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "trimix_probe/kernels/__init__.py" in names
    assert "trimix_probe/cli/app.py" in names
    assert not any(n.startswith(("kernels/", "cli/")) for n in names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "trimix-probe = trimix_probe.cli.app:main" in entry


def test_regular_install_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(tmp_path / "site"), str(ROOT)], check=True)
    code = ("import trimix_probe.kernels, trimix_probe.cli.app, trimix_probe;"
            "print(trimix_probe.kernels.__file__); print(trimix_probe.cli.app.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(tmp_path / "site" / "trimix_probe" / "kernels"))
    assert out[1].startswith(str(tmp_path / "site" / "trimix_probe" / "cli"))
