"""kernels/ and cli/ install under trimix_probe, never as top-level `kernels` / `cli`, and a checkout on
``sys.path`` never hides an installed package of those names (Hugging Face's ``kernels``, which
transformers imports)."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_subpackages():
    import trimix_probe.cli.app
    import trimix_probe.kernels

    assert [Path(p) for p in trimix_probe.kernels.__path__] == [ROOT / "kernels"]
    assert Path(trimix_probe.cli.app.__file__).parent == ROOT / "cli"
    assert importlib.util.find_spec("cli") is None or "trimix" not in str(importlib.util.find_spec("cli").origin)


def test_regular_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("trimix_probe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "trimix_probe/kernels/triangle.py" in names
    assert "trimix_probe/cli/app.py" in names
    assert not any(n.startswith(("kernels/", "cli/")) for n in names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "trimix-probe = trimix_probe.cli.app:main" in entry


def test_regular_install_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(tmp_path / "site"), str(ROOT)], check=True)
    code = ("import trimix_probe.kernels.triangle, trimix_probe.cli.app, trimix_probe;"
            "print(trimix_probe.kernels.triangle.__file__); print(trimix_probe.cli.app.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(tmp_path / "site" / "trimix_probe" / "kernels"))
    assert out[1].startswith(str(tmp_path / "site" / "trimix_probe" / "cli"))


def _spec_from_checkout(name: str) -> dict:
    """How ``import name`` resolves with the checkout first on sys.path, as under ``python -m pytest``,
    ``python -c`` or a notebook started in the repository root."""
    code = ("import importlib.util, json, sys; s = importlib.util.find_spec(sys.argv[1]);"
            "print(json.dumps(None if s is None else {'origin': s.origin,"
            " 'paths': list(s.submodule_search_locations or [])}))")
    out = subprocess.run([sys.executable, "-c", code, name], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("name", ["kernels", "cli"])
def test_checkout_never_shadows_an_installed_package(name):
    spec = _spec_from_checkout(name)
    if spec is None:
        return
    origin = spec["origin"]
    # a regular package (an __init__.py) found in the checkout would win over any installed one
    assert origin is None or not Path(origin).resolve().is_relative_to(ROOT / name), (
        f"`import {name}` resolves to {origin}: the checkout's {name}/ hides an installed {name!r}")
    if name == "kernels" and _installed("kernels"):
        assert origin is not None and "site-packages" in origin, f"Hugging Face's kernels lost to {spec}"


def test_import_from_the_repository_root():
    # what the issue saw fail: the package and transformers' hub-kernels integration, from the checkout
    code = ("from trimix_probe import patch_model; import trimix_probe.kernels.triangle, trimix_probe.cli.app;"
            "import transformers.integrations.hub_kernels")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
