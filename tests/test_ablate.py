"""ablate.py: a grid of variants x seeds runs train.py once each and writes one table; a rerun skips
finished runs; a killed run is reported failed, the others go on, and the next call resumes it from
its checkpoint; a budget in tokens or FLOPs becomes max_iters; bad studies stop with one line."""

import csv
import hashlib
import json
import os
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_MODEL, run_script

MOE = ['--n_routed_experts=4', '--num_experts_per_tok=2', '--moe_intermediate_size=16', '--log_max_logit=True']


def write_study(tmp_path, base, **settings):
    """A study config file in tmp_path: base (train.py arguments) plus the runner's settings."""
    text = f'base = {base!r}\n' + ''.join(f'{k} = {v!r}\n' for k, v in settings.items())
    (tmp_path / 'study.py').write_text(text)
    return 'study.py'


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def log_rows(run_dir):
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_grid_runs_every_variant_and_seed_and_a_rerun_skips_them(tmp_path, byte_data):
    data = Path(byte_data)                                 # this test's own: its meta.json goes at the end
    base = [f'--data_dir={data}', *TINY_MODEL, *MOE, '--max_iters=4', '--eval_interval=4', '--warmup_iters=2']
    study = write_study(tmp_path, base, grid={'n_kv_head': [1, 2]}, seeds=[1, 2], out_dir='out/s', parallel=2,
                        log_keys=['grad_norm'])
    p = run_script('ablate.py', study, cwd=tmp_path)
    out = tmp_path / 'out' / 's'
    assert p.stdout.count('started from scratch') == 4 and '[4/4]' in p.stdout

    rows = read_csv(out / 'results.csv')
    assert [(r['variant'], r['seed']) for r in rows] == [('n_kv_head=1', '1'), ('n_kv_head=1', '2'),
                                                         ('n_kv_head=2', '1'), ('n_kv_head=2', '2')]
    assert list(rows[0])[:7] == ['variant', 'seed', 'status', 'n_kv_head', 'max_iters', 'steps', 'tokens']
    assert {'val_loss', 'val_bpb', 'tokens_per_sec', 'mfu', 'peak_mem_gb', 'kv_cache_bytes_per_token',
            'moe_load_cv', 'max_attn_logit', 'params', 'active_params'} <= set(rows[0])
    for r in rows:
        log = log_rows(out / f"{r['variant']}_s{r['seed']}")
        evals = [x for x in log if 'val/loss' in x]
        trains = [x for x in log if 'train/loss' in x]
        assert r['status'] == 'done' and r['n_kv_head'] == r['variant'][-1]
        assert int(r['steps']) == int(r['max_iters']) == 4 and float(r['tokens']) == 4 * 4 * 32
        assert float(r['val_loss']) == evals[-1]['val/loss'] and float(r['val_bpb']) == evals[-1]['val/bpb']
        assert float(r['tokens_per_sec']) == statistics.median(x['tokens_per_sec'] for x in trains[1:])
        assert float(r['mfu']) == statistics.median(x['mfu'] for x in trains[1:])
        assert float(r['moe_load_cv']) == pytest.approx(statistics.mean(x['moe/load_cv'] for x in trains))
        # and the load the run ended with: over the last tenth of the log lines (here the last one)
        assert float(r['moe_load_cv_end']) == pytest.approx(trains[-1]['moe/load_cv'])
        assert float(r['moe_max_imbalance_end']) == pytest.approx(trains[-1]['moe/max_imbalance'])
        assert float(r['max_attn_logit']) == max(x['attn/max_logit_all'] for x in trains)
        assert float(r['grad_norm (end)']) == pytest.approx(trains[-1]['grad_norm'])   # log_keys: a column each
        assert r['peak_mem_gb'] == ''                     # a CPU run logs no GPU memory: an empty cell
        # 2 layers x 2 (key and value) x n_kv_head x head_dim 16 numbers, 2 bytes each
        assert int(r['kv_cache_bytes_per_token']) == 2 * 2 * int(r['n_kv_head']) * 16 * 2
    assert rows[0]['val_loss'] != rows[1]['val_loss']     # the seed changes the run

    md = (out / 'results.md').read_text()
    means = {v: statistics.mean(float(r['val_loss']) for r in rows if r['variant'] == v)
             for v in ('n_kv_head=1', 'n_kv_head=2')}
    table = [line for line in md.splitlines() if line.startswith('| n_kv_head=')]
    assert [line.split(' | ')[0][2:] for line in table] == sorted(means, key=means.get)   # by val loss
    best = min(means, key=means.get)
    assert f'{means[best]:.4f} ± ' in md and '| 2/2 |' in md
    assert ('Inside the noise' in md) != ('Best: ' in md) and 'standard errors of that difference' in md
    if has_matplotlib():
        assert (out / 'val_loss_vs_tokens.png').stat().st_size > 0 and (out / 'val_loss_vs_time.png').exists()
        # the runs log expert load and attention logits: their curves against tokens too
        assert (out / 'expert_load_cv_vs_tokens.png').stat().st_size > 0
        assert (out / 'max_logit_vs_tokens.png').stat().st_size > 0

    # a second call finds every run finished: nothing is trained again, the table is rewritten
    files = [out / f'n_kv_head={k}_s{s}' / name for k in (1, 2) for s in (1, 2)
             for name in ('log.jsonl', 'ckpt.pt', 'train_output.txt')]
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    t0 = time.time()
    p = run_script('ablate.py', study, cwd=tmp_path)
    assert p.stdout.count('finished before, skipped') == 4 and '0 to train' in p.stdout and 'started' not in p.stdout
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before
    assert read_csv(out / 'results.csv') == rows
    assert time.time() - t0 < 60

    # the report alone where the data is not (run folders brought back from a GPU machine): the
    # model's numbers come from the finished runs' markers
    (data / 'meta.json').unlink()
    run_script('ablate.py', study, '--report_only=True', cwd=tmp_path)
    assert read_csv(out / 'results.csv') == rows


