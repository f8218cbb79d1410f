"""
Ablations: train.py over a set of variants x seeds, every run its own train.py process in its own
folder, then one table of what each variant did.

$ python ablate.py config/ablations/attention.py                      # MHA vs GQA vs MLA (GPU)
$ python ablate.py config/ablations/attention.py --seeds=[1,2,3] --parallel=3   # three runs at once
$ python ablate.py config/ablations/attention.py --dry_run=True       # the runs and their commands
$ python ablate.py config/ablations/attention.py --report_only=True   # tables and plots, no training
$ python ablate.py config/ablations/attention.py --only="['mla']"     # train only these variants now
$ python ablate.py --base="['config/tinystories_cpu.py']" --grid="{'n_layer': [2, 4]}" \
      --max_tokens=2e6 --out_dir=out/ablations/depth                  # a study without a file

A study (a config file, config/ablations/*.py) sets the values below: `base`, train.py's
arguments shared by every run; either `variants` (name -> overrides) or `grid` (key -> values,
every combination a variant named 'key=value,key=value'); `seeds`; a budget per run (`max_tokens`,
`max_flops`, or the max_iters that base gives); `out_dir`; `parallel`. Each variant x seed is

    python train.py BASE... --key=value... --seed=S --out_dir=OUT_DIR/<variant>_s<S> --max_iters=N

(train.py's own code path; never a second training loop). Stopping and starting again is safe: a
run that finished is skipped, one that was killed or failed continues from its checkpoint
(init_from='resume'), one never started starts. A run whose loss became NaN/inf is recorded as
diverged (at its step) and not run again: in a learning-rate sweep that is a result. A run trained
toward another budget, with other settings or on other data (the prepared splits' sizes differ)
than the study now gives is moved aside (OUT_DIR/<run>.stale) and starts over, with the keys that
differ named (a setting added to train.py or ModelConfig since, at its default, is no difference:
each run's ablate.json keeps the settings it trained with). A failed run's
output tail is printed and the others go on. Then OUT_DIR gets
  results.csv              one row per run: variant, seed, status, every override, the budget, and
                           what the run logged (final val loss and bits per byte, tokens/s, MFU, peak
                           memory, expert-load CV and busiest expert over the run and at its end,
                           max attention logit; log_keys: more, at the end) or its config gives
                           (parameters, KV-cache bytes per token); a cell is empty where it has none
  results.md               per variant mean +- std over seeds, sorted by val loss, and whether the
                           best two differ by more than noise: paired by seed where both finished
                           the same seeds (a seed fixes the batches), by a two-sided 95% t-test
  val_loss_vs_tokens.png   val loss against training tokens, one curve per variant (mean over seeds;
                           in the zoomed half a band from the lowest to the highest seed)
  val_loss_vs_time.png     ... against training time (without matplotlib: one note, no plots)
  expert_load_cv_vs_tokens.png, max_logit_vs_tokens.png   the expert-load CV and the max attention
                           logit of the training log against tokens, where the runs log them
Each run folder holds train.py's own files (ckpt.pt, log.jsonl, loss.png) plus train_output.txt
(its stdout and stderr) and ablate.json (its command and status).
"""

import ast
import contextlib
import csv
import difflib
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

from config import configure, model_config_from
from data import EVAL_SEED, prepare_command

# -----------------------------------------------------------------------------
base = None              # train.py arguments every run shares: a list ('config/X.py', '--key=value', ...)
                         # or one config file's path
variants = {}            # name -> overrides: {'key': value, ...} or ['--key=value', ...]
grid = {}                # key -> [values]: every combination is a variant (set variants or grid)
seeds = [1337]           # each variant runs once per seed (--seed=S)
max_tokens = 0.0         # budget per run in training tokens: max_iters = max_tokens / tokens per step; 0: off
max_flops = 0.0          # budget per run in training FLOPs: max_iters = max_flops / (FLOPs per token x
                         # tokens per step), FLOPs per token from the model (model.flops_per_token); 0: off
out_dir = 'out/ablations/study'
parallel = 1             # runs at once (several small runs can share one GPU)
devices = ''             # e.g. '0,1': the k-th concurrent run slot uses CUDA_VISIBLE_DEVICES=devices[k % n]
nproc_per_node = 1       # > 1: every run under torchrun --standalone --nproc_per_node=N (DDP)
dry_run = False          # print the runs and their commands, run nothing
report_only = False      # write the tables and plots from the run folders as they are, train nothing
only = []                # names of the variants to train in this call (empty: all); the others are
                         # neither trained nor touched, and the tables still show every variant
log_tail = 25            # lines of a failed run's output to print
log_keys = []            # more columns: keys of train.py's log lines (a metric of your own, logged as
                         # train/<name>), each as its mean over the last tenth of the run's log lines
# -----------------------------------------------------------------------------
configure(globals())
# -----------------------------------------------------------------------------

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(REPO, 'train.py')
RESERVED = ('seed', 'out_dir', 'init_from')     # the runner sets these for each run
# Student's t, two-sided 95%: the critical value for 1, 2, ..., 30 degrees of freedom
T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_95(dof):
    """The two-sided 95% critical value of Student's t with `dof` degrees of freedom (1.96 past 30)."""
    return T_95[dof - 1] if dof <= len(T_95) else 1.96


t_start = time.time()


def fail(message):
    sys.exit(f'error: {message}')


def hms(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# --- the study: checked before anything is imported or run --------------------------------------
if base is None:
    fail('set base: train.py arguments every run shares, e.g. '
         "base = ['config/tinystories_moe.py', '--max_iters=500'] (or one config file's path)")
base_args = [base] if isinstance(base, str) else list(base)
if not all(isinstance(a, str) for a in base_args):
    fail(f'base must be a list of strings (train.py arguments), got {base!r}')
if variants and grid:
    fail('set either variants (name -> overrides) or grid (key -> values), not both')
if not variants and not grid:
    fail("set variants, e.g. {'mha': {'attention': 'mha'}, 'mla': {'attention': 'mla'}}, "
         "or grid, e.g. {'n_layer': [4, 8]}")
if grid:
    if not isinstance(grid, dict) or not all(isinstance(v, (list, tuple)) for v in grid.values()):
        fail(f"grid maps each key to a list of values, e.g. {{'n_layer': [4, 8]}}; got {grid!r}")
    empty = [k for k, v in grid.items() if not v]
    if empty:
        fail(f"grid key{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
             f"{'have' if len(empty) > 1 else 'has'} no values: give each key at least one")
    # the cartesian product, in the grid's order: {'a': [1, 2], 'b': ['x']} -> 'a=1,b=x', 'a=2,b=x'
    variants = {','.join(f'{k}={v}' for k, v in zip(grid, combo)): dict(zip(grid, combo))
                for combo in itertools.product(*grid.values())}
if not isinstance(seeds, (list, tuple)) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                for s in seeds):
    fail(f'seeds must be a non-empty list of ints, e.g. [1, 2, 3]; got {seeds!r}')
