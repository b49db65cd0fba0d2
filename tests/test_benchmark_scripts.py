"""Every script in benchmarks/ starts: its imports resolve and its command line parses (--help).

The scripts are run by hand, not by the suite, so an import that a refactor broke (a helper moved
out of bench_knn.py) would otherwise only show when someone tries to measure.
"""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))

# One interpreter for all of them (torch imports once): each script runs as __main__ with --help,
# which argparse answers with SystemExit(0) before any measuring starts.
RUNNER = r"""
import contextlib, io, json, runpy, sys, traceback
bench, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, bench)
failed = {}
for name in names:
    sys.argv = [name, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(f"{bench}/{name}", run_name="__main__")
        failed[name] = "no --help: the script ran instead of parsing its arguments"
    except SystemExit as e:
        if e.code not in (0, None):
            failed[name] = f"exit {e.code}"
        elif "usage" not in out.getvalue().lower():
            failed[name] = "no usage text"
    except BaseException:
        failed[name] = traceback.format_exc()[-3000:]
print(json.dumps(failed))
"""


def test_every_script_parses_help():
    assert "bench_knn.py" in SCRIPTS and "bench_ot.py" in SCRIPTS
    out = subprocess.run([sys.executable, "-c", RUNNER, str(BENCH), *SCRIPTS], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"benchmarks/{k}:\n{v}" for k, v in failed.items())
