"""The Python API as a notebook sees it: the README's example runs as written, from a folder outside the
checkout, through `import causalmer`; and the installed package holds every package folder of src/."""
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The first python block of the README's "Python API" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Python API\n"):]
    section = section[:section.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs_outside_the_checkout(tmp_path):
    # `causalmer` is this checkout's src/, whatever an installed copy elsewhere points at.
    path = tmp_path / "path"
    path.mkdir()
    (path / "causalmer").symlink_to(REPO / "src", target_is_directory=True)
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    script = readme_example() + (
        "\nimport logging, sys, causalmer\n"
        "logging.getLogger('causalmer').warning('a line logged after the run')\n"
        "print('causalmer at', causalmer.__file__)\n"
        "print('checkout names imported:', sorted(m for m in sys.modules if m == 'src' or m.startswith('src.')))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=notebook, env={**os.environ, "PYTHONPATH": str(path)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"causalmer at {path / 'causalmer' / '__init__.py'}" in done.stdout
    # Inside the package every import is relative: nothing reached for the checkout's `src`.
    assert "checkout names imported: []" in done.stdout
    run = notebook / "checkpoints" / "iemocap" / "notebook" / "seed1"
    for name in ("config.yaml", "train.log", "metrics.json", "best_acc.pt", "robustness_best_acc_test.json"):
        assert (run / name).is_file(), name
    # The run's log holds the run: what a notebook logs afterwards goes to the console only.
    log = (run / "train.log").read_text()
    assert "epoch 2" in log and "a line logged after the run" not in log
    assert "a line logged after the run" in done.stdout
    assert re.search(r"test avg_acc \(tie\): [0-9.]+", done.stdout)
    assert re.search(r"\(\d+, 8\) \(\d+, 4\)", done.stdout)  # per test sample: IEMOCAP's 8 logits, 4 targets
    assert re.search(r"without audio: [0-9.]+", done.stdout)


def test_every_package_folder_of_src_is_installed():
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {".".join(("causalmer", *init.parent.relative_to(REPO / "src").parts))
               for init in (REPO / "src").rglob("__init__.py")}
    assert sorted(listed) == sorted(folders)