def test_runs_that_share_a_device_share_one_mfu_denominator(tmp_path, byte_data):
    # each train.py would measure the device's peak FLOP/s while the other runs train on it; the
    # runner measures it once before they start and gives every run the same number
    base = [f'--data_dir={byte_data}', *[a for a in TINY_MODEL if not a.startswith('--peak_flops')],
            '--max_iters=3', '--eval_interval=3', '--warmup_iters=1', '--log_interval=2']
    study = write_study(tmp_path, base, variants={'a': {}, 'b': {'n_kv_head': 1}}, out_dir='out/p', parallel=2)
    out = tmp_path / 'out' / 'p'
    p = run_script('ablate.py', study, cwd=tmp_path)
    assert 'measured once here before the runs share the device' in p.stdout
    lines = [next(line for line in (out / f'{v}_s1337' / 'train_output.txt').read_text().splitlines()
                  if line.startswith('MFU is relative to')) for v in 'ab']
    assert lines[0] == lines[1] and lines[0].endswith('(given)')
    rows = read_csv(out / 'results.csv')
    assert all(r['mfu'] for r in rows)
    # the tokens trained, though the last log line (step 2) comes before the last step (3)
    assert [float(r['tokens']) for r in rows] == [3 * 4 * 32] * 2
    # a report made later, with another parallel setting, still says the runs shared the device
    run_script('ablate.py', study, '--report_only=True', '--parallel=1', cwd=tmp_path)
    assert 'Up to 2 runs trained at once' in (out / 'results.md').read_text()
    # a run trained again later is given the peak its study measured before, not a new one
    shutil.rmtree(out / 'b_s1337')
    p = run_script('ablate.py', study, cwd=tmp_path)
    assert 'as measured for these runs before' in p.stdout
    again = next(line for line in (out / 'b_s1337' / 'train_output.txt').read_text().splitlines()
                 if line.startswith('MFU is relative to'))
    assert again == lines[0]


