"""Run one repository script many times, each in a forked child of this one Python process.

    python tests/run_many.py RESULTS.json '[["train.py", ["--a=1"]], ["sample.py", ["--b=2"]]]'

torch and the repository's modules are imported once, here; each run is a fork that executes the
script as __main__ with its own sys.argv, its stdout and stderr in files, and its exit status as a
command line would give it. Refusal tests run a script a dozen times with bad settings, and most
of each run would otherwise be Python importing torch again (tests/conftest.py: run_scripts)."""

import json
import os
import runpy
import sys
import tempfile
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import torch  # noqa: E402,F401  (the shared imports: what every run would pay for)
import config, data, model, tokenizer, training  # noqa: E402,F401,E401

results_path, jobs = sys.argv[1], json.loads(sys.argv[2])
results = []
with tempfile.TemporaryDirectory() as tmp:
    for i, (script, args) in enumerate(jobs):
        script = os.path.join(REPO, script)
        out, err = os.path.join(tmp, f'{i}.out'), os.path.join(tmp, f'{i}.err')
        pid = os.fork()
        if pid == 0:                                        # the child: the script, as `python script args`
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv, sys.path[0] = [script, *args], os.path.dirname(script)
            code = 0
            try:
                runpy.run_path(script, run_name='__main__')
            except SystemExit as e:                         # sys.exit('message') prints it, status 1
                if isinstance(e.code, int) or e.code is None:
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        with open(out) as f_out, open(err) as f_err:
            results.append({'script': os.path.relpath(script, REPO), 'args': args, 'returncode': os.waitstatus_to_exitcode(status),
                            'stdout': f_out.read(), 'stderr': f_err.read()})
with open(results_path, 'w') as f:
    json.dump(results, f)
