"""The command line run in the test's own process: ``cli.main``, which ``python -m fantasytalking_core`` calls,
with what it prints captured. No new interpreter imports torch, diffusers and transformers again (seconds per run);
what only a process adds (warnings and log lines on stderr, the exit status) is checked by the tests that run the
program itself (test_generate.py's ``generate``, test_bad_inputs.py's program-level tests)."""

import subprocess
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

from fantasytalking_core.cli import main


def run_here(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m fantasytalking_core ARGV`` in this process: exit code (argparse's usage errors exit through
    SystemExit), stdout and stderr, as ``subprocess.run`` would give them."""
    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