if len(set(seeds)) != len(seeds):
    fail(f'seeds {list(seeds)} repeat a seed')
if not isinstance(log_keys, (list, tuple)) or not all(isinstance(k, str) for k in log_keys):
    fail(f"log_keys must be a list of log.jsonl keys, e.g. ['train/router_entropy']; got {log_keys!r}")
unknown = [v for v in only if v not in variants]
if unknown:
    fail(f"only names {', '.join(map(repr, unknown))}, not a variant of this study; its variants: "
         f"{', '.join(variants)}")
if max_tokens < 0 or max_flops < 0:
    fail('max_tokens and max_flops are budgets: positive, or 0 for off')
if max_tokens and max_flops:
    fail('set one budget per run: max_tokens or max_flops, not both')
if parallel < 1 or nproc_per_node < 1:
    fail(f'parallel={parallel} and nproc_per_node={nproc_per_node} must be at least 1')


def parse_args(items, where):
    """['--key=value' | 'config/X.py', ...] -> [(key or None, value text)]: what each item sets."""
    out = []
    for item in items:
        if not isinstance(item, str):
            fail(f'{where}: {item!r} is not a train.py argument (a string --key=value or a config file)')
        if item.startswith('--'):
            key, eq, value = item[2:].partition('=')
            if not eq:
                fail(f"{where}: '{item}' has no value; write --key=value")
            out.append((key, value))
        else:
            out.append((None, item))           # a config file: train.py's configure reads it
    return out


# train.py's settings: the plain `name = value` assignments of its settings block, read from the
# source (running train.py would train), plus every ModelConfig field, as train.py's configure has
import torch  # noqa: E402  (after the cheap checks above, which need no torch)

from engine import cache_numbers_per_token  # noqa: E402
from model import GPT, ModelConfig, padded_vocab_size  # noqa: E402
from optim import LR_SCHEDULES, OPTIMIZERS  # noqa: E402
from runlog import pyplot  # noqa: E402

train_defaults = {}
for node in ast.parse(open(TRAIN).read()).body:
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
            getattr(node.value.func, 'id', '') == 'configure':
        break                                   # the end of the settings block
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        with contextlib.suppress(ValueError, SyntaxError):
            train_defaults[node.targets[0].id] = ast.literal_eval(node.value)
TRAIN_KEYS = set(train_defaults) | {f.name for f in ModelConfig.__dataclass_fields__.values()}


def check_keys(keys, where):
    for key in keys:
        if key in RESERVED:
            fail(f"{where} sets '{key}', which the runner sets for each run (seeds, out_dir, resuming)")
        if key not in TRAIN_KEYS:
            close = difflib.get_close_matches(key, TRAIN_KEYS, n=3)
            fail(f"{where} sets '{key}', which is not a train.py setting"
                 + (f" (did you mean {', '.join(close)}?)" if close else '')
                 + '; see python train.py --help')


def resolve(args, where):
    """train.py's resolved config for these arguments (its configure, run here), or exit naming
    `where` with configure's complaint (a wrong type, a missing config file)."""
    namespace = dict(train_defaults)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cfg = configure(namespace, argv=args, model_config=ModelConfig, verbose=False)
    except SystemExit as e:
        fail(f"{where}: {str(e.code).removeprefix('error: ')}")
    for key, valid in (('optimizer', OPTIMIZERS), ('lr_schedule', LR_SCHEDULES)):   # (else a run fails once started)
        if cfg[key] not in valid:
            fail(f"{where}: {key}={cfg[key]!r}; valid: {', '.join(valid)}")
    return cfg


def dataset_vocab(cfg):
    """The vocabulary train.py will give the model: vocab_size, or the dataset's padded to a
    multiple of 64 (as train.py does); None where the dataset is not prepared yet."""
    if cfg['vocab_size']:
        return cfg['vocab_size']
    meta = os.path.join(cfg['data_dir'] or os.path.join('data', cfg['dataset']), 'meta.json')
    if not os.path.isfile(meta):
        return None
    with open(meta) as f:
        return padded_vocab_size(json.load(f)['vocab_size'])


def model_numbers(cfg, where):
    """Parameters, FLOPs per token and KV-cache bytes per token of the run's model, built on the
    meta device (nothing allocated); {} where the vocabulary is not known yet."""
    vocab = dataset_vocab(cfg)
    try:                                        # (a stand-in vocabulary checks the rest before any data)
        mc = model_config_from({**cfg, 'vocab_size': vocab or 64}, ModelConfig)
    except ValueError as e:
        fail(f'{where}: {e}')
    if vocab is None:
        return {}
    with torch.device('meta'):
        m = GPT(mc)
    return {'params': m.num_params() - m.mtp_params(), 'active_params': m.active_params(),
            'flops_per_token': m.flops_per_token(cfg['block_size']),
            # numbers cached per token over all layers (MLA: the latent + the RoPE key; MHA/GQA:
            # 2 n_kv_head head_dim a layer) x 2 bytes: the cache in bf16, as a GPU serves it
            'kv_cache_bytes_per_token': 2 * cache_numbers_per_token(mc)}


# what changes where a run writes, how it logs or how fast it runs, not what it trains
NOT_TRAINING = ('out_dir', 'init_from', 'max_iters', 'data_dir', 'prepare', 'log_interval', 'always_save_checkpoint',
                'save_checkpoints', 'eval_only', 'device', 'compile', 'compile_mode', 'cuda_graph_train',
                'peak_flops', 'profile', 'cuda_sync_check', 'tensorboard', 'wandb_project', 'run_name')


def digest(value):
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:12]


def training_settings(cfg):
    """What a run trains with: its resolved train.py settings, NOT_TRAINING left out, as JSON values
    (kept in its marker, so that a later call can name the keys that changed)."""
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in NOT_TRAINING}, default=repr))


