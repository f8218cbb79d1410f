"""Runs repository scripts for the tests, each in a forked child of this one Python.

Most of a tiny `python train.py ...` run on a 2-core machine is Python importing torch (3-5 s);
the suite runs scripts a few hundred times. This server imports torch and the other heavy
third-party modules once, then for each request forks a child that runs the script as
`python SCRIPT ARGS` would: __main__, sys.argv, sys.path[0] = the script's folder, the request's
working folder and environment, stdin from /dev/null, stdout and stderr to files, and the exit
status Python gives (sys.exit('message') prints it and gives 1; an uncaught exception prints
its traceback). The repository's own modules are never imported here, so each run imports them
fresh, from its own sys.path, as a user's run would.

Protocol (tests/conftest.py: run_script): one JSON request per line on stdin,
{"script", "args", "cwd", "env", "timeout"}; one JSON reply per line on stdout,
{"returncode", "stdout", "stderr", "timed_out"}. A run past its timeout is killed with its
process group."""

import json
import os
import runpy
import shutil
import signal
import sys
import tempfile
import time

import numpy  # noqa: F401  (the shared imports: what every run would otherwise pay for)
import regex  # noqa: F401
import torch  # noqa: F401
import torch._dynamo  # noqa: F401
import tqdm  # noqa: F401
try:
    import tiktoken  # noqa: F401
except ImportError:
    pass
try:                 # the plots every training run draws (runlog.pyplot selects the same backend)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot  # noqa: F401
except ImportError:
    pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE_PATH = sys.path[1:]                  # a fresh `python SCRIPT` has these after its own folder


def run_child(request, out, err):
    """In the forked child: become `python SCRIPT ARGS` and run; never returns."""
    os.setpgid(0, 0)                                       # a timeout kills the run and its children
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    script = os.path.join(REPO, request['script'])
    sys.argv = [script, *request['args']]
    sys.path[:] = [os.path.dirname(script), *SITE_PATH]
    runpy.run_path(script, run_name='__main__')           # exceptions and sys.exit end the child as
    sys.exit(0)                                            # they end a Python process


def serve():
    for line in sys.stdin:
        request = json.loads(line)
        tmp = tempfile.mkdtemp(prefix='script_server_')
        out, err = os.path.join(tmp, 'stdout'), os.path.join(tmp, 'stderr')
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request, out, err)
        deadline, timed_out = time.monotonic() + request['timeout'], False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.01)
        reply = {'returncode': os.waitstatus_to_exitcode(status), 'timed_out': timed_out}
        for name, path in (('stdout', out), ('stderr', err)):
            with open(path, encoding='utf-8', errors='replace') as f:
                reply[name] = f.read()
        shutil.rmtree(tmp, ignore_errors=True)
        sys.stdout.write(json.dumps(reply) + '\n')
        sys.stdout.flush()


if __name__ == '__main__':
    serve()
