"""The README's commands run as written: the Python API snippet (a fresh interpreter, CPU) against the demo checkpoint,
and the CPU training quickstart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = Path("demo/pretrained/hdm-demo.safetensors")  # the path the snippet names, from the repository root


def readme_python_block(section: str) -> str:
    """The first ```python block under the README heading `section`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", body, re.S)
    assert match, f"README section {section!r} has no ```python block"
    return match.group(1)


def test_python_api_snippet_runs(tmp_path):
    code = readme_python_block("## Python API")
    assert str(DEMO_CHECKPOINT) in code
    if not (REPO / DEMO_CHECKPOINT).is_file():
        pytest.skip(f"{DEMO_CHECKPOINT} is absent (it ships with the repository; `python -m demo.run --out DIR` "
                    f"trains and exports one as DIR/hdm-demo.safetensors)")
    # Run it where a newcomer would (the checkpoint at the same relative path) without writing into the checkout.
    (tmp_path / DEMO_CHECKPOINT.parent).mkdir(parents=True)
    (tmp_path / DEMO_CHECKPOINT).symlink_to(REPO / DEMO_CHECKPOINT)
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")  # the CPU path, as documented
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([1, 3, 32, 32])" in proc.stdout
    with Image.open(tmp_path / "red_circle.png") as image:
        assert image.size == (32, 32)


def test_training_quickstart_commands_run(tmp_path):
    """The README's CPU training quickstart, command for command, with /tmp/ replaced by a test folder."""
    text = (REPO / "README.md").read_text(encoding="utf-8").split("\n## Training\n", 1)[1]
    script = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert "training/recipes/tiny_cpu.toml" in script and "hdm_core.generate" in script
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace("/tmp/", f"{tmp_path}/")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(next((tmp_path / "hdm_out").glob("*.png"))) as image:
        assert image.size == (32, 32) and "Zoom: 1.0" in image.text["parameters"]
