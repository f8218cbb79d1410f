"""The tests' script runner (conftest.run_script through tests/script_server.py) behaves as a
fresh `python SCRIPT ARGS`: the same output and exit status, and no module of the repository
already imported, so a script that cannot import one on its own fails here as it would for a user."""

import os
import subprocess
import sys

import pytest

from conftest import run_script


def fresh(script, *args, cwd):
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'))


def test_the_server_runs_a_script_as_a_fresh_python_does(tmp_path):
    (tmp_path / 'script.py').write_text(
        'import sys\n'
        'print("argv", sys.argv[1:], "cwd", __import__("os").getcwd() == sys.argv[1])\n'
        'print("path0", sys.path[0] == __import__("os").path.dirname(__file__))\n'
        'print("main", __name__, "stdin", sys.stdin.read() == "")\n'
        'print("to stderr", file=sys.stderr)\n'
        'if sys.argv[2] == "exit": sys.exit("error: a clear message")\n'
        'if sys.argv[2] == "raise": raise ValueError("boom")\n'
        'if sys.argv[2] == "import": import model\n')
    for how, code in (('ok', 0), ('exit', 1), ('raise', 1), ('import', 1)):
        ours = run_script(str(tmp_path / 'script.py'), str(tmp_path), how, cwd=tmp_path, check=False)
        theirs = fresh(str(tmp_path / 'script.py'), str(tmp_path), how, cwd=tmp_path)
        assert ours.returncode == theirs.returncode == code, (how, ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout
        assert "argv" in ours.stdout and 'False' not in ours.stdout
        assert ours.stderr.startswith('to stderr\n')
        last = ours.stderr.strip().splitlines()[-1]
        assert last == theirs.stderr.strip().splitlines()[-1], (ours.stderr, theirs.stderr)
    assert last == "ModuleNotFoundError: No module named 'model'"     # nothing of the repository preloaded


def test_a_run_past_its_timeout_is_killed(tmp_path):
    (tmp_path / 'slow.py').write_text('import time\ntime.sleep(60)\n')
    with pytest.raises(subprocess.TimeoutExpired):
        run_script(str(tmp_path / 'slow.py'), cwd=tmp_path, timeout=2)
    (tmp_path / 'quick.py').write_text('print("still serving")\n')
    assert run_script(str(tmp_path / 'quick.py'), cwd=tmp_path).stdout == 'still serving\n'


def test_no_module_of_the_repository_shadows_an_installed_package():
    """Scripts run from the repository root, so its modules come first on sys.path: one named like
    an installed package replaces it for everything that imports that package. (transformers
    imports Hugging Face's `kernels`; a kernels.py here broke its model loading.)"""
    import importlib.metadata
    import pathlib
    installed = set(importlib.metadata.packages_distributions())    # top-level import names
    ours = {p.stem for p in pathlib.Path(__file__).resolve().parent.parent.glob('*.py')}
    assert ours and not ours & installed, sorted(ours & installed)
