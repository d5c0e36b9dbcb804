"""``integrations/`` ships inside the wheel as ``gradwatch.integrations``: checked for the editable
install this suite runs in, and for a wheel built from the tree and installed into a fresh venv."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import sysconfig
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_editable_install_maps_integrations():
    import gradwatch.integrations

    assert pathlib.Path(gradwatch.integrations.__file__).parent == ROOT / "integrations"


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_imports_the_torch_integration(tmp_path):
    pytest.importorskip("build")
    pytest.importorskip("torch")
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    wheels = list(dist.glob("gradwatch-*.whl"))
    assert len(wheels) == 1
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Install the wheel with this interpreter's pip, into the fresh venv's site-packages only.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", site, str(wheels[0])],
        check=True, capture_output=True, text=True,
    )
    # numpy, pluggy and torch come from this environment (appended, so the wheel's gradwatch wins).
    (pathlib.Path(site) / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import gradwatch, gradwatch.integrations.torch as t, gradwatch.cli\n"
        "print(gradwatch.__file__); print(t.__file__); print(callable(gradwatch.watch))\n"
    )
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    core, integration, watch_ok = out.stdout.split()
    assert core.startswith(site) and integration.startswith(site), out.stdout
    assert integration.endswith(os.path.join("gradwatch", "integrations", "torch", "__init__.py"))
    assert watch_ok == "True"