def fingerprint(cfg):
    """(settings, data): short hashes of what a run trains: its resolved train.py settings (NOT_TRAINING
    left out) and its data, the prepared splits' token / byte / document counts and the vocabulary
    in meta.json (None where the data is not prepared here: a report made without the data)."""
    settings = digest({k: v for k, v in cfg.items() if k not in NOT_TRAINING})
    meta = read_json(os.path.join(cfg['data_dir'] or os.path.join('data', cfg['dataset']), 'meta.json'))
    data = digest({k: v for k, v in meta.items() if k == 'vocab_size' or k.endswith(('_tokens', '_bytes', '_docs'))}
                  ) if meta else None
    return settings, data


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- the runs: one per variant x seed -------------------------------------------------------------
DEFAULT_SETTINGS = training_settings(resolve([], "train.py's defaults"))    # (settings_changed)
check_keys([k for k, _ in parse_args(base_args, 'base') if k], 'base')
runs, override_keys, iters_note = [], [], False
for name, overrides in variants.items():
    where = f"variant '{name}'"
    if isinstance(overrides, dict):
        check_keys(overrides, where)
        # a string goes as it is (train.py reads a str setting raw), anything else as a literal
        var_args = [f'--{k}={v}' if isinstance(v, str) else f'--{k}={v!r}' for k, v in overrides.items()]
    elif isinstance(overrides, (list, tuple)):
        var_args = list(overrides)
        check_keys([k for k, _ in parse_args(var_args, where) if k], where)
    else:
        fail(f"{where}: overrides must be a dict {{'key': value}} or a list ['--key=value'], got {overrides!r}")
    keys = [k for k, _ in parse_args(var_args, where) if k]
    if 'max_iters' in keys and (max_tokens or max_flops):
        fail(f"{where} sets max_iters, but the study's budget ({'max_tokens' if max_tokens else 'max_flops'}) "
             f"sets every run's; leave one of them out")
    override_keys += [k for k in keys if k not in override_keys]
    cfg = resolve(base_args + var_args, where)
    numbers = model_numbers(cfg, where)        # also checks that the ModelConfig is valid
    # tokens one optimizer step trains on: micro-batch x sequence x accumulation x processes
    tokens_per_step = cfg['batch_size'] * cfg['block_size'] * cfg['gradient_accumulation_steps'] * nproc_per_node
    dir_name = re.sub(r'[^A-Za-z0-9._=+-]+', '-', name)   # 'a=1,b=x' -> 'a=1-b=x'
    if max_tokens:
        iters = max(1, int(max_tokens // tokens_per_step))
    elif max_flops:
        if not numbers and (report_only or dry_run):   # made without the data: the numbers a run recorded
            markers = [read_json(os.path.join(out_dir, f'{dir_name}_s{seed}', 'ablate.json')) or {} for seed in seeds]
            numbers = next((m['model_numbers'] for m in markers if m.get('model_numbers')), {})
        data_dir = cfg['data_dir'] or os.path.join('data', cfg['dataset'])
        if numbers:
            iters = max(1, int(max_flops // (numbers['flops_per_token'] * tokens_per_step)))
        elif dry_run:                       # the steps wait for the vocabulary: the runs are listed all the same
            iters = None
            if not iters_note:
                print(f'max_iters: from max_flops once {data_dir} is prepared (the vocabulary sets the FLOPs '
                      f'per token): {prepare_command(data_dir, cfg["dataset"])}')
            iters_note = True
        else:
            fail(f'{where}: max_flops needs the model\'s FLOPs per token, so its vocabulary: prepare the '
                 f'dataset first (no meta.json at {data_dir}): {prepare_command(data_dir, cfg["dataset"])}; '
                 f'or set vocab_size')
    else:
        iters = cfg['max_iters']
    for seed in seeds:
        run_dir = os.path.join(out_dir, f'{dir_name}_s{seed}')
        args = [*base_args, *var_args, f'--seed={seed}', f'--out_dir={run_dir}',
                f"--max_iters={'?' if iters is None else iters}"]
        runs.append({'variant': name, 'seed': seed, 'dir': run_dir, 'args': args, 'max_iters': iters,
                     'tokens_per_step': tokens_per_step, 'config': cfg, 'numbers': numbers,
                     'fingerprint': fingerprint(cfg), 'settings': training_settings(cfg),
                     'save_checkpoints': cfg['save_checkpoints']})
if len({r['dir'] for r in runs}) != len(runs):
    fail('two variants map to the same run folder; give them names that differ in letters or digits')


def log_rows(run_dir):
    rows = []
    with contextlib.suppress(OSError):
        with open(os.path.join(run_dir, 'log.jsonl')) as f:
            for line in f:
                with contextlib.suppress(ValueError):     # a line cut short by a kill
                    rows.append(json.loads(line))
    return rows


def outcome(run):
    """'done' or 'diverged' where a run has ended for good as this study now gives it: the runner
    saw it exit 0 (or its loss become NaN/inf) at this budget, settings and data, or (a folder from
    elsewhere, no ablate.json) its log holds the final evaluation at max_iters; else None."""
    marker = read_json(os.path.join(run['dir'], 'ablate.json'))
    if marker is not None:
        ended = marker.get('status') in ('done', 'diverged')
        return marker['status'] if ended and stale(run) is None else None
    return 'done' if run['max_iters'] is not None and \
        any('val/loss' in r and r['step'] >= run['max_iters'] for r in log_rows(run['dir'])) else None


HASH_ONLY_MATCHES = {}     # (an older marker's hash, the settings' hash now) -> explained: searched once


def settings_changed(marker, now):
    """The settings a run's marker differs in from `now` (its training settings as this study gives
    them), in words; '' where they differ only by settings added to train.py or ModelConfig since,
    or removed since, at their defaults (the run trained as it would now). An older marker holds
    the settings' hash alone: then up to two added keys at their defaults are recognised."""
    old = marker.get('settings_values')
    if old is None:
        key = (marker['settings'], digest(now))
        if key not in HASH_ONLY_MATCHES:      # (stale() asks several times a call: a few thousand hashes)
            at_default = [k for k, v in now.items() if v == DEFAULT_SETTINGS.get(k, ())]
            HASH_ONLY_MATCHES[key] = any(
                digest({k: v for k, v in now.items() if k not in added}) == marker['settings']
                for added in itertools.chain.from_iterable(itertools.combinations(at_default, n) for n in (1, 2)))
        return '' if HASH_ONLY_MATCHES[key] else 'which keys, its marker does not say'
    changes = []
    for key in sorted(set(old) | set(now)):
        if key not in old:
            if now[key] != DEFAULT_SETTINGS.get(key, ()):
                changes.append(f'{key}={now[key]!r}, a setting added since')
        elif key not in now:            # removed since: no difference if the run had it at its default
            if old[key] != marker.get('settings_defaults', {}).get(key, ()):
                changes.append(f'{key}={old[key]!r}, no longer a setting')
        elif old[key] != now[key]:
            changes.append(f'{key}: {old[key]!r} -> {now[key]!r}')
    return '; '.join(changes)


def stale(run):
    """Why a run folder does not belong to this study as it is now (trained toward another budget,
    with other settings, on other data), or None. A folder without the runner's marker is taken
    as it is."""
    marker = read_json(os.path.join(run['dir'], 'ablate.json'))
    if marker is None:
        return None
    if marker.get('max_iters') is not None and run['max_iters'] is not None and marker['max_iters'] != run['max_iters']:
        return f"trained toward max_iters={marker['max_iters']}, not {run['max_iters']}"
    settings, data = run['fingerprint']
    if 'settings' not in marker:
        return 'trained before the runner recorded its settings'
    if marker['settings'] != settings:
        changed = settings_changed(marker, run['settings'])
        if changed:
            return f'trained with other settings ({changed})'
    if data and marker.get('data') and marker['data'] != data:
        return 'trained on other data (the prepared splits differ)'
    return None


def diverged_at(run_dir):
    """The step at which train.py found the loss NaN/inf (its log's last 'diverged_at'), or None."""
    steps = [r['diverged_at'] for r in log_rows(run_dir) if 'diverged_at' in r]
    return steps[-1] if steps else None


def has_checkpoint(run_dir):
    return os.path.isfile(os.path.join(run_dir, 'ckpt.pt')) or \
        os.path.isfile(os.path.join(run_dir, 'ckpt_dcp', 'meta.pt'))


def write_marker(run, **fields):
    path = os.path.join(run['dir'], 'ablate.json')
    settings, data = run['fingerprint']
    # model_numbers: for a report made where the data is absent; parallel: how many runs shared
    # the device (the report's note on speed); peak_flops: the MFU denominator a resumed run reuses
    info = {'variant': run['variant'], 'seed': run['seed'], 'max_iters': run['max_iters'],
            'settings': settings, 'settings_values': run['settings'], 'settings_defaults': DEFAULT_SETTINGS,
            'eval_batches': EVAL_SEED, 'data': data, 'command': run['command'],
            'model_numbers': run['numbers'],
            'parallel': parallel, **({'peak_flops': run['peak_flops']} if run.get('peak_flops') else {}), **fields}
    with open(path + '.tmp', 'w') as f:
        json.dump(info, f, indent=1)
    os.replace(path + '.tmp', path)


def command(run, resume):
    launcher = [sys.executable] if nproc_per_node == 1 else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc_per_node}']
    return launcher + [TRAIN, *run['args'], *(['--init_from=resume'] if resume else [])]


# --- train ----------------------------------------------------------------------------------------
n = len(runs)
label = {id(r): f"[{i + 1}/{n}] {r['variant']} seed {r['seed']}" for i, r in enumerate(runs)}
todo = []
for r in runs:
    if only and r['variant'] not in only:            # another call's: left as it is
        continue
    why = stale(r)
    if why is not None and not dry_run and not report_only:
        # resuming would continue another schedule, model or data: start over, the old run set aside
        aside = f"{r['dir']}.stale"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(r['dir'], aside)
        print(f"{label[id(r)]}: {why}: starts over (the old run moved to {aside})")
    elif why is not None:
        print(f"{label[id(r)]}: {why}: would start over")
    r['resume'] = why is None and has_checkpoint(r['dir']) and r['save_checkpoints']   # (stale: from scratch)
    r['command'] = command(r, r['resume'])
    ended = outcome(r)
    if ended == 'diverged':
        print(f"{label[id(r)]}: diverged before (at step {diverged_at(r['dir'])}), not run again ({r['dir']})")
    elif ended:
        print(f"{label[id(r)]}: finished before, skipped ({r['dir']})")
    else:
        todo.append(r)
print(f"{n} runs ({len(variants)} variants x {len(seeds)} seeds) in {out_dir}; {len(todo)} to train"
      + (f" (only {', '.join(only)})" if only else '') + (f', {parallel} at once' if parallel > 1 and todo else ''))
if dry_run or report_only:
    for r in todo:
        print(f"{label[id(r)]}: {'would resume' if r['resume'] else 'would start'}: "
              f"python {' '.join(os.path.relpath(a) if a == TRAIN else a for a in r['command'][1:])}")
    todo = []
    if dry_run:
        sys.exit(0)
# a base that names its data_dir is trained on it as it is (train.py prepares only data/<dataset>):
# say once how to prepare what is missing, rather than let every run fail on it
unprepared = {r['config']['data_dir']: r['config']['dataset'] for r in todo
              if r['config']['data_dir'] and not os.path.exists(os.path.join(r['config']['data_dir'], 'meta.json'))}
if unprepared:
    fail(f"no prepared data at {', '.join(unprepared)} (no meta.json); prepare it first: "
         + '; '.join(prepare_command(d, name) for d, name in unprepared.items()))

run_device = todo[0]['config']['device'] if todo else 'cpu'
if parallel > 1 and todo and not any(r['config']['peak_flops'] for r in todo) and \
        (run_device in ('auto', 'cpu') or run_device.startswith('cuda')):
    # every train.py measures its device's peak FLOP/s (its MFU denominator) with a large matmul at
    # its start; several runs sharing a GPU each measure it while the others train, each a different
    # fraction of it (MFU above 80% on an H200). So it is measured here once, alone, and given to all;
    # a study resumed later reuses the peak its runs recorded, so that one log has one denominator.
    recorded = [(read_json(os.path.join(r['dir'], 'ablate.json')) or {}).get('peak_flops') for r in runs]
    peak = next((p for p in recorded if p), None)
    if peak is None:
        from runtime import measure_peak_flops
        device_type = 'cuda' if run_device != 'cpu' and torch.cuda.is_available() else 'cpu'
        dtype = todo[0]['config']['dtype']
        gpu = None                                       # the first run slot's GPU (devices=), else the current
        if device_type == 'cuda':
            named = [d.strip() for d in devices.split(',') if d.strip()]
            gpu = int(named[0]) if named and named[0].isdigit() else torch.cuda.current_device()
        with torch.cuda.device(gpu) if gpu is not None else contextlib.nullcontext():
            peak = measure_peak_flops(device_type, 'bfloat16' if dtype == 'auto' else dtype)
            if device_type == 'cuda':
                torch.cuda.empty_cache()                 # the matmul's buffers: not kept from the runs
        print(f'MFU relative to {peak / 1e12:.2f} TFLOP/s, measured once here before the runs share the device')
    else:
        print(f'MFU relative to {peak / 1e12:.2f} TFLOP/s, as measured for these runs before')
    for r in todo:
        r['peak_flops'] = peak
        r['command'].append(f'--peak_flops={peak:.6g}')
env = dict(os.environ, PYTHONUNBUFFERED='1')
if parallel > 1 and 'OMP_NUM_THREADS' not in env:       # CPU threads shared between the runs
    env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // parallel))
slots = [d for d in devices.split(',') if d.strip()]
running = {}                                              # slot -> (run, process, start, output offset)
interrupted = False
try:
    while todo or running:
        for slot in range(parallel):                      # fill the free slots
            if slot in running or not todo:
                continue
            r = todo.pop(0)
            os.makedirs(r['dir'], exist_ok=True)
            output = os.path.join(r['dir'], 'train_output.txt')
            offset = os.path.getsize(output) if os.path.exists(output) else 0
            rows = log_rows(r['dir'])
            how = (f"resuming from its checkpoint (its log reached step {max([x['step'] for x in rows] or [0])})"
                   if r['resume'] else 'from scratch')
            run_env = dict(env, **({'CUDA_VISIBLE_DEVICES': slots[slot % len(slots)].strip()} if slots else {}))
            with open(output, 'a') as out:
                out.write(f"\n$ {' '.join(r['command'])}\n")
                out.flush()
                proc = subprocess.Popen(r['command'], stdout=out, stderr=subprocess.STDOUT, env=run_env)
            write_marker(r, status='running', pid=proc.pid)
            running[slot] = (r, proc, time.time(), offset)
            print(f"{label[id(r)]}: started {how}, {r['max_iters']} steps"
                  + (f" on GPU {run_env['CUDA_VISIBLE_DEVICES']}" if slots else '')
                  + f"; {hms(time.time() - t_start)} elapsed", flush=True)
        time.sleep(0.2)
        for slot, (r, proc, t0, offset) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[slot]
            took = time.time() - t0
            bad_step = diverged_at(r['dir']) if rc != 0 else None
            status = 'done' if rc == 0 else 'failed' if bad_step is None else 'diverged'
            if not r['numbers']:        # the data was prepared by this call's first run: now they can be known
                with contextlib.suppress(SystemExit):           # (checked before any run: never here)
                    r['numbers'], r['fingerprint'] = model_numbers(r['config'], r['variant']), fingerprint(r['config'])
            write_marker(r, status=status, returncode=rc, seconds=round(took, 1))
            if status == 'diverged':
                print(f"{label[id(r)]}: DIVERGED: the loss became NaN/inf at step {bad_step}, after {hms(took)}; "
                      f"recorded as a result, not run again; {hms(time.time() - t_start)} elapsed", flush=True)
            elif rc == 0:
                vals = [x['val/loss'] for x in log_rows(r['dir']) if 'val/loss' in x]
                print(f"{label[id(r)]}: done in {hms(took)}" + (f', val loss {vals[-1]:.4f}' if vals else '')
                      + f"; {hms(time.time() - t_start)} elapsed", flush=True)
            else:
                with open(os.path.join(r['dir'], 'train_output.txt'), errors='replace') as f:
                    f.seek(offset)
                    # tqdm redraws its bar with carriage returns: keep each line's last state
                    lines = [line.split('\r')[-1] for line in f.read().splitlines()]
                tail = '\n'.join('    ' + line for line in lines[-log_tail:])
                print(f"{label[id(r)]}: FAILED (exit {rc}) after {hms(took)}; the last lines of "
                      f"{os.path.join(r['dir'], 'train_output.txt')}:\n{tail}\n"
                      f"  (run this command again to continue it from its checkpoint)", flush=True)
except KeyboardInterrupt:
    # Ctrl-C reached the train.py processes too (one process group): each finishes its step, saves
    # a checkpoint and exits; wait for them, then write the table of what there is
    interrupted = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print('\nCtrl-C: waiting for the running train.py processes to save their checkpoints', flush=True)
    for r, proc, t0, offset in running.values():
        proc.wait()
        write_marker(r, status='stopped', returncode=proc.returncode, seconds=round(time.time() - t0, 1))


# --- the results ----------------------------------------------------------------------------------
def number(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def training_time(rows):
    """{step: seconds of training up to it}: step_time_ms is the wall time between two log lines
    over the steps between them (evaluations included, start-up not), so the sum over the log
    counts a resumed run's time without the pause. The first interval of a process (the log's
    first, and the first after a resume: its line comes more than 10 s after the line before plus
    its own interval) holds torch.compile's compilation, no property of the variant: such an
    interval counts at the median time a step of the others."""
    lines = sorted((r for r in rows if number(r.get('step_time_ms')) is not None), key=lambda r: r['step'])
    steps = [r['step'] - p['step'] for p, r in zip([{'step': 0}] + lines, lines)]
    first = [i == 0 or number(r.get('time')) is not None and number(lines[i - 1].get('time')) is not None and
             r['time'] - lines[i - 1]['time'] > r['step_time_ms'] / 1000 * steps[i] + 10
             for i, r in enumerate(lines)]
    rest = [r['step_time_ms'] for r, f in zip(lines, first) if not f]
    typical = statistics.median(rest) if rest else None
    t, prev, at = 0.0, 0, {0: 0.0}
    for r, f in zip(lines, first):
        ms = typical if f and typical is not None else r['step_time_ms']
        t += ms / 1000 * (r['step'] - prev)                     # ms a step x the steps since the last line
        at[r['step']], prev = t, r['step']
    return at


def time_at(times, step):
    """Training seconds at `step`: at the last logged step at or before it."""
    return times[max(s for s in times if s <= step)]


def median_of(rows, key):
    """The median of a per-log-line number, the first line left out where there are more
    (it includes compilation and the step-0 evaluation)."""
    vals = [number(r.get(key)) for r in rows if number(r.get(key)) is not None]
    vals = vals[1:] if len(vals) > 1 else vals
    return statistics.median(vals) if vals else None


def summarize(run):
    """One results row: the run's status, overrides and what its log and config give."""
    marker = read_json(os.path.join(run['dir'], 'ablate.json')) or {}
    why = stale(run)
    status = outcome(run) or (f'stale: {why}' if why else marker.get('status') or 'not started')
    status = 'failed' if status == 'running' else status     # a runner killed mid-run left 'running'
    row = {'variant': run['variant'], 'seed': run['seed'], 'status': status}
    run['parallel'] = marker.get('parallel')
    # trained before every run was evaluated on the same batches (data.EVAL_SEED): its own seed's
    run['own_batches'] = status == 'done' and run['seed'] != EVAL_SEED and 'eval_batches' not in marker
    if status == 'diverged':
        row['diverged_at'] = diverged_at(run['dir'])
    row.update({k: run['config'][k] for k in override_keys})  # the resolved value of every override
    row.update({'max_iters': run['max_iters'], **(run['numbers'] or marker.get('model_numbers') or {})})
    run['curve'] = []
    if status != 'done':
        return row
    rows = log_rows(run['dir'])
    evals = [r for r in rows if number(r.get('val/loss')) is not None]
    trains = [r for r in rows if 'train/loss' in r]
    last = evals[-1] if evals else {}
    row['steps'] = max([r['step'] for r in rows] or [0])
    row['tokens'] = row['steps'] * run['tokens_per_step']    # (the last log line may be before the end)
    row['val_loss'], row['val_bpb'] = number(last.get('val/loss')), number(last.get('val/bpb'))
    for key, value in last.items():                  # more held-out splits, e.g. val_tinystories
        split, _, kind = key.rpartition('/')
        if kind in ('loss', 'bpb') and split not in ('val', 'train') and number(value) is not None:
            row[f'{split}_{kind}'] = number(value)
    row['tokens_per_sec'] = median_of(trains, 'tokens_per_sec')
    row['mfu'] = median_of(trains, 'mfu')
    peaks = [number(r.get('peak_mem_gb')) for r in trains if number(r.get('peak_mem_gb')) is not None]
    row['peak_mem_gb'] = max(peaks) if peaks else None
    times = training_time(trains)
    row['train_time_s'] = time_at(times, row['steps']) if trains else None   # (no log line: unknown)
    cvs = [number(r.get('moe/load_cv')) for r in trains if number(r.get('moe/load_cv')) is not None]
    imb = [number(r.get('moe/max_imbalance')) for r in trains if number(r.get('moe/max_imbalance')) is not None]
    for key, values in (('moe_load_cv', cvs), ('moe_max_imbalance', imb)):   # busiest expert / mean
        row[key] = statistics.mean(values) if values else None                 # mean over the log lines,
        end = values[-max(1, len(values) // 10):]                              # and over the last tenth
        row[f'{key}_end'] = statistics.mean(end) if end else None              # of them (the load now)
    logits = [number(r.get('attn/max_logit_all')) for r in trains if number(r.get('attn/max_logit_all')) is not None]
    row['max_attn_logit'] = max(logits) if logits else None            # the largest over the run
    for key in log_keys:                                               # the study's own: at the end
        values = [number(r.get(key)) for r in trains if number(r.get(key)) is not None]
        row[f'{key} (end)'] = statistics.mean(values[-max(1, len(values) // 10):]) if values else None
    # the val-loss curve: (step, tokens trained, training seconds, val loss) at each evaluation
    run['curve'] = [(r['step'], r['step'] * run['tokens_per_step'], time_at(times, r['step']), r['val/loss'])
                    for r in evals]
    return row


results = [summarize(r) for r in runs]
METRICS = ['val_loss', 'val_bpb']                    # then the extra splits, then these
LATER = ['tokens_per_sec', 'mfu', 'peak_mem_gb', 'train_time_s', 'params', 'active_params', 'flops_per_token',
         'kv_cache_bytes_per_token', 'moe_load_cv', 'moe_load_cv_end', 'moe_max_imbalance', 'moe_max_imbalance_end',
         'max_attn_logit']
extra = []
for row in results:
    extra += [k for k in row if re.fullmatch(r'.+_(loss|bpb)', k) and k not in METRICS + extra]
METRICS += extra + LATER + [f'{key} (end)' for key in log_keys]
columns = ['variant', 'seed', 'status', *override_keys, 'max_iters', 'steps', 'tokens', *METRICS, 'diverged_at']
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    w.writeheader()
    for row in results:                             # None -> an empty cell
        w.writerow({k: '' if row.get(k) is None else row[k] for k in columns})

# results.md: per variant the mean over its finished seeds +- their standard deviation
FORMAT = {'tokens_per_sec': '{:,.0f}', 'mfu': '{:.1%}', 'peak_mem_gb': '{:.2f}', 'train_time_s': '{:.0f}',
          'params': '{:.2f}M', 'active_params': '{:.2f}M', 'flops_per_token': '{:.3g}',
          'kv_cache_bytes_per_token': '{:,.0f}', 'moe_load_cv': '{:.3f}', 'moe_load_cv_end': '{:.3f}',
          'moe_max_imbalance': '{:.2f}', 'moe_max_imbalance_end': '{:.2f}',
          'max_attn_logit': '{:.1f}'}
SCALE = {'params': 1e-6, 'active_params': 1e-6}


def cell(values, key):
    """'mean +- std' of the seeds' values (one seed: the value), formatted for the metric."""
    if not values:
        return ''
    fmt, scale = FORMAT.get(key, '{:.4f}'), SCALE.get(key, 1)
    mean = statistics.mean(values) * scale
    if len(values) == 1 or key in ('params', 'active_params', 'flops_per_token', 'kv_cache_bytes_per_token'):
        return fmt.format(mean)                     # (a config's numbers do not vary with the seed)
    std = statistics.stdev(values) * scale
    return f'{fmt.format(mean)} ± {fmt.format(std)}'


by_variant = {}
for row in results:
    by_variant.setdefault(row['variant'], []).append(row)
stats = {}
for name, rows in by_variant.items():
    done = [r for r in rows if r['status'] == 'done']
    vals = {k: [r[k] for r in done if r.get(k) is not None] for k in METRICS}
    stats[name] = {'done': len(done), 'of': len(rows), 'values': vals,
                   'val_mean': statistics.mean(vals['val_loss']) if vals['val_loss'] else None,
                   'val_std': statistics.stdev(vals['val_loss']) if len(vals['val_loss']) > 1 else None,
                   'by_seed': {r['seed']: r['val_loss'] for r in done if r.get('val_loss') is not None},
                   'diverged': sum(r['status'] == 'diverged' for r in rows)}
order = sorted(stats, key=lambda v: (stats[v]['val_mean'] is None, stats[v]['val_mean'] or 0.0))
shown = [k for k in METRICS if any(stats[v]['values'][k] for v in stats)]
budgets = sorted({(r['max_iters'], r['tokens_per_step']) for r in runs})
md = [f'# Ablation: {os.path.basename(os.path.normpath(out_dir))}', '',
      f'{len(variants)} variants x {len(seeds)} seeds (seeds {", ".join(map(str, seeds))}); each run '
      + '; '.join(f'{it:,} steps of {tps:,} tokens ({it * tps:,} tokens)' for it, tps in budgets)
      + ('' if len(budgets) == 1 else ' (by variant)') + '. '
      + f'Base: `{" ".join(base_args)}`.', '',
      'Each cell: the mean over the finished seeds ± their standard deviation; val loss in nats per token '
      '(the last evaluation); tokens/s and MFU are medians over the log lines; train time is training '
      'wall time with evaluations, without compilation (the first log interval of each process counts '
      'at the median step time); KV cache in bf16; moe_load_cv is the coefficient of variation '
      '(std / mean) of the tokens per routed expert, averaged over layers and log lines, '
      'moe_max_imbalance the busiest expert\'s tokens over the mean, likewise; _end: averaged over the '
      'last tenth of the log lines only (the balance the run ended with).', '',
      '| ' + ' | '.join(['variant', 'seeds done', *shown]) + ' |',
      '|' + ' --- |' * (len(shown) + 2)]
for v in order:
    s = stats[v]
    seeds_cell = f"{s['done']}/{s['of']}" + (f" ({s['diverged']} diverged)" if s['diverged'] else '')
    md.append('| ' + ' | '.join([v, seeds_cell, *(cell(s['values'][k], k) for k in shown)]) + ' |')
md.append('')
ranked = [v for v in order if stats[v]['val_mean'] is not None]
if len(ranked) >= 2:
    a, b = stats[ranked[0]], stats[ranked[1]]
    gap = b['val_mean'] - a['val_mean']
    spreads = [s for s in (a['val_std'], b['val_std']) if s is not None]
    if not spreads:
        md.append(f'Best: {ranked[0]}, {gap:.4f} below {ranked[1]} in val loss; with one finished seed each '
                  f'the seed-to-seed spread is unknown, so whether that is more than noise cannot be told '
                  f'(run more seeds, e.g. --seeds=[1,2,3]).')
    else:
        common = sorted(set(a['by_seed']) & set(b['by_seed']))
        paired = len(common) >= 2 and len(common) == len(a['by_seed']) == len(b['by_seed'])
        if paired:
            # a seed fixes the training batches (and every run reads the same evaluation batches), so
            # the two variants' runs pair up by seed: the noise is the spread of the per-seed
            # differences d, whose mean has the standard error stdev(d) / sqrt(n)
            diffs = [b['by_seed'][k] - a['by_seed'][k] for k in common]
            se, dof = statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs) - 1
            how = f'paired by seed, {len(diffs)} seeds: per-seed differences {min(diffs):+.4f} to {max(diffs):+.4f}'
        else:
            # the standard error of the difference of the two means, sqrt(s_a^2 / n_a + s_b^2 / n_b), a
            # variant with one seed taking the other's std, with Welch's degrees of freedom (rounded down)
            sa, sb = (x['val_std'] if x['val_std'] is not None else max(spreads) for x in (a, b))
            va, vb = sa ** 2 / a['done'], sb ** 2 / b['done']
            se = math.sqrt(va + vb)
            dof = max(1, int((va + vb) ** 2 / (va ** 2 / max(a['done'] - 1, 1) + vb ** 2 / max(b['done'] - 1, 1)))
                      if se > 0 else 1)
            how = f'unpaired: not the same finished seeds; seed-to-seed std up to {max(spreads):.4f}'
        t = t_95(dof)
        if se == 0:        # (paired: the same difference in every seed; unpaired: each variant's seeds agree)
            alike = 'the same gap in every seed' if paired else "each variant's seeds agree exactly"
            md.append(f'Best: {ranked[0]}, {gap:.4f} below {ranked[1]} in val loss, {alike} ({how}).' if gap > 0
                      else f'**Equal:** {ranked[0]} and {ranked[1]} have the same val loss in every seed ({how}).')
        elif gap <= t * se:
            md.append(f'**Inside the noise:** the best two, {ranked[0]} and {ranked[1]}, differ by {gap:.4f} in val '
                      f'loss, {gap / se:.1f} standard errors of that difference ({se:.4f}; {how}): not above '
                      f'{t:.2f}, the 95% threshold of a t-test with {dof} degrees of freedom, so neither is shown '
                      f'to be better.')
        else:
            md.append(f'Best: {ranked[0]}, {gap:.4f} below {ranked[1]} in val loss, {gap / se:.1f} standard errors '
                      f'of that difference ({se:.4f}; {how}), above {t:.2f}, the 95% threshold of a t-test with '
                      f'{dof} degrees of freedom.')
diverged = [r for r in results if r['status'] == 'diverged']
if diverged:
    md.append('')
    md.append('Diverged (the training loss became NaN/inf; left out of the means, not run again): '
              + ', '.join(f"{r['variant']} seed {r['seed']} at step {r['diverged_at']}" for r in diverged) + '.')
shared = max([r['parallel'] for r in runs if r.get('parallel')] or [parallel])   # as the runs were trained
if shared > 1:
    md.append('')
    md.append(f'Up to {shared} runs trained at once on one device here, so tokens/s, MFU and train time '
              f'depend on which runs overlapped: compare them only with runs made alone (--parallel=1).')
own = [r for r in runs if r.get('own_batches')]
if own:
    md.append('')
    md.append('Evaluated on batches of their own seed (trained before every run shared one set of evaluation '
              'batches; their spread over seeds includes which batches each read): '
              + ', '.join(f"{r['variant']} seed {r['seed']}" for r in own) + '.')
not_done = [(r['variant'], r['seed'], r['status']) for r in results if r['status'] not in ('done', 'diverged')]
if not_done:
    md.append('')
    md.append('Not finished (left out of the means): ' + ', '.join(f'{v} seed {s} ({st})' for v, s, st in not_done)
              + '; run the same command again to continue them.')
with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(md) + '\n')


def mean_curve(variant):
    """The variant's val-loss curve averaged over its finished seeds, at the evaluations they share:
    (step, tokens, seconds, mean val loss, lowest, highest over the seeds) at each."""
    curves = [r['curve'] for r in runs if r['variant'] == variant and r['curve']]
    if not curves:
        return []
    steps = sorted(set.intersection(*({p[0] for p in c} for c in curves)))
    at = [{p[0]: p for p in c} for c in curves]
    return [(s, statistics.mean(c[s][1] for c in at), statistics.mean(c[s][2] for c in at),
             statistics.mean(c[s][3] for c in at), min(c[s][3] for c in at), max(c[s][3] for c in at))
            for s in steps]


plots = []
plt = pyplot()                                       # None, with one note, without matplotlib


def save_plot(fig, name):
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path + '.tmp.png', dpi=110)          # written whole, then renamed
    plt.close(fig)
    os.replace(path + '.tmp.png', path)
    plots.append(path)


# a colour and a line style per variant, in the table's order: ten colours solid, then the same ten
# dashed, then dotted (matplotlib's own cycle repeats its ten colours: two variants would look alike)
# (in the study's order, not the table's: a variant keeps its look as results come in)
STYLE = {v: {'color': f'C{i % 10}', 'linestyle': ('-', '--', ':', '-.')[i // 10 % 4]} for i, v in enumerate(variants)}


def legend(ax):
    """The legend inside the axes, or beside them for more than 8 variants (it would hide curves)."""
    ax.legend(fontsize=8, **({'loc': 'upper left', 'bbox_to_anchor': (1.01, 1)} if len(order) > 8 else {}))


if plt is not None and any(r['curve'] for r in runs):
    for name, x, xlabel in (('val_loss_vs_tokens.png', 1, 'training tokens'),
                            ('val_loss_vs_time.png', 2, 'training time (s)')):
        # left: the whole run (log scale: the first evaluation, near ln(vocabulary), would flatten
        # the rest); right: its second half, zoomed, where variants a few hundredths apart separate
        fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13 if len(order) > 8 else 11, 4.5))
        for v in order:
            pts = mean_curve(v)
            if not pts:
                continue
            label = f"{v} ({stats[v]['done']} seed{'s' if stats[v]['done'] > 1 else ''})"
            ax.plot([p[x] for p in pts], [p[3] for p in pts], marker='o' if len(pts) < 30 else None,
                    markersize=3, label=label, **STYLE[v])
            late = [p for p in pts if p[x] >= pts[-1][x] / 2]
            zoom.plot([p[x] for p in late], [p[3] for p in late], marker='o' if len(late) < 30 else None,
                      markersize=3, label=label, **STYLE[v])
            if stats[v]['done'] > 1:        # the seeds' range: a gap inside it is not shown to be real
                zoom.fill_between([p[x] for p in late], [p[4] for p in late], [p[5] for p in late],
                                  color=STYLE[v]['color'], alpha=0.15, linewidth=0)
        ax.set_yscale('log')
        ax.set_title(os.path.basename(os.path.normpath(out_dir)))
        zoom.set_title('second half, zoomed (band: the lowest to the highest seed)')
        for a in (ax, zoom):
            a.set_xlabel(xlabel)
            a.set_ylabel('val loss (nats/token), mean over seeds')
            a.grid(alpha=0.3)
        legend(zoom)
        save_plot(fig, name)


def train_curve(variant, key):
    """A metric of the training log lines (key) against tokens trained, averaged over the variant's
    finished seeds at the steps they share: [(tokens, value)]."""
    curves = []
    for r in runs:
        if r['variant'] == variant and r['curve']:               # finished
            pts = {x['step'] * r['tokens_per_step']: number(x.get(key)) for x in log_rows(r['dir'])
                   if 'train/loss' in x and number(x.get(key)) is not None}
            if pts:
                curves.append(pts)
    if not curves:
        return []
    return [(t, statistics.mean(c[t] for c in curves)) for t in sorted(set.intersection(*map(set, curves)))]


# what a study adds over the val loss, over training: how evenly the experts are loaded (the
# balancing study) and the largest attention logit (the optimizer study: what QK-clip caps)
for key, name, ylabel in (('moe/load_cv', 'expert_load_cv_vs_tokens.png',
                           'expert-load CV (std / mean of\ntokens per expert)'),
                          ('attn/max_logit_all', 'max_logit_vs_tokens.png', 'max attention logit, all layers')):
    curves = {v: train_curve(v, key) for v in order}
    if plt is None or not any(curves.values()):
        continue
    fig, ax = plt.subplots(figsize=(9 if len(order) > 8 else 7, 4.5))
    for v, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{v} ({stats[v]['done']} seed"
                    f"{'s' if stats[v]['done'] > 1 else ''})", **STYLE[v])
    if key == 'attn/max_logit_all':                  # logits of 10 and of 1,000 on one plot
        ax.set_yscale('log')
    ax.set_xlabel('training tokens')
    ax.set_ylabel(ylabel + ', mean over seeds')
    ax.set_title(os.path.basename(os.path.normpath(out_dir)))
    ax.grid(alpha=0.3)
    legend(ax)
    save_plot(fig, name)

print('\n'.join(md[6:]))                             # the table and the verdict
print(f"wrote {os.path.join(out_dir, 'results.csv')}, {os.path.join(out_dir, 'results.md')}"
      + ''.join(f', {p}' for p in plots) + f'; {hms(time.time() - t_start)} in all')
failed = [r for r in results if r['status'] not in ('done', 'diverged')
          and (not only or r['variant'] in only)]       # (a variant left to another call is no failure)
if interrupted:
    print('stopped by Ctrl-C; run the same command again to continue', file=sys.stderr)
    sys.exit(130)
if failed and not report_only:
    sys.exit(f'{len(failed)} of {n} runs did not finish (see above); run the same command again to continue them')
