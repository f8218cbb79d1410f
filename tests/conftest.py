"""Shared test helpers: the repository on sys.path, the shared real data, running a script."""

import atexit
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Real data for tests lives beside the checkout (never committed); tests that need it skip.
SHARED_DATA = os.environ.get('SHARED_DATA') or os.path.join(REPO, '..', 'shared', 'data')   # unset or empty: beside the checkout


def shared_file(*parts):
    """Path of a file under ../shared/data, or skip the test saying what is missing."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f'needs {os.path.join(*parts)} from the shared data folder ({SHARED_DATA}); '
                    f'set SHARED_DATA to its location')
    return path


# Variables a Python reads when it imports torch: a run that sets them differently from the script
# server's start gets a fresh Python.
_IMPORT_TIME_ENV = ('OMP_', 'MKL_', 'TORCH', 'PYTORCH', 'CUDA', 'PYTHON')
_server = None


def _import_time_env(env):
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_TIME_ENV)}


def _script_server(env):
    """tests/script_server.py, started on first use: it runs each script in a forked child of one
    Python that imported torch once (a few seconds saved per run, a few hundred runs a suite)."""
    global _server
    if _server is not None and _server.poll() is None and _server.env == _import_time_env(env):
        return _server
    if _server is not None:
        _server.kill()
    _server = subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'script_server.py')], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding='utf-8')
    _server.env = _import_time_env(env)
    return _server


@atexit.register
def _stop_script_server():
    if _server is not None:
        _server.kill()


def run_script(script, *args, cwd, check=True, timeout=600):
    """Run a repository script with --key=value args in `cwd`, as `python SCRIPT ARGS` does; return
    the CompletedProcess. Through the script server unless FRESH_PYTHON=1 (then one new Python a run)."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    command = [sys.executable, os.path.join(REPO, script), *args]
    if os.environ.get('FRESH_PYTHON') == '1' or sys.platform == 'win32':
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        server = _script_server(env)
        server.stdin.write(json.dumps({'script': script, 'args': list(args), 'cwd': str(cwd), 'env': env,
                                       'timeout': timeout}) + '\n')
        server.stdin.flush()
        line = server.stdout.readline()
        if not line:
            raise AssertionError(f'tests/script_server.py ended (exit {server.wait()}) while running {script}')
        reply = json.loads(line)
        if reply['timed_out']:
            raise subprocess.TimeoutExpired(command, timeout, reply['stdout'], reply['stderr'])
        proc = subprocess.CompletedProcess(command, reply['returncode'], reply['stdout'], reply['stderr'])
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} {" ".join(args)} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def run_scripts(jobs, *, cwd, timeout=600):
    """[(script, args), ...] -> their CompletedProcesses, each run as run_script(..., check=False)."""
    return [run_script(script, *args, cwd=cwd, check=False, timeout=timeout) for script, args in jobs]


def run_script_many(script, arg_lists, *, cwd, timeout=600):
    """run_scripts for one script: once per list of args."""
    return run_scripts([(script, args) for args in arg_lists], cwd=cwd, timeout=timeout)


TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. "
        "Once upon a time, there was a little girl named Lily. She liked to play in the park "
        "with her dog Max. One day, Max found a big red ball. \"Look!\" said Lily. ") * 40


@pytest.fixture
def byte_data(tmp_path):
    """A small byte-level dataset written by the real writer, in tmp_path/data."""
    from data import write_token_dataset
    from tokenizer import ByteTokenizer
    docs = [TEXT[i:i + 300] for i in range(0, len(TEXT), 300)]
    out = tmp_path / 'data'
    write_token_dataset(str(out), {'train': docs[:-4], 'val': docs[-4:]}, ByteTokenizer(),
                        source='test', num_proc=1)
    return str(out)


TINY_MODEL = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
              '--eval_iters=2', '--log_interval=1', '--peak_flops=1e12', '--compile=False',
              '--device=cpu']


STORIES = [
    'Once upon a time, a little fox found a shiny key. "Look!" said the fox. She opened a small door.',
    'Tom had a red ball. He kicked the ball over the fence. His dog ran to get it. Tom was happy.',
    'The sun was warm. A tiny bird sang a song. The flowers danced in the wind. Everyone smiled.',
    'Mia baked a cake for her mom. She added sugar and eggs. The cake was sweet. Mom hugged Mia.',
    'A big bear lived in the forest. He liked honey. One day he found a hive. The bees buzzed.',
    'Lily wanted to fly a kite. The wind was strong. The kite flew high in the sky. Lily laughed.',
] * 4


@pytest.fixture(scope='session')
def pipeline(tmp_path_factory):
    """A tiny byte-level model pretrained on the stories ('base') and an instruct set from them
    ('inst'), in one folder shared by the post-training tests."""
    import json
    from data import write_token_dataset
    from tokenizer import ByteTokenizer
    root = tmp_path_factory.mktemp('pipeline')
    write_token_dataset(str(root / 'data'), {'train': STORIES[4:] * 3, 'val': STORIES[:4]}, ByteTokenizer(),
                        'test', num_proc=1)
    run_script('train.py', '--data_dir=data', '--out_dir=base', *TINY_MODEL, '--block_size=256',
               '--max_iters=60', '--eval_interval=30', '--learning_rate=3e-3', '--pos_emb=rope', cwd=root)
    src = root / 'stories.jsonl'
    src.write_text(''.join(json.dumps({'text': s}) + '\n' for s in STORIES))
    run_script('prepare/tinystories_instruct.py', f'--source={src}', '--out_dir=inst', '--n_prompts_val=3',
               '--n_prompts_train=3', '--val_fraction=0.3', cwd=root)
    return root
