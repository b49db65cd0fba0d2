"""tlfast/_threads.py: `import tlfast` before torch shortens libgomp's spin-wait, never overrides the
user's own OpenMP settings, and leaves no trace in the environment that child processes inherit.

What libgomp actually read is what it prints at load under OMP_DISPLAY_ENV=VERBOSE (stderr), so
these check the runtime's own view, not only tlfast's bookkeeping.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from tlfast import _threads

KNOBS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_DISPLAY_ENV")


def run(code: str, **env: str) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env}, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def libgomp_read(stderr: str, name: str) -> str:
    found = re.findall(rf"^\s*{name} = '([^']*)'", stderr, re.M)
    assert found, f"libgomp printed no {name} (is torch's OpenMP libgomp?):\n{stderr[-2000:]}"
    return found[0]


REPORT = "import os, tlfast; from tlfast import _threads; print(repr(os.environ.get('GOMP_SPINCOUNT'))); " \
         "print(_threads.STATE)"

pytestmark = pytest.mark.skipif(not _threads._libgomp_loaded(), reason="torch's OpenMP here is not libgomp")


def test_import_before_torch_sets_the_short_wait_and_cleans_up():
    out, err = run(REPORT)
    assert libgomp_read(err, "GOMP_SPINCOUNT") == _threads.SPINCOUNT
    env_after, state = out.splitlines()
    assert env_after == "None", "GOMP_SPINCOUNT must not leak into the environment of child processes"
    assert state.startswith(f"GOMP_SPINCOUNT={_threads.SPINCOUNT} (set by tlfast")


def test_torch_imported_first_is_left_alone_and_said_so():
    out, err = run("import torch\n" + REPORT.replace("; ", "\n"))
    assert libgomp_read(err, "GOMP_SPINCOUNT") == "300000"  # libgomp's own default
    env_after, state = out.splitlines()
    assert env_after == "None"
    assert "torch was imported before tlfast" in state


@pytest.mark.parametrize("name,value", [("GOMP_SPINCOUNT", "1234"), ("OMP_WAIT_POLICY", "ACTIVE")])
def test_the_users_own_setting_wins(name, value):
    out, err = run(REPORT, **{name: value})
    assert libgomp_read(err, name) == value
    if name == "OMP_WAIT_POLICY":  # ACTIVE's spin count, not tlfast's
        assert libgomp_read(err, "GOMP_SPINCOUNT") != _threads.SPINCOUNT
    env_after, state = out.splitlines()
    assert env_after == (repr(value) if name == "GOMP_SPINCOUNT" else "None")
    assert state == f"as the environment sets it: {name}={value}"


def test_info_reports_the_wait():
    out, _ = run("import sys; from tlfast.cli import main; sys.exit(main(['info', '--json']))")
    report = json.loads(out)
    assert report["threads"]["openmp_wait"].startswith(f"GOMP_SPINCOUNT={_threads.SPINCOUNT}")
    assert report["threads"]["torch"] >= 1
