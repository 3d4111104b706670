"""The README's quick start runs verbatim from a fresh checkout: its shell block, then its Python block."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def quick_start_blocks() -> tuple[str, str]:
    text = (REPOSITORY / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return shell, python


@pytest.mark.slow
def test_the_readme_quick_start_runs_verbatim(tmp_path):
    shell, python = quick_start_blocks()
    (tmp_path / "tests").symlink_to(REPOSITORY / "tests")  # a checkout's paths, without writing into it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-e", "-c", shell], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "ts-S3A3E8" / "config.json").is_file()
    assert done.stdout.count("perplexity") >= 2 or "perplexity" in done.stderr
    ran = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "Once upon a time" in ran.stdout