def test_a_killed_run_fails_the_rest_go_on_and_the_next_call_resumes_it(tmp_path, byte_data):
    base = [f'--data_dir={byte_data}', *TINY_MODEL, '--max_iters=40', '--eval_interval=10', '--eval_iters=1',
            '--log_interval=5', '--warmup_iters=5']
    study = write_study(tmp_path, base, variants={'killed': {}, 'next': ['--max_iters=5']}, seeds=[7],
                        out_dir='out/s')
    run = tmp_path / 'out' / 's' / 'killed_s7'
    p = subprocess.Popen([sys.executable, os.path.join(REPO, 'ablate.py'), study], cwd=tmp_path, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    deadline = time.time() + 120
    while not (run / 'ckpt.pt').exists() and time.time() < deadline:    # its first checkpoint (step 10)
        time.sleep(0.02)
    marker = json.loads((run / 'ablate.json').read_text())
    # a running run's marker already holds what a report without the data needs
    assert marker['status'] == 'running' and marker['model_numbers']['flops_per_token'] > 0 and marker['parallel'] == 1
    os.kill(marker['pid'], signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1 and '1 of 2 runs did not finish' in err
    assert 'killed seed 7: FAILED (exit -9)' in out and 'step 10:' in out      # with the output's tail
    assert 'next seed 7: done' in out                                           # the next run still ran
    rows = read_csv(tmp_path / 'out' / 's' / 'results.csv')
    assert [(r['variant'], r['status']) for r in rows] == [('killed', 'failed'), ('next', 'done')]
    assert rows[0]['val_loss'] == '' and rows[1]['val_loss'] != ''
    kept = [r for r in log_rows(run) if r['step'] <= 10]

    p = run_script('ablate.py', study, cwd=tmp_path)
    assert 'killed seed 7: started resuming from its checkpoint' in p.stdout
    assert 'next seed 7: finished before, skipped' in p.stdout
    assert f'resuming {os.path.join("out", "s", "killed_s7")} at step 10' in (run / 'train_output.txt').read_text()
    log = log_rows(run)
    assert log[:len(kept)] == kept                       # the steps before the checkpoint kept, not retrained
    assert [r['step'] for r in log if 'train/loss' in r] == list(range(5, 41, 5))   # each step once
    assert [r['step'] for r in log if 'val/loss' in r] == list(range(0, 41, 10))
    rows = read_csv(tmp_path / 'out' / 's' / 'results.csv')
    assert [r['status'] for r in rows] == ['done', 'done'] and rows[0]['steps'] == '40'

    # a new budget: the finished run is not resumed toward it (that would continue its old
    # learning-rate schedule) but starts over, the old run set aside
    write_study(tmp_path, base, variants={'killed': {}, 'next': ['--max_iters=7']}, seeds=[7], out_dir='out/s')
    p = run_script('ablate.py', study, cwd=tmp_path)
    assert 'next seed 7: trained toward max_iters=5, not 7: starts over' in p.stdout
    assert 'next seed 7: started from scratch' in p.stdout and 'killed seed 7: finished before, skipped' in p.stdout
    assert (tmp_path / 'out' / 's' / 'next_s7.stale' / 'log.jsonl').exists()
    assert read_csv(tmp_path / 'out' / 's' / 'results.csv')[1]['steps'] == '7'

    # other settings at the same budget: not skipped as finished, shown as stale in a report, then
    # trained again from scratch
    write_study(tmp_path, base, variants={'killed': {}, 'next': ['--max_iters=7', '--learning_rate=2e-3']},
                seeds=[7], out_dir='out/s')
    p = run_script('ablate.py', study, '--report_only=True', cwd=tmp_path)
    why = 'trained with other settings (learning_rate: 0.0006 -> 0.002)'        # the key that changed, named
    assert f'next seed 7: {why}: would start over' in p.stdout
    assert read_csv(tmp_path / 'out' / 's' / 'results.csv')[1]['status'] == f'stale: {why}'
    p = run_script('ablate.py', study, '--dry_run=True', cwd=tmp_path)        # from scratch, not resumed
    assert 'next seed 7: would start: ' in p.stdout and 'next seed 7: would resume' not in p.stdout
    p = run_script('ablate.py', study, cwd=tmp_path)
    assert f'next seed 7: {why}: starts over' in p.stdout
    assert 'next seed 7: started from scratch' in p.stdout and 'killed seed 7: finished before, skipped' in p.stdout
    assert [r['status'] for r in read_csv(tmp_path / 'out' / 's' / 'results.csv')] == ['done', 'done']


def digest(value):
    """ablate.py's short hash of a run's settings."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:12]


def test_settings_added_since_at_their_defaults_keep_a_finished_run(tmp_path, byte_data):
    """A run's marker keeps its settings: a setting added to train.py or ModelConfig since, at its
    default, leaves the run finished (it trained as it would now), and one that differs is named.
    An older marker holds the settings' hash alone: up to two added keys at their defaults are
    recognised from it."""
    base = [f'--data_dir={byte_data}', *TINY_MODEL, '--max_iters=2', '--eval_interval=2', '--warmup_iters=1']
    study = write_study(tmp_path, base, variants={'a': {}}, seeds=[1], out_dir='out/s')
    run_script('ablate.py', study, cwd=tmp_path)
    path = tmp_path / 'out' / 's' / 'a_s1' / 'ablate.json'
    marker = json.loads(path.read_text())
    values = marker['settings_values']
    assert marker['settings'] == digest(values) and values['score_reread'] is False     # (a default)

    def rerun(**changes):
        path.write_text(json.dumps({**marker, **changes}))
        return run_script('ablate.py', study, '--dry_run=True', cwd=tmp_path).stdout

    older = {k: v for k, v in values.items() if k not in ('score_reread', 'score_pooling')}    # before them
    assert 'a seed 1: finished before, skipped' in rerun(settings=digest(older), settings_values=older)
    out = rerun(settings=digest({**older, 'dropout': 0.5}), settings_values={**older, 'dropout': 0.5})
    assert 'a seed 1: trained with other settings (dropout: 0.5 -> 0.0): would start over' in out
    # a setting removed since: no difference where the run had it at its default, else named
    assert marker['settings_defaults']['score_reread'] is False
    gone = {**values, 'old_knob': 3}
    out = rerun(settings=digest(gone), settings_values=gone,
                settings_defaults={**marker['settings_defaults'], 'old_knob': 3})
    assert 'a seed 1: finished before, skipped' in out
    out = rerun(settings=digest(gone), settings_values=gone,
                settings_defaults={**marker['settings_defaults'], 'old_knob': 2})
    assert 'a seed 1: trained with other settings (old_knob=3, no longer a setting): would start over' in out
    hash_only = {k: v for k, v in marker.items() if k != 'settings_values'}
    path.write_text(json.dumps({**hash_only, 'settings': digest(older)}))
    assert 'a seed 1: finished before, skipped' in run_script('ablate.py', study, '--dry_run=True', cwd=tmp_path).stdout
    path.write_text(json.dumps({**hash_only, 'settings': digest({**older, 'dropout': 0.5})}))
    assert ('a seed 1: trained with other settings (which keys, its marker does not say): would start over'
            in run_script('ablate.py', study, '--dry_run=True', cwd=tmp_path).stdout)


def test_a_kept_run_evaluated_on_its_own_seeds_batches_is_named_in_the_table(tmp_path, byte_data):
    """Runs are evaluated on one shared set of batches (data.EVAL_SEED) and their markers say so; a
    finished run of another seed whose marker does not (trained before that) is named under the
    table, since its val loss was measured on batches of its own."""
    base = [f'--data_dir={byte_data}', *TINY_MODEL, '--max_iters=2', '--eval_interval=2', '--warmup_iters=1']
    study = write_study(tmp_path, base, variants={'a': {}}, seeds=[1337, 7], out_dir='out/s')
    run_script('ablate.py', study, cwd=tmp_path)
    out = tmp_path / 'out' / 's'
    assert json.loads((out / 'a_s7' / 'ablate.json').read_text())['eval_batches'] == 1337
    assert 'Evaluated on batches of their own seed' not in (out / 'results.md').read_text()
    for seed in (1337, 7):                                      # markers as they were written before
        path = out / f'a_s{seed}' / 'ablate.json'
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != 'eval_batches'}))
    run_script('ablate.py', study, '--report_only=True', cwd=tmp_path)
    md = (out / 'results.md').read_text()
    assert 'their spread over seeds includes which batches each read): a seed 7.' in md and 'a seed 1337' not in md


def test_a_study_whose_first_run_prepares_the_data_has_its_model_numbers_in_the_first_table(tmp_path):
    """Where train.py prepares data/<dataset> in the study's first run, the vocabulary (and so the
    parameters, FLOPs and KV bytes) is known once that run has finished: the first call's table
    has them, and the runs' markers hold them and the data's fingerprint."""
    from conftest import shared_file
    source = shared_file('shakespeare', 'input.txt')        # skips with a message where it is absent
    base = ['--dataset=shakespeare_char', f'--prepare=shakespeare_char.py --source={source}', *TINY_MODEL,
            '--max_iters=2', '--eval_interval=2', '--warmup_iters=1']
    study = write_study(tmp_path, base, variants={'a': {}}, seeds=[1], out_dir='out/s')
    run_script('ablate.py', study, cwd=tmp_path)
    row = read_csv(tmp_path / 'out' / 's' / 'results.csv')[0]
    assert row['status'] == 'done' and float(row['params']) > 0 and float(row['flops_per_token']) > 0
    marker = json.loads((tmp_path / 'out' / 's' / 'a_s1' / 'ablate.json').read_text())
    assert marker['model_numbers']['params'] == int(row['params']) and marker['data'] is not None


def test_a_diverged_run_is_a_result_not_a_failure(tmp_path, byte_data):
    base = [f'--data_dir={byte_data}', *TINY_MODEL, '--max_iters=4', '--eval_interval=4', '--warmup_iters=0']
    study = write_study(tmp_path, base, variants={'fine': {}, 'huge_lr': {'learning_rate': 1e30}}, seeds=[1],
                        out_dir='out/s')
    p = run_script('ablate.py', study, cwd=tmp_path)       # exits 0: every run ended
    assert 'huge_lr seed 1: DIVERGED: the loss became NaN/inf at step' in p.stdout
    rows = read_csv(tmp_path / 'out' / 's' / 'results.csv')
    assert [(r['variant'], r['status']) for r in rows] == [('fine', 'done'), ('huge_lr', 'diverged')]
    assert rows[1]['diverged_at'] != '' and rows[1]['val_loss'] == ''
    md = (tmp_path / 'out' / 's' / 'results.md').read_text()
    assert '| huge_lr | 0/1 (1 diverged) |' in md and f"huge_lr seed 1 at step {rows[1]['diverged_at']}" in md
    p = run_script('ablate.py', study, cwd=tmp_path)
    assert 'huge_lr seed 1: diverged before (at step' in p.stdout and '0 to train' in p.stdout


def test_train_time_leaves_out_each_process_s_compilation(tmp_path, byte_data):
    # a run folder from elsewhere (no marker): the log's first interval (compilation) and the first
    # after a resume (its line 100 s after the one before) count at the median step time
    base = [f'--data_dir={byte_data}', *TINY_MODEL, '--max_iters=40']
    study = write_study(tmp_path, base, variants={'a': {}}, seeds=[1], out_dir='out/s')
    run = tmp_path / 'out' / 's' / 'a_s1'
    run.mkdir(parents=True)
    lines = [(10, 5000, 1000.0 + 50), (20, 100, 1051.0), (30, 3000, 1051.0 + 100 + 30), (40, 100, 1182.0)]
    rows = [{'step': s, 'time': t, 'train/loss': 1.0, 'tokens': 1, 'step_time_ms': ms} for s, ms, t in lines]
    rows.append({'step': 40, 'time': 1183.0, 'val/loss': 2.0})
    (run / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    run_script('ablate.py', study, '--report_only=True', cwd=tmp_path)
    row = read_csv(tmp_path / 'out' / 's' / 'results.csv')[0]
    assert row['status'] == 'done' and float(row['train_time_s']) == pytest.approx(40 * 0.1)


def ablate(monkeypatch, tmp_path, capsys, *args):
    """Run ablate.py in this process (its checks need no subprocess); (exit code or message, stdout)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['ablate.py', *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(REPO, 'ablate.py'), run_name='__main__')
    return e.value.code, capsys.readouterr().out


def test_a_budget_in_tokens_or_flops_becomes_max_iters(monkeypatch, tmp_path, capsys, byte_data):
    import torch
    from model import GPT, ModelConfig
    base = [f'--data_dir={byte_data}', *TINY_MODEL, '--gradient_accumulation_steps=2']
    study = write_study(tmp_path, base, variants={'small': {}, 'wide': {'n_embd': 64}}, seeds=[1, 2],
                        dry_run=True)
    # tokens per step: batch 4 x block 32 x accumulation 2 = 256; 10,000 tokens -> 39 steps
    code, out = ablate(monkeypatch, tmp_path, capsys, study, '--max_tokens=10000')
    assert code == 0 and out.count('--max_iters=39') == 4 and out.count('would start') == 4
    assert 'out/ablations/study/wide_s2 --max_iters=39' in out and '--seed=2' in out
    # FLOPs: each variant's own FLOPs per token (vocab 257 -> 320), so the wide model gets fewer steps
    fpt = {}
    for name, n_embd in (('small', 32), ('wide', 64)):
        with torch.device('meta'):
            model = GPT(ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=n_embd))
        fpt[name] = model.flops_per_token(32)
    code, out = ablate(monkeypatch, tmp_path, capsys, study, '--max_flops=1e10')
    for name in fpt:
        line = next(line for line in out.splitlines() if f'{name}_s1 ' in line)
        assert f'--max_iters={int(1e10 // (fpt[name] * 256))} ' in line + ' '
    assert fpt['wide'] > fpt['small']


