"""A/B of bench.py's graphed training step over several variants in one device call, alternating
rounds (one run's step moves by about a millisecond with the routing it draws, so a change worth
less than that needs its variants side by side). A variant is NAME=MODEL_FILE[;ITEM...]: the
model.py to run (copied over model.py for its runs; the checkout's model.py is restored at the
end), then items that are environment variables for its process (VAR=VALUE, e.g.
TORCHINDUCTOR_ENABLE_PDL=1) or more bench.py arguments (--key=value). Untracked model files go
beside this script, e.g. `git show HEAD:model.py > experiments/model_base_ab.py`.
$ python experiments/ab.py --rounds=2 --args="--batch_size=128" base=experiments/model_base_ab.py \
      new=model.py "combo=model.py;--inductor={'combo_kernels': True}"
Prints each run's step and, last, a table: per variant the step's median over rounds (ms)."""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument('variants', nargs='+')
ap.add_argument('--rounds', type=int, default=2)
ap.add_argument('--config', default='config/tinystories_moe.py')
ap.add_argument('--args', default='', help='more bench.py arguments, e.g. --batch_size=128')
ap.add_argument('--out', default='out/ab')
a = ap.parse_args()

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(root)
variants = []
for v in a.variants:
    name, _, rest = v.partition('=')
    model_file, *items = rest.split(';')
    if not name or not os.path.exists(model_file):
        sys.exit(f"error: variant '{v}': give NAME=MODEL_FILE[;VAR=VALUE or --key=value ...] with an "
                 f"existing MODEL_FILE")
    bad = [i for i in items if i and not i.startswith('--') and '=' not in i]
    if bad:
        sys.exit(f"error: variant '{name}': items {bad} are neither VAR=VALUE nor --key=value")
    env = dict(i.split('=', 1) for i in items if i and not i.startswith('--'))
    variants.append((name, model_file, env, [i for i in items if i.startswith('--')]))
os.makedirs(a.out, exist_ok=True)
saved = tempfile.NamedTemporaryFile(suffix='.py', delete=False).name
shutil.copy('model.py', saved)             # the checkout's model.py: what 'model.py' names, restored at the end
variants = [(name, saved if f == 'model.py' else f, env, args) for name, f, env, args in variants]

steps = {name: [] for name, *_ in variants}
try:
    for r in range(a.rounds):
        for name, model_file, env, args in variants:
            shutil.copy(model_file, 'model.py')
            out_file = f'{a.out}/{name}{r}.json'
            cmd = [sys.executable, 'bench.py', a.config, '--modes=train', '--cuda_graph_train=True',
                   f'--out_file={out_file}', *shlex.split(a.args), *args]
            p = subprocess.run(cmd, env={**os.environ, **env, 'PYTHONUNBUFFERED': '1'},
                               capture_output=True, text=True)
            if p.returncode != 0:
                print(f'{name} round {r}: failed\n' + (p.stdout + p.stderr)[-3000:], flush=True)
                continue
            t = json.load(open(out_file))['train']
            steps[name].append(t['step_ms'])
            print(f"{name} round {r}: {t['step_ms']:.2f} ms, {t['tokens_per_sec']:,.0f} tokens/s", flush=True)
finally:
    shutil.copy(saved, 'model.py')
    os.unlink(saved)

print("\n| variant | step ms, each round | median |\n| --- | --- | --- |")
for name, ms in steps.items():
    med = f'{statistics.median(ms):.2f}' if ms else '-'
    print(f"| {name} | {' / '.join(f'{m:.2f}' for m in ms)} | {med} |")