def test_only_trains_the_variants_it_names_and_the_table_shows_every_one(tmp_path, byte_data):
    """only=[...]: this call trains those variants alone (a study's runs spread over calls, a
    variant redone); the others are not started, and results.md still lists them, not yet done."""
    base = [f'--data_dir={byte_data}', *TINY_MODEL, '--max_iters=2', '--eval_interval=2', '--warmup_iters=1']
    study = write_study(tmp_path, base, variants={'a': {}, 'b': {'n_embd': 16}, 'c': {'n_layer': 1}}, seeds=[1],
                        out_dir='out/o')
    p = run_script('ablate.py', study, "--only=['c', 'a']", cwd=tmp_path)
    out = tmp_path / 'out' / 'o'
    assert '3 runs (3 variants x 1 seeds) in out/o; 2 to train (only c, a)' in p.stdout, p.stdout
    assert (out / 'a_s1' / 'log.jsonl').exists() and (out / 'c_s1' / 'log.jsonl').exists() and not (out / 'b_s1').exists()
    rows = {r['variant']: r for r in read_csv(out / 'results.csv')}
    assert rows['a']['status'] == rows['c']['status'] == 'done' and rows['b']['status'] != 'done'
    assert '| b | 0/1 |' in (out / 'results.md').read_text()


def test_a_report_without_the_data_reads_a_flops_budget_from_the_runs_markers(tmp_path):
    # run folders brought back from a GPU machine, the data not here: the FLOPs per token that turn
    # max_flops into steps come from what the runs recorded (no vocabulary to build the model from)
    base = [f"--data_dir={tmp_path / 'not_prepared'}", *TINY_MODEL]
    study = write_study(tmp_path, base, variants={'a': {}}, max_flops=1e10, out_dir='out/f')
    run = tmp_path / 'out' / 'f' / 'a_s1337'
    run.mkdir(parents=True)
    (run / 'ablate.json').write_text(json.dumps({'variant': 'a', 'seed': 1337, 'status': 'done', 'model_numbers': {
        'params': 1000, 'active_params': 1000, 'flops_per_token': 1e6, 'kv_cache_bytes_per_token': 64}}))
    p = run_script('ablate.py', study, '--report_only=True', cwd=tmp_path, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert read_csv(tmp_path / 'out' / 'f' / 'results.csv')[0]['max_iters'] == str(int(1e10 // (1e6 * 4 * 32)))


def test_a_study_whose_data_is_not_prepared_says_how_to_prepare_it(monkeypatch, tmp_path, capsys):
    """A base whose data_dir has no meta.json stops before any run, with the prepare command of that
    folder (data/stories -> prepare/stories.py), not one failure per run; a dry run still lists them."""
    study = write_study(tmp_path, ['--data_dir=data/stories', *TINY_MODEL], variants={'a': {}, 'b': {'n_embd': 16}},
                        out_dir='out/d')
    code, _ = ablate(monkeypatch, tmp_path, capsys, study)
    assert code == ("error: no prepared data at data/stories (no meta.json); prepare it first: "
                    "python prepare/stories.py --out_dir=data/stories"), code
    assert not (tmp_path / 'out' / 'd' / 'a_s1337').exists()
    code, out = ablate(monkeypatch, tmp_path, capsys, study, '--dry_run=True')
    assert code == 0 and out.count('would start') == 2
    # with a FLOPs budget the steps wait for the vocabulary: the dry run lists the runs all the same
    # and says what sets them; the run itself stops with the same prepare command
    code, out = ablate(monkeypatch, tmp_path, capsys, study, '--dry_run=True', '--max_flops=1e10')
    assert code == 0 and out.count('would start') == 2, out
    assert out.count('--max_iters=?') == 2 and ('max_iters: from max_flops once data/stories is prepared (the '
                                                 'vocabulary sets the FLOPs per token): python prepare/stories.py '
                                                 '--out_dir=data/stories') in out, out
    code, _ = ablate(monkeypatch, tmp_path, capsys, study, '--max_flops=1e10')
    assert 'max_flops needs' in code and 'python prepare/stories.py --out_dir=data/stories' in code, code


def test_a_report_before_any_run_has_finished_is_a_well_formed_table(tmp_path, byte_data):
    """--report_only=True with no run finished: every variant listed as not done, in a Markdown
    table whose rows have as many cells as its header and separator."""
    study = write_study(tmp_path, [f'--data_dir={byte_data}', *TINY_MODEL], variants={'a': {}, 'b': {}},
                        out_dir='out/e', report_only=True)
    run_script('ablate.py', study, cwd=tmp_path)
    table = [line for line in (tmp_path / 'out' / 'e' / 'results.md').read_text().splitlines() if line.startswith('|')]
    assert len(table) == 4 and len({line.count('|') for line in table}) == 1, table
    assert table[2].startswith('| a | 0/1') and table[3].startswith('| b | 0/1')


def test_the_zoomed_val_loss_plot_shows_the_range_over_seeds(monkeypatch, tmp_path, byte_data):
    """With several seeds a variant's zoomed curve (its mean) has a band from its lowest to its
    highest seed, in its colour, so that a gap between two means inside the bands is seen as such;
    a one-seed variant has none."""
    pytest.importorskip('matplotlib')
    from matplotlib.axes import Axes
    study = write_study(tmp_path, [f'--data_dir={byte_data}', *TINY_MODEL, '--max_iters=4'],
                        variants={'a': {}, 'b': {'learning_rate': 1e-3}}, seeds=[1, 2], out_dir='out/p',
                        report_only=True)
    for v, seeds in (('a', (1, 2)), ('b', (1,))):
        for seed in seeds:
            run = tmp_path / 'out' / 'p' / f'{v}_s{seed}'
            run.mkdir(parents=True)
            rows = [{'step': s, 'val/loss': 5.0 - s / 10 + seed / 100} for s in (0, 2, 4)]
            (run / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    bands, fill = [], Axes.fill_between
    monkeypatch.setattr(Axes, 'fill_between', lambda ax, x, lo, hi, **k: bands.append((list(x), list(lo), list(hi),
                                                                                     k['color'])) or fill(ax, x, lo, hi, **k))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['ablate.py', study])
    runpy.run_path(os.path.join(REPO, 'ablate.py'), run_name='__main__')      # a report: no exit
    # one band a plot (tokens, time) for 'a' alone, over the evaluations of the second half (steps 2, 4)
    assert len(bands) == 2 and all(b[3] == 'C0' for b in bands)
    assert bands[0][1] == pytest.approx([4.81, 4.61]) and bands[0][2] == pytest.approx([4.82, 4.62])


def test_a_plot_of_many_variants_tells_each_one_apart(monkeypatch, tmp_path, byte_data):
    """Twelve finished variants (folders from elsewhere: their logs alone): every curve of every plot
    has its own colour and line style (matplotlib's cycle alone repeats after ten), the same in each
    plot, and the max-logit plot is on a log scale."""
    pytest.importorskip('matplotlib')
    from matplotlib.axes import Axes
    names = [f'v{i:02d}' for i in range(12)]
    study = write_study(tmp_path, [f'--data_dir={byte_data}', *TINY_MODEL, '--max_iters=2'],
                        variants={v: {'learning_rate': 1e-3 * (i + 1)} for i, v in enumerate(names)}, out_dir='out/p',
                        report_only=True)
    for i, v in enumerate(names):
        run = tmp_path / 'out' / 'p' / f'{v}_s1337'
        run.mkdir(parents=True)
        rows = [{'step': s, 'train/loss': 5.0 - i / 100, 'attn/max_logit_all': 10.0 * (i + 1), 'moe/load_cv': 0.1}
                for s in (1, 2)] + [{'step': s, 'val/loss': 5.0 - i / 100 - s / 10} for s in (0, 2)]
        (run / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    drawn, plot = [], Axes.plot
    monkeypatch.setattr(Axes, 'plot', lambda ax, *a, **k: drawn.append((ax, k['label'], k.get('color'),
                                                                          k.get('linestyle'))) or plot(ax, *a, **k))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['ablate.py', study])
    runpy.run_path(os.path.join(REPO, 'ablate.py'), run_name='__main__')      # a report: no exit
    style = {}
    for ax, label, color, linestyle in drawn:
        assert color is not None and linestyle is not None
        assert style.setdefault(label, (color, linestyle)) == (color, linestyle)     # the same in every plot
    assert len(style) == 12 and len(set(style.values())) == 12, style
    logit_axes = {ax for ax, *_ in drawn if ax.get_ylabel().startswith('max attention logit')}
    assert len(logit_axes) == 1 and logit_axes.pop().get_yscale() == 'log'
    assert (tmp_path / 'out' / 'p' / 'max_logit_vs_tokens.png').exists()


@pytest.mark.parametrize('settings, message', [
    ({'variants': {'a': {}}, 'grid': {'n_layer': [1]}}, 'set either variants'),
    ({}, 'set variants'),
    ({'grid': {'n_layer': [], 'n_head': [2]}}, 'grid key n_layer has no values'),
    ({'grid': {}}, 'set variants'),
    ({'variants': {'a': {'n_layers': 4}}}, "variant 'a' sets 'n_layers', which is not a train.py setting "
                                           "(did you mean n_layer"),
    ({'variants': {'a': ['--atention=mha']}}, "variant 'a' sets 'atention', which is not a train.py setting"),
    ({'variants': {'a': {'seed': 3}}}, "variant 'a' sets 'seed', which the runner sets"),
    ({'variants': {'a': {'n_layer': 'four'}}}, "variant 'a': --n_layer=four is not a Python literal"),
    ({'variants': {'a': {'attention': 'mqa'}}}, "variant 'a': ModelConfig.attention='mqa'"),
    ({'variants': {'a': {}}, 'seeds': []}, 'seeds must be a non-empty list'),
    ({'variants': {'a': {}}, 'log_keys': ['train/x', 3]}, 'log_keys must be a list of log.jsonl keys'),
    ({'variants': {'a': {}, 'b': {}}, 'only': ['a', 'c']}, "only names 'c', not a variant of this study; its variants: a, b"),
    ({'variants': {'a': {}}, 'max_tokens': 1e6, 'max_flops': 1e12}, 'set one budget per run'),
    ({'variants': {'a': {'max_iters': 5}}, 'max_tokens': 1e6}, "variant 'a' sets max_iters, but the study's budget"),
    ({'variants': {'a': {'optimizer': 'lion'}}}, "variant 'a': optimizer='lion'; valid: adamw, muon, muonclip"),
    ({'variants': {'a': {'lr_schedule': 'inverse_sqrt'}}}, "variant 'a': lr_schedule='inverse_sqrt'; valid: cosine"),
])
def test_bad_studies_stop_with_one_line_saying_why(monkeypatch, tmp_path, capsys, settings, message):
    study = write_study(tmp_path, ['--device=cpu'], **settings)
    code, _ = ablate(monkeypatch, tmp_path, capsys, study)
    assert isinstance(code, str) and code.startswith('error: ') and message in code, code
    assert not (tmp_path / 'out').exists()                # nothing was run or written


def test_a_missing_base_is_an_error(monkeypatch, tmp_path, capsys):
    (tmp_path / 'study.py').write_text("variants = {'a': {}}\n")
    code, _ = ablate(monkeypatch, tmp_path, capsys, 'study.py')
    assert code.startswith('error: set base')


@pytest.mark.parametrize('study', sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'config', 'ablations'))
                                         if f.endswith('.py')))
def test_every_study_in_the_repository_builds_its_runs(tmp_path, study):
    """Each config/ablations/*.py names valid train.py keys and a budget that becomes max_iters
    (a dry run: nothing trains), on a stand-in data/stories with GPT-2's vocabulary."""
    os.symlink(os.path.join(REPO, 'config'), tmp_path / 'config')
    (tmp_path / 'data' / 'stories').mkdir(parents=True)
    (tmp_path / 'data' / 'stories' / 'meta.json').write_text(json.dumps({'vocab_size': 50257}))
    p = run_script('ablate.py', f'config/ablations/{study}.py', '--dry_run=True', cwd=tmp_path)
    starts = [line for line in p.stdout.splitlines() if 'would start: python' in line and 'train.py' in line]
    n = int(p.stdout.split(' runs (')[0].split()[-1])
    assert n >= 1 and len(starts) == n, p.stdout[-2000:]
    assert all('--max_iters=' in line and '--data_dir=data/stories' in line for line in starts)


@pytest.mark.parametrize('losses, verdict', [
    # b above a by 0.02 in every seed, the seeds 0.1 apart: the unpaired standard error (0.08) called
    # this noise; paired by seed the gap is the same in every seed
    ({'a': [3.0, 3.1, 3.2], 'b': [3.02, 3.12, 3.22]}, 'Best: a, 0.0200 below b in val loss'),
    # the same val loss in every seed: the standard error is 0 (this divided by it)
    ({'a': [3.0, 3.0], 'b': [3.0, 3.0]}, '**Equal:** a and b have the same val loss in every seed (paired by seed'),
    # per-seed differences +0.03, -0.01, +0.01: a mean of 0.01, 0.0115 standard errors: t 0.87 < 4.30
    ({'a': [3.0, 3.1, 3.2], 'b': [3.03, 3.09, 3.21]}, '**Inside the noise:** the best two, a and b, differ by 0.0100'),
    # not the same seeds finished: unpaired, with Welch's degrees of freedom
    ({'a': [3.0, 3.1, 3.2], 'b': [3.5, 3.6]}, 'unpaired: not the same finished seeds'),
    ({'a': [3.0, 3.0, 3.0], 'b': [3.1, 3.1]}, "each variant's seeds agree exactly (unpaired"),
])
def test_the_verdict_pairs_runs_by_seed(tmp_path, losses, verdict):
    """results.md says whether the best two variants differ by more than noise: paired by seed
    where both finished the same seeds (a seed fixes the batches), a two-sided 95% t-test."""
    write_study(tmp_path, ['--max_iters=4', '--device=cpu'], variants={'a': {}, 'b': {'learning_rate': 1e-3}},
                seeds=[1, 2, 3], out_dir='out/v')
    for v, values in losses.items():
        for seed, loss in zip((1, 2, 3), values):
            run_dir = tmp_path / 'out' / 'v' / f'{v}_s{seed}'
            run_dir.mkdir(parents=True)
            (run_dir / 'log.jsonl').write_text(json.dumps({'step': 4, 'val/loss': loss}) + '\n')
    run_script('ablate.py', 'study.py', '--report_only=True', cwd=tmp_path)
    md = (tmp_path / 'out' / 'v' / 'results.md').read_text()
    assert verdict in md, md[-600:]
