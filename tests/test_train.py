import json
import math
import os

import pytest
import torch

from checkpoint import load_checkpoint, load_model
from optim import lr_at
from conftest import REPO, TINY_MODEL, run_script, run_script_many


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def train_args(data, out, *extra):
    return [f'--data_dir={data}', f'--out_dir={out}', *TINY_MODEL, '--warmup_iters=4', '--lr_decay_iters=20',
            '--eval_interval=5', '--learning_rate=3e-3', *extra]


def train(cwd, data, out, *extra, check=True):
    return run_script('train.py', *train_args(data, out, *extra), cwd=cwd, check=check)


MOE_MLA = ['--attention=mla', '--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu', '--bias=False',
           '--kv_lora_rank=16', '--q_lora_rank=16', '--qk_nope_head_dim=16', '--qk_rope_head_dim=8',
           '--v_head_dim=16', '--n_routed_experts=8', '--num_experts_per_tok=2', '--n_shared_experts=1',
           '--moe_intermediate_size=16', '--scoring_func=sigmoid', '--routed_scaling_factor=2.5',
           '--first_k_dense_replace=1', '--bias_update_speed=0.01', '--aux_loss_alpha=0.001',
           '--mtp_depth=1']


@pytest.mark.parametrize('arch', ['dense', 'moe', 'muonclip', 'float16'])
def test_resume_continues_exactly(tmp_path, byte_data, arch):
    model = ['--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu', '--dropout=0.1',
             '--gradient_accumulation_steps=2']                    # dropout: RNG state must resume too
    if arch == 'moe':                                              # router biases must resume too
        model = MOE_MLA + ['--dropout=0.1', '--gradient_accumulation_steps=2']
    if arch == 'muonclip':                                         # Muon momentum, clipped weights
        model += ['--optimizer=muonclip', '--qk_clip_tau=0.5', '--learning_rate=0.01']
    if arch == 'float16':                                          # the GradScaler's scale and count
        model += ['--dtype=float16']
    train(tmp_path, byte_data, 'straight', '--max_iters=20', *model)
    train(tmp_path, byte_data, 'split', '--max_iters=10', *model)
    assert load_checkpoint(str(tmp_path / 'split'))['step'] == 10
    train(tmp_path, byte_data, 'split', '--max_iters=20', '--init_from=resume', *model)
    a, b = losses(tmp_path / 'straight'), losses(tmp_path / 'split')
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[s] for s in a] == [b[s] for s in a]                  # bit-identical losses
    assert a[20] < a[1] - 1.0                                      # and it learned something
    pa = load_checkpoint(str(tmp_path / 'straight'))['model']
    pb = load_checkpoint(str(tmp_path / 'split'))['model']
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    scaler = load_checkpoint(str(tmp_path / 'straight'))['scaler']
    assert scaler == load_checkpoint(str(tmp_path / 'split'))['scaler']
    assert (scaler is None) == (arch != 'float16')


def test_checkpoint_contents_and_reload(tmp_path, byte_data):
    train(tmp_path, byte_data, 'run', '--max_iters=5')
    ckpt = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert {'model', 'model_config', 'tokenizer', 'stage', 'step', 'optimizer', 'config', 'metrics',
            'rng'} <= set(ckpt)
    assert ckpt['stage'] == 'pretrain' and ckpt['step'] == 5
    assert ckpt['config']['n_layer'] == 2 and ckpt['config']['vocab_size'] == 320   # 257 -> x64
    assert {'val/loss', 'val/bpb', 'val/ppl'} <= set(ckpt['metrics'])
    # bits per byte = nats per token / ln 2 / bytes per token; byte-level data: 1 byte per token
    # except the EOT separators
    m = ckpt['metrics']
    assert m['val/bpb'] == pytest.approx(m['val/loss'] / math.log(2) * 1204 / 1200, rel=1e-3)
    # the rate each logged step trained at is the schedule's at that step (lr_at is tested on its
    # own; a loop that read it a step late passed every other test)
    c = ckpt['config']
    logged = [r for r in map(json.loads, open(tmp_path / 'run' / 'log.jsonl')) if 'lr' in r]
    assert logged and logged[0]['lr'] == pytest.approx(3e-3 / 5)                # warm-up's first step: lr / 5
    for r in logged:
        assert r['lr'] == pytest.approx(lr_at(r['step'] - 1, c['learning_rate'], c['min_lr'], c['warmup_iters'],
                                              c['lr_decay_iters'], c['lr_schedule'], c['decay_frac'])), r
    model, tok, _ = load_model(str(tmp_path / 'run'))
    assert tok.kind == 'byte' and model.config.n_embd == 32
    assert not [f for f in os.listdir(tmp_path / 'run') if f.endswith('.tmp')]
    assert (tmp_path / 'run' / 'loss.png').exists() or not _has_matplotlib()
    assert 'holds a run already' not in train(tmp_path, byte_data, 'fresh', '--max_iters=1').stderr
    # a second run from scratch into the same folder says it replaces the first (a run of other data, say)
    p = train(tmp_path, byte_data, 'run', '--max_iters=1')
    assert 'note: run holds a run already; this one, from scratch, replaces it' in p.stderr
    assert torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['step'] == 1
    p = train(tmp_path, byte_data, 'run', '--max_iters=1', '--save_checkpoints=False')   # saves nothing: no note
    assert 'holds a run already' not in p.stderr


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, byte_data):
    train(tmp_path, byte_data, 'run', '--max_iters=5')
    p = train(tmp_path, byte_data, 'run', '--max_iters=15', '--init_from=resume',
              '--learning_rate=1e30', '--grad_clip=0.0', check=False)
    assert p.returncode != 0
    assert 'the training loss became NaN/inf at step' in p.stderr, p.stderr[-2000:]
    bad_step = int(p.stderr.split('at step ')[1].split(';')[0])
    assert 5 <= bad_step < 15
    assert load_checkpoint(str(tmp_path / 'run'))['step'] == 5    # untouched
    # a step whose loss is finite but whose update breaks the model: its evaluation's val loss is
    # NaN; that model is not saved over the good checkpoint either
    p = train(tmp_path, byte_data, 'run', '--max_iters=15', '--init_from=resume', '--eval_interval=1',
              '--learning_rate=1e30', '--grad_clip=0.0', check=False)
    assert p.returncode != 0 and 'became NaN/inf at step' in p.stderr, p.stderr[-2000:]
    assert load_checkpoint(str(tmp_path / 'run'))['step'] == 5


def test_a_nan_val_loss_at_step_0_is_an_error(tmp_path, byte_data):
    """A model whose val loss is NaN before any step (here: weights of 1e30) stops the run with an
    error naming step 0, and no checkpoint is written."""
    p = train(tmp_path, byte_data, 'bad', '--max_iters=3', '--init_std=1e30', check=False)
    assert p.returncode != 0 and 'the val loss became NaN/inf at step 0' in p.stderr, p.stdout[-1500:] + p.stderr[-1500:]
    assert not (tmp_path / 'bad' / 'ckpt.pt').exists()


def test_speed_leaves_out_evaluation_time_and_a_resumed_config_describes_its_model(tmp_path, byte_data):
    """tokens/s and step_time_ms count training only: a slow evaluation (200 batches) between two
    log lines is not in them. A resumed run saves the model's own config (its vocab_size, not
    the 0 of this run's defaults)."""
    train(tmp_path, byte_data, 'run', '--max_iters=6', '--log_interval=2', '--eval_interval=2', '--eval_iters=200')
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'log.jsonl')]
    lines = [r for r in rows if 'step_time_ms' in r]
    assert [r['step'] for r in lines] == [2, 4, 6]
    for a, b in zip(lines, lines[1:]):          # an evaluation of 200 batches lies between each two
        assert 2 * b['step_time_ms'] / 1000 < 0.5 * (b['time'] - a['time']), (a, b)
    train(tmp_path, byte_data, 'run', '--max_iters=8', '--init_from=resume')
    ckpt = load_checkpoint(str(tmp_path / 'run'))
    assert ckpt['config']['vocab_size'] == ckpt['model_config']['vocab_size'] > 0


def test_sample_script(tmp_path, byte_data):
    import shutil
    import time
    train(tmp_path, byte_data, 'run', '--max_iters=10')
    (tmp_path / 'prompt.txt').write_text('Lily')
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'ckpt.pt').write_bytes(b'')                # empty, as a killed copy leaves it
    (tmp_path / 'texted').mkdir()
    (tmp_path / 'texted' / 'ckpt.pt').write_text('version https://git-lfs... or any text\n')   # not a zip
    for age, name in enumerate(('a', 'b', 'c', 'd', 'older', 'newer', 'speedrun/sft', 'speedrun/reward')):
        shutil.copytree(tmp_path / 'run', tmp_path / 'out' / name)      # the newest by its checkpoint's time,
        if name in ('older', 'speedrun/reward'):                        # also one level down (speedrun.sh's)
            ckpt = load_checkpoint(str(tmp_path / 'out' / name))
            ckpt['stage'] = 'sft' if name == 'older' else 'reward'
            torch.save(ckpt, tmp_path / 'out' / name / 'ckpt.pt')
        os.utime(tmp_path / 'out' / name / 'ckpt.pt', (time.time() + age,) * 2)
    bad = [('--temperature=-1', 'temperature=-1.0 must be >= 0'),
           ('--top_p=0', 'top_p=0.0 must be in (0, 1]'),
           ('--num_samples=0', 'num_samples=0 must be at least 1'),
           ('--start=FILE:nope.txt', "cannot read the prompt file 'nope.txt'"),
           ('--start=FILE:latin1.txt', "the prompt file 'latin1.txt' is not UTF-8 text")]
    (tmp_path / 'latin1.txt').write_bytes(b'\xff\xfeLily')
    two, lily, *refused, nothing, broken, texted, newest = run_script_many('sample.py', [
        ['--out_dir=run', '--start=Once upon', '--num_samples=2', '--max_new_tokens=20', '--device=cpu'],
        ['--out_dir=run', '--start=FILE:prompt.txt', '--num_samples=1', '--max_new_tokens=5', '--temperature=0',
         '--device=cpu'],
        *[['--out_dir=run', arg] for arg, _ in bad],
        ['--out_dir=nothing'], ['--out_dir=broken'], ['--out_dir=texted'],
        ['--max_new_tokens=3', '--num_samples=1', '--device=cpu']],
        cwd=tmp_path)
    empty = run_script('sample.py', cwd=tmp_path / 'broken', check=False)
    assert two.returncode == lily.returncode == newest.returncode == 0, (two.stderr, lily.stderr, newest.stderr)
    samples = two.stdout.split('-' * 40)
    assert len(samples) == 3 and samples[0].startswith('Once upon') and samples[1].strip()
    assert lily.stdout.startswith('Lily')
    for (arg, msg), p in zip(bad, refused):
        assert p.returncode != 0 and msg in p.stderr, (arg, p.stderr[-500:])
    found, more = nothing.stderr.split('checkpoints found: ')[1].strip().rsplit(' and ', 1)   # newest first,
    assert "no checkpoint at 'nothing" in nothing.stderr                                        # the first 8
    assert more == '1 more' and len(found.split(', ')) == 8, found
    assert set(found.split(', ')) < {'broken', 'run', 'texted', *[f'out/{x}' for x in ('a', 'b', 'c', 'd', 'older', 'newer')]}
    assert broken.returncode != 0
    assert "the checkpoint 'broken/ckpt.pt' is damaged or incomplete (0 bytes" in broken.stderr
    assert 'Traceback' not in broken.stderr
    assert "the checkpoint 'texted/ckpt.pt' is damaged or incomplete" in texted.stderr and 'Traceback' not in texted.stderr
    # the newest language model (a reward model is newer, and left out), the others all counted, and
    # the newest chat model where the newest is not one ('older' here, an SFT checkpoint)
    assert ('sampling from: out/speedrun/sft, the newest checkpoint under out/ (others: out/newer, out/older, '
            'out/d, out/c, out/b and 1 more; the newest chat model (SFT or after): out/older; --out_dir=FOLDER '
            'picks one)') in newest.stderr, newest.stderr
    assert empty.returncode != 0 and 'error: sampling from: no checkpoint under out/; train one first' in empty.stderr


def test_init_from_another_run_and_bad_inputs(tmp_path, byte_data):
    train(tmp_path, byte_data, 'base', '--max_iters=5')
    tuned_run = train(tmp_path, byte_data, 'tuned', '--max_iters=3', '--init_from=base')
    base, tuned = load_checkpoint(str(tmp_path / 'base')), load_checkpoint(str(tmp_path / 'tuned'))
    assert tuned['step'] == 3 and tuned['model_config'] == base['model_config']
    assert 'changed by this command' not in tuned_run.stdout       # the same model settings as base's
    # model settings given with init_from: applied where the parameters stay as they are, else refused
    deeper, theta, schedule, untied, longer = run_script_many('train.py', [
        train_args(byte_data, 'deeper', '--max_iters=1', '--init_from=base', '--n_layer=3'),
        train_args(byte_data, 'theta', '--max_iters=2', '--init_from=base', '--rope_theta=500.0'),
        train_args(byte_data, 'x', '--max_iters=9', '--lr_schedule=WSD'),
        train_args(byte_data, 'untied', '--max_iters=1', '--init_from=base', '--tie_word_embeddings=False'),
        train_args(byte_data, 'longer', '--max_iters=1', '--init_from=base', '--block_size=64')],
        cwd=tmp_path)
    # (a longer window than the checkpoint's was silently cut to its 32)
    assert longer.returncode and "block_size=64 is longer than the checkpoint's model was built for (32)" \
        in longer.stderr
    # (the same shapes, but an untied head is a parameter the tied checkpoint does not have)
    assert untied.returncode != 0 and "tie_word_embeddings=False (the checkpoint has True) changes" in untied.stderr
    assert "lr_schedule='WSD'; valid: cosine, wsd, constant" in schedule.stderr and 'step 0' not in schedule.stdout
    assert deeper.returncode != 0 and "n_layer=3 (the checkpoint has 2) changes the model's parameters" in deeper.stderr
    assert "changed by this command: rope_theta=500.0 (the checkpoint has 10000.0)" in theta.stdout, theta.stderr[-500:]
    assert load_checkpoint(str(tmp_path / 'theta'))['model_config']['rope_theta'] == 500.0
    # a checkpoint from before a model setting existed (rope_theta left out of its config): the setting
    # given with init_from is compared with its default, not ignored
    from checkpoint import save_checkpoint
    old = load_checkpoint(str(tmp_path / 'base'))
    del old['model_config']['rope_theta']
    save_checkpoint(str(tmp_path / 'old'), old)
    older = train(tmp_path, byte_data, 'from_old', '--max_iters=1', '--init_from=old', '--rope_theta=500.0')
    assert "changed by this command: rope_theta=500.0 (the checkpoint has 10000.0)" in older.stdout
    (tmp_path / 'own.py').write_text("dataset = 'mine'\nprepare = 'shakespeare_char.py --source=/nowhere'\n")
    (tmp_path / 'mine.txt').write_text('my own text')
    (tmp_path / 'prepared').mkdir()
    (tmp_path / 'prepared' / 'meta.json').write_text('{}')
    runs = run_script_many('train.py', [
        train_args(byte_data, 'x', '--max_iters=1', '--vocab_size=100'),
        train_args(str(tmp_path / 'nodata'), 'x'),                   # a named folder: never prepared
        train_args('data/stories', 'x'),                             # named as a prepare script is
        ['--dataset=nothing', '--device=cpu'],
        ['own.py', '--dataset=mine_typo', '--device=cpu'],            # the config's prepare= makes its 'mine'
        ['own.py', '--dataset=mine', '--device=cpu'],                 # ... which it still makes
        ['--data_dir=mine.txt', '--device=cpu'], ['--dataset=mine.txt', '--device=cpu'],
        ['--dataset=prepared', '--device=cpu'], ['--device=CPU'],
        ['--dataset=tinystories_bpe4k', '--data_dir=nowhere', '--device=cpu'],   # no prepare/ script of that name
        train_args(byte_data, 'x', '--max_iters=1', '--block_size=2000'),
        train_args(byte_data, 'x', '--max_iters=1', '--compile=True', '--compile_mode=fast'),
        train_args(byte_data, 'x', '--max_iters=1', '--cuda_graph_train=True')], cwd=tmp_path)
    vocab, nodata, stories, nothing, typo, own, afile, apath, folder, upper, bpe4k, block, mode, graph = runs
    assert 'vocab_size=100 is smaller than the dataset' in vocab.stderr
    assert f"no dataset at data_dir='{tmp_path / 'nodata'}' (no meta.json)" in nodata.stderr
    assert not (tmp_path / 'nodata').exists()
    assert f"e.g. python prepare/tinystories.py --out_dir={tmp_path / 'nodata'}, or leave" in nodata.stderr
    assert 'e.g. python prepare/stories.py --out_dir=data/stories, or leave' in stories.stderr   # not tinystories.py
    assert ('no dataset at data/nothing and no prepare/nothing.py to make it; datasets prepared on first use: '
            'shakespeare_char, stories, tinystories; text of your own: python prepare/tinystories.py '
            '--source=FILE_OR_FOLDER --out_dir=data/nothing') in nothing.stderr
    assert 'no prepare/mine_typo.py to make it' in typo.stderr and not (tmp_path / 'data' / 'mine_typo').exists()
    assert ("data_dir='mine.txt' is a file; data_dir is a folder of prepared tokens: make one with python "
            "prepare/tinystories.py --source=mine.txt --out_dir=data/NAME") in afile.stderr
    assert "dataset='mine.txt' is a name (the folder data/<dataset>)" in apath.stderr
    assert 'shakespeare_char.py --source=/nowhere --out_dir=data/mine failed' in own.stderr
    assert "for the prepared folder prepared pass --data_dir=prepared" in folder.stderr
    assert "device='CPU'; valid: auto, cpu, cuda, cuda:N, mps" in upper.stderr
    assert 'e.g. python prepare/tinystories.py --out_dir=nowhere' in bpe4k.stderr   # (it named tinystories_bpe4k.py)
    assert 'the val split of' in block.stderr and 'a window of block_size + 1 = 2001 needs more' in block.stderr
    assert 'evaluating' not in block.stdout                        # refused before any work
    assert mode.returncode != 0 and "compile_mode='fast'; valid: default, reduce-overhead" in mode.stderr
    assert graph.returncode != 0 and 'cuda_graph_train=True needs a CUDA GPU' in graph.stderr


def test_lr_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)
    assert lr_at(0, **kw) == pytest.approx(1 / 11)                 # linear warmup
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)                  # cosine halfway
    assert lr_at(110, **kw) == lr_at(500, **kw) == pytest.approx(0.1)
    assert lr_at(80, schedule='wsd', decay_frac=0.2, **kw) == 1.0  # stable until 88
    assert lr_at(99, schedule='wsd', decay_frac=0.2, **kw) == pytest.approx(1 - 0.9 * 11 / 22)
    assert lr_at(109, schedule='constant', **kw) == 1.0
    with pytest.raises(ValueError, match='valid: cosine, wsd, constant'):
        lr_at(50, schedule='linear', **kw)
    short = dict(lr=1.0, min_lr=0.1, warmup_iters=100, decay_iters=50)   # a warmup longer than the run
    assert lr_at(49, **short) == pytest.approx(50 / 101)
    assert lr_at(50, **short) == lr_at(99, **short) == lr_at(120, **short) == 0.1   # min_lr after it, as said


def test_the_logged_loss_parts_add_up_to_the_loss_over_every_micro_batch(tmp_path, byte_data):
    """With gradient accumulation the loss is the mean over the micro-batches, and so is each of
    its logged parts: lm + mtp_loss_weight * mtp + aux = loss at every step."""
    train(tmp_path, byte_data, 'acc', '--max_iters=4', '--log_interval=1', '--gradient_accumulation_steps=3',
          *MOE_MLA)
    steps = [r for r in map(json.loads, open(tmp_path / 'acc' / 'log.jsonl')) if 'train/loss' in r]
    weight = load_checkpoint(str(tmp_path / 'acc'))['model_config']['mtp_loss_weight']
    assert len(steps) == 4
    for r in steps:
        parts = r['train/lm_loss'] + weight * r['train/mtp_loss'] + r['train/aux_loss']
        assert parts == pytest.approx(r['train/loss'], rel=1e-5), r


def test_moe_training_logs_balance_and_mtp(tmp_path, byte_data):
    train(tmp_path, byte_data, 'moe', '--max_iters=10', *MOE_MLA)
    rows = [json.loads(line) for line in open(tmp_path / 'moe' / 'log.jsonl')]
    steps = [r for r in rows if 'train/loss' in r]
    assert all({'train/lm_loss', 'train/mtp_loss', 'train/aux_loss', 'moe/max_imbalance'} <= set(r)
               for r in steps)
    assert all(len(r['moe/imbalance']) == 2 and r['moe/max_imbalance'] >= 1 for r in steps)  # MoE + MTP layer
    ckpt = load_checkpoint(str(tmp_path / 'moe'))
    bias = ckpt['model']['layers.1.mlp.router.e_score_correction_bias']
    assert bias.abs().sum() > 0                                    # the balancing bias moved
    assert (tmp_path / 'moe' / 'expert_load.png').exists() or not _has_matplotlib()


def test_profile_writes_the_tables_of_two_steps_and_changes_nothing(tmp_path, byte_data):
    """--profile=FILE: torch.profiler over the 11th and 12th steps, its table appended to FILE; the
    run's losses are those of the run without it."""
    train(tmp_path, byte_data, 'plain', '--max_iters=14', *MOE_MLA)
    train(tmp_path, byte_data, 'prof', '--max_iters=14', f'--profile={tmp_path / "new" / "prof.txt"}', *MOE_MLA)
    text = (tmp_path / 'new' / 'prof.txt').read_text()     # (its folder made as needed)
    assert '=== pretrain: steps 10 and 11 ===' in text
    assert 'aten::mm' in text and 'Self CPU' in text
    assert losses(tmp_path / 'prof') == losses(tmp_path / 'plain')


def test_cuda_sync_check_is_refused_by_name_without_a_gpu(tmp_path, byte_data):
    proc = train(tmp_path, byte_data, 'out', '--max_iters=2', '--cuda_sync_check=True', check=False)
    assert proc.returncode != 0
    assert "cuda_sync_check=True needs a CUDA GPU (device is 'cpu')" in proc.stderr


def test_muonclip_logs_max_logits_and_clipped_heads(tmp_path, byte_data):
    train(tmp_path, byte_data, 'mc', '--max_iters=6', '--optimizer=muonclip', '--qk_clip_tau=0.01',
          '--learning_rate=0.01', *MOE_MLA)
    rows = [json.loads(line) for line in open(tmp_path / 'mc' / 'log.jsonl')]
    steps = [r for r in rows if 'train/loss' in r]
    assert all(len(r['attn/max_logit']) == 3 for r in steps)      # 2 layers + the MTP block
    assert steps[0]['qk_clip/clipped_heads'] == 3 * 2                # at first every head is over 0.01
    assert all(r['attn/max_logit_all'] < 1.0 for r in steps[1:])     # then they are held near tau
    assert (tmp_path / 'mc' / 'max_logit.png').exists() or not _has_matplotlib()
    p = train(tmp_path, byte_data, 'x', '--max_iters=1', '--optimizer=lion', check=False)
    assert "optimizer='lion'; valid: adamw, muon, muonclip" in p.stderr


def test_without_matplotlib_the_log_says_so_once_and_writes_no_png(tmp_path, monkeypatch, capsys):
    import sys
    import runlog
    monkeypatch.setitem(sys.modules, 'matplotlib', None)       # import matplotlib now fails
    monkeypatch.setattr(runlog, '_PYPLOT', [])
    log = runlog.RunLog(str(tmp_path))
    log.log(1, **{'train/loss': 1.0})
    assert log.plot() is None and log.plot() is None and not list(tmp_path.glob('*.png'))
    assert capsys.readouterr().err.count('matplotlib is not installed') == 1


def test_a_run_that_reads_its_data_many_times_over_is_told_so(tmp_path, byte_data):
    # 2 steps x 512 x 32 tokens over the ~8k of the test data: about 4 passes, no note; 12 steps:
    # about 24, a note naming the overfitting and what to change
    train_len = os.path.getsize(os.path.join(byte_data, 'train.bin')) // 2
    few = train(tmp_path, byte_data, 'few', '--max_iters=2', '--batch_size=512', '--eval_iters=1')
    many = train(tmp_path, byte_data, 'many', '--max_iters=12', '--batch_size=512', '--eval_iters=1')
    assert 2 * 512 * 32 / train_len < 20 < 12 * 512 * 32 / train_len
    assert 'overfitting' not in few.stderr
    assert f'read the {train_len:,} training tokens' in many.stderr and 'overfitting' in many.stderr


def test_a_gpu_sized_step_on_the_cpu_is_told_what_a_step_and_an_evaluation_cost(tmp_path, byte_data):
    """Over 1 TFLOP a step on the CPU (here by gradient accumulation; no step runs): a note with the
    minutes each evaluation will take, the first one before step 1."""
    p = train(tmp_path, byte_data, 'big', '--max_iters=0', '--batch_size=512', '--eval_iters=1',
              '--gradient_accumulation_steps=20000', check=False)
    assert 'sized for a GPU' in p.stderr and 'minutes for each evaluation (the first one before step 1)' in p.stderr


def test_a_log_line_cut_by_a_kill_is_skipped_when_a_resumed_run_reopens_the_log(tmp_path):
    import runlog
    log = runlog.RunLog(str(tmp_path))
    for step in (10, 20, 30):
        log.log(step, **{'train/loss': 1.0 / step})
    with open(log.path, 'a') as f:
        f.write('{"step": 40, "train/lo')                   # the process died mid-write
    resumed = runlog.RunLog(str(tmp_path), resume_step=20)
    assert [r['step'] for r in resumed.rows()] == [10, 20]


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_the_resume_logs_each_step_once(tmp_path, byte_data):
    """SIGINT mid-run: the step in flight finishes, the checkpoint is saved (atomically), the
    message names the command that resumes, the exit is clean (130, no traceback); the resumed run
    continues from that step and log.jsonl holds every step once."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), f'--data_dir={byte_data}', '--out_dir=run', *TINY_MODEL,
           '--max_iters=100000', '--eval_interval=100000']
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED='1'))
    log, started = tmp_path / 'run' / 'log.jsonl', time.time()
    while time.time() < started + 180 and not (log.exists() and len(log.read_text().splitlines()) >= 4):
        time.sleep(0.2)
    # step 0 was evaluated, but the curves are not redrawn within PLOT_EVERY_S of the run's start
    from training import PLOT_EVERY_S
    if time.time() - started < PLOT_EVERY_S:
        assert not (tmp_path / 'run' / 'loss.png').exists()
    signalled = time.time()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 130 and 'Traceback' not in err, err[-2000:]
    n = load_checkpoint(str(tmp_path / 'run'))['step']
    assert n >= 3 and f'stopped by Ctrl-C after step {n}' in err and '--init_from=resume' in err
    assert not list((tmp_path / 'run').glob('*.tmp'))
    # the loss curve is drawn on the way out too (during a run at most every training.PLOT_EVERY_S)
    assert not _has_matplotlib() or (tmp_path / 'run' / 'loss.png').stat().st_mtime >= signalled
    # resumed with step n an evaluation step: Ctrl-C saved before evaluating it, so it is evaluated now
    assert load_checkpoint(str(tmp_path / 'run'))['evaluated'] is False
    run_script('train.py', f'--data_dir={byte_data}', '--out_dir=run', *TINY_MODEL, f'--max_iters={n + 2}',
               f'--eval_interval={n}', '--init_from=resume', cwd=tmp_path)
    rows = [json.loads(line) for line in open(log)]
    assert [r['step'] for r in rows if 'train/loss' in r] == list(range(1, n + 3))
    assert [r['step'] for r in rows if 'val/loss' in r] == [0, n, n + 2]


def test_ctrl_c_during_an_evaluation_leaves_it_out(tmp_path, byte_data):
    """Ctrl-C in one process during an evaluation (on a CPU a large model's first one takes an hour)
    stops at once without it: at step 0 with nothing to save; at a later step with that step's
    checkpoint, which the resumed run evaluates first. A second Ctrl-C ends a run with one line."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO

    def interrupted(*args):
        p = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), f'--data_dir={byte_data}',
                              '--out_dir=run', *TINY_MODEL, *args, '--eval_iters=1000000'], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED='1'))
        for line in p.stdout:                  # the evaluation starts after this line
            if line.startswith('evaluating:'):
                break
        time.sleep(3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)            # (1,000,000 batches would take hours)
        assert p.returncode == 130 and 'Traceback' not in err, err[-2000:]
        assert 'Ctrl-C: leaving this evaluation out' in err
        return err

    err = interrupted('--max_iters=6', '--eval_interval=3')
    assert 'stopped by Ctrl-C after step 0: nothing to save (no step trained yet)' in err
    assert not (tmp_path / 'run' / 'ckpt.pt').exists()
    run_script('train.py', f'--data_dir={byte_data}', '--out_dir=run', *TINY_MODEL, '--max_iters=3',
               '--eval_interval=3', cwd=tmp_path)
    err = interrupted('--max_iters=6', '--eval_interval=6', '--init_from=resume')   # step 6's evaluation
    assert 'stopped by Ctrl-C after step 6: checkpoint of step 6' in err and '--init_from=resume' in err
    ckpt = load_checkpoint(str(tmp_path / 'run'))
    assert ckpt['step'] == 6 and ckpt['evaluated'] is False
    # the hook a Run installs: a second Ctrl-C (KeyboardInterrupt) prints one line, not a traceback
    code = 'import sys, training; sys.excepthook = training.quiet_second_ctrl_c; raise KeyboardInterrupt'
    p = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
    assert p.stderr.strip() == 'stopped at once by a second Ctrl-C: nothing saved'


def test_the_resume_command_keeps_the_launcher():
    """After Ctrl-C: the run's own arguments with --init_from=resume (any other init_from dropped),
    under torchrun with the same number of processes where it ran there."""
    from training import resume_command
    argv = ['train.py', 'config/x.py', '--init_from=out/base', '--max_iters=9']
    assert resume_command(argv) == 'python train.py config/x.py --max_iters=9 --init_from=resume'
    assert resume_command(argv, 4) == ('torchrun --standalone --nproc_per_node=4 train.py config/x.py '
                                       '--max_iters=9 --init_from=resume')
    # config.py takes --key value too: the init_from's value goes with it
    argv = ['train.py', 'config/x.py', '--init_from', 'out/base', '--max_iters', '9']
    assert resume_command(argv) == 'python train.py config/x.py --max_iters 9 --init_from=resume'


def test_settings_no_loop_can_use_are_refused_by_name_before_any_work(tmp_path, byte_data):
    from training import check_loop_settings
    good = {'eval_interval': 5, 'log_interval': 1, 'eval_iters': 2, 'batch_size': 4, 'gradient_accumulation_steps': 1,
            'max_iters': 0, 'warmup_iters': 0, 'grad_clip': 0.0, 'learning_rate': 1e-3, 'min_lr': 1e-4,
            'weight_decay': 0.0, 'decay_frac': 0.2, 'lr_schedule': 'wsd', 'optimizer': 'muon',
            'compile_mode': 'default'}
    check_loop_settings(good)
    check_loop_settings({})                        # a stage without these keys
    # min_lr above learning_rate: a note (a constant schedule never reads min_lr; lr 0 freezes the weights)
    check_loop_settings({**good, 'min_lr': 1e-2, 'lr_schedule': 'constant'})
    check_loop_settings({**good, 'min_lr': 1e-2, 'learning_rate': 0.0})
    check_loop_settings({**good, 'min_lr': 1e-2})                        # (said by Run, once: below)
    for key, value, says in [
            ('eval_interval', 0, 'eval_interval=0 must be 1 or more'), ('log_interval', 0, 'log_interval=0 must'),
            ('eval_iters', 0, 'eval_iters=0 must be 1 or more'), ('batch_size', 0, 'batch_size=0 must'),
            ('gradient_accumulation_steps', 0, 'gradient_accumulation_steps=0 must be 1 or more'),
            ('max_iters', -1, 'max_iters=-1 must be 0 or more'), ('grad_clip', -1.0, 'grad_clip=-1.0 must be 0'),
            ('warmup_iters', -5, 'warmup_iters=-5 must be 0 or more'), ('decay_frac', 1.5, 'decay_frac=1.5 must be'),
            ('optimizer', 'sgd', "optimizer='sgd'; valid: adamw, muon, muonclip"),
            ('lr_schedule', 'linear', "lr_schedule='linear'; valid: cosine, wsd, constant"),
            ('compile_mode', 'fast', "compile_mode='fast'; valid: default")]:
        with pytest.raises(SystemExit) as e:
            check_loop_settings({**good, key: value})
        assert says in str(e.value), (key, str(e.value))
    # the stages call it before reading data or a model (gradient accumulation 0 trained nothing and saved)
    accum, = run_script_many('train.py', [train_args(byte_data, 'x', '--max_iters=3',
                                                     '--gradient_accumulation_steps=0')], cwd=tmp_path)
    assert accum.returncode and 'gradient_accumulation_steps=0 must be 1 or more' in accum.stderr
    assert not (tmp_path / 'x').exists()


def test_ctrl_c_keeps_the_best_checkpoint_where_only_the_best_is_kept(tmp_path, byte_data):
    """With always_save_checkpoint=False ckpt.pt holds the best val loss: Ctrl-C leaves it there (the
    interrupted state, never evaluated, would replace it) and says which step the resume continues from."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), f'--data_dir={byte_data}', '--out_dir=run', *TINY_MODEL,
           '--max_iters=100000', '--eval_interval=3', '--always_save_checkpoint=False', '--learning_rate=3e-3']
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED='1'))
    log, started = tmp_path / 'run' / 'log.jsonl', time.time()
    while time.time() < started + 180 and not (log.exists() and len(log.read_text().splitlines()) >= 12):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 130 and 'Traceback' not in err, err[-2000:]
    ckpt = load_checkpoint(str(tmp_path / 'run'))
    rows = [json.loads(line) for line in open(log)]
    val = {r['step']: r['val/loss'] for r in rows if 'val/loss' in r and r['step'] > 0}
    assert ckpt['evaluated'] is not False and ckpt['step'] == min(val, key=val.get), (ckpt['step'], val)
    assert f"keeps the best val loss (always_save_checkpoint=False), of step {ckpt['step']}" in err, err[-1000:]
    assert '--init_from=resume' in err


def test_ctrl_c_s_checkpoint_rule():
    """Run.save_at_stop: the interrupted state is saved unless ckpt.pt keeps the best val loss of this
    run (or of the run it resumes); a stage whose evaluations have no val loss (PPO, GRPO: best_val_loss
    stays inf) saves it whatever always_save_checkpoint says."""
    from types import SimpleNamespace
    from training import Run

    def saved(always, best, saved_step, resumed_at=None, step=14):
        c = {'eval_only': False, 'save_checkpoints': True, 'always_save_checkpoint': always}
        calls = []
        run = SimpleNamespace(c=c, best_val_loss=best, saved_step=saved_step, resumed_at=resumed_at,
                              save=lambda step, metrics, evaluated: calls.append((step, evaluated)))
        Run.save_at_stop(run, step)
        return calls
    assert saved(True, 3.0, 10) == [(14, False)]
    assert saved(False, 3.0, 10) == [] and saved(False, 3.0, None, resumed_at=8) == []
    assert saved(False, 3.0, None) == [(14, False)]            # nothing of this run's saved yet
    assert saved(False, float('inf'), 10) == [(14, False)]     # PPO / GRPO: no val loss to keep
    assert saved(True, 3.0, 14) == []                          # this step is saved already


def test_an_evaluation_only_run_leaves_the_folder_s_log_as_it_is(tmp_path, byte_data):
    train(tmp_path, byte_data, 'run', '--max_iters=3', '--eval_interval=3')
    before = (tmp_path / 'run' / 'log.jsonl').read_text()
    p = train(tmp_path, byte_data, 'run', '--init_from=resume', '--eval_only=True')
    assert 'step 3: val/loss' in p.stdout
    assert (tmp_path / 'run' / 'log.jsonl').read_text() == before


def test_a_missing_dataset_is_made_by_its_prepare_command(tmp_path):
    """data/<dataset> missing: train.py runs the prepare script the config names, with its flags
    (config/tinystories_cpu.py does this for its BPE-4096 data), then trains on what it wrote."""
    from conftest import shared_file
    src = shared_file('shakespeare', 'input.txt')
    p = run_script('train.py', '--dataset=chars', f'--prepare=shakespeare_char.py --source={src}', '--out_dir=run',
                   *TINY_MODEL, '--max_iters=2', '--eval_interval=2', cwd=tmp_path)
    assert 'data/chars is missing; preparing it: ' in p.stdout and 'done: 2 steps' in p.stdout
    assert json.load(open(tmp_path / 'data' / 'chars' / 'meta.json'))['vocab_size'] == 66


def test_mfu_is_reported_only_against_a_meaningful_peak(tmp_path, byte_data):
    """On a CPU no peak is measured (a matmul there says little about the hardware): no MFU unless
    peak_flops is given."""
    p = train(tmp_path, byte_data, 'run', '--max_iters=2', '--peak_flops=0.0')
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'log.jsonl')]
    assert 'MFU' not in p.stdout and not any('mfu' in r for r in rows) and any('tokens_per_sec' in r for r in rows)


def test_measuring_the_peak_flops_leaves_the_random_stream_alone():
    """train.py measures the peak once it has restored a resumed run's random state: the measuring
    matmul's operands come from a generator of their own."""
    import runtime
    runtime._PEAK_CACHE.clear()
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    assert runtime.measure_peak_flops('cpu', 'float32') > 0
    assert torch.equal(torch.rand(3), want)


def test_progress_bars_write_to_a_log_file_every_30_seconds(monkeypatch):
    """runlog.progress: where stderr is not a terminal (a speedrun log) the bar stays on (instead of
    tqdm's disable=None turning it off there) and writes whole lines, every 30 s and at the end:
    no carriage returns, nothing cleared or redrawn around a print above it."""
    import io
    from runlog import PrintsAboveBar, progress
    import tqdm
    log = io.StringIO()
    monkeypatch.setattr(tqdm.tqdm, 'monitor', None)    # as if no bar had started tqdm's monitor thread yet
    bar = progress(total=3, desc='steps', file=log)        # pytest captures stderr: not a terminal
    assert not bar.disable and bar.mininterval == 30
    assert type(bar).monitor is None         # no tqdm monitor thread writing lines between the 30 s ones
    out = PrintsAboveBar(bar, log)
    bar.update(1)
    out.write('step 1: val/loss 2.0\n')
    bar.update(2)
    bar.refresh()                    # the line at 3/3; a redraw at the same count and the close
    bar.refresh()                    # write nothing more
    bar.close()
    lines = log.getvalue().split('\n')
    assert '\r' not in log.getvalue() and lines[-1] == '', lines
    assert [line.split('|')[0] for line in lines[:-1]] == ['steps:   0%', 'step 1: val/loss 2.0', 'steps: 100%'], lines
    assert '3/3' in lines[2]


def test_the_moe_study_compares_at_equal_active_and_equal_total_parameters():
    import runpy
    import torch
    from model import GPT, ModelConfig
    cfg = {k: v for k, v in runpy.run_path(os.path.join(REPO, 'config', 'tinystories_moe.py')).items()
           if k in ModelConfig.__dataclass_fields__}
    study = runpy.run_path(os.path.join(REPO, 'config', 'ablations', 'moe.py'))
    counts = {}
    for name in ('moe64_shared', 'dense_equal_active', 'dense_equal_total'):
        with torch.device('meta'):
            m = GPT(ModelConfig(**{**cfg, 'vocab_size': 50304, **study['variants'][name]}))
        counts[name] = (m.num_params() - m.mtp_params(), m.active_params())
    total, active = counts['moe64_shared']
    assert abs(counts['dense_equal_total'][0] / total - 1) < 0.001, counts       # within 0.1% in total
    assert abs(counts['dense_equal_active'][1] / active - 1) < 0.02, counts      # within 2% active


def test_eval_py_s_val_loss_is_train_py_s_though_the_chat_tokens_grow_the_vocabulary(tmp_path, byte_data):
    # a model of exactly 257 rows: eval.py's load_chat_model adds the 3 chat tokens and grows it to
    # 320, new rows at zero logits; the val loss must still be the one over the trained vocabulary
    train(tmp_path, byte_data, 'v257', '--max_iters=6', '--eval_interval=6', '--vocab_size=257')
    rows = [json.loads(line) for line in (tmp_path / 'v257' / 'log.jsonl').read_text().splitlines()]
    trained = [r for r in rows if 'val/loss' in r][-1]['val/loss']
    run_script('eval.py', '--out_dir=v257', '--n_prompts=0', '--eval_iters=2', '--batch_size=4', '--block_size=32',
               '--device=cpu', f'--data_dir={byte_data}', cwd=tmp_path)
    ev = json.loads((tmp_path / 'v257' / 'eval.json').read_text())
    assert ev['val/loss'] == pytest.approx(trained, abs=1e-5)
    # and its bits per byte are train.py's (whose formula a test above checks): bits per token passed
    # the other checks, the byte data having about one byte a token
    trained_bpb = [r for r in rows if 'val/bpb' in r][-1]['val/bpb']
    assert ev['val/bpb'] == pytest.approx(trained_bpb, abs=1e-5) and ev['val/bpb'] != pytest.approx(
        ev['val/loss'] / math.log(2), abs=1e-4)


def test_batches_are_a_function_of_seed_step_and_micro_batch(byte_data):
    """data.batch_generator: the same (seed, step, index) draws the same batch (what exact resume
    rests on), and another step, micro-batch or seed another batch (without the step's term every
    step trained on the same batches, and the resume tests still passed)."""
    from data import TokenData, batch_generator
    data = TokenData(str(byte_data))
    draw = lambda seed, step, index: data.batch('train', 4, 32, batch_generator(seed, step, index), 'cpu')[0]  # noqa
    assert torch.equal(draw(1, 5, 0), draw(1, 5, 0))
    for other in ((1, 6, 0), (1, 5, 1), (2, 5, 0)):
        assert not torch.equal(draw(1, 5, 0), draw(*other)), other



def test_every_seed_is_evaluated_on_the_same_batches(tmp_path, byte_data):
    """A run's seed picks its initialization and its training batches, not its evaluation batches:
    the same model evaluated under two seeds gets the same val loss (in eval.py, and in train.py,
    whose evaluations eval.py's match), so a study's spread over seeds is the models' own."""
    train(tmp_path, byte_data, 'm', '--max_iters=4', '--eval_interval=4', '--seed=2')
    rows = [json.loads(line) for line in (tmp_path / 'm' / 'log.jsonl').read_text().splitlines()]
    losses = [[r for r in rows if 'val/loss' in r][-1]['val/loss']]      # train.py's own, under seed 2
    for seed in (1, 3):
        run_script('eval.py', '--out_dir=m', '--n_prompts=0', '--eval_iters=2', '--batch_size=4', '--block_size=32',
                   '--device=cpu', f'--data_dir={byte_data}', f'--seed={seed}', cwd=tmp_path)
        losses.append(json.loads((tmp_path / 'm' / 'eval.json').read_text())['val/loss'])
    assert losses[1] == losses[2] and losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_a_run_too_short_for_its_warmup_or_its_log_interval_says_so(tmp_path, byte_data):
    """A few-step trial run with the defaults would train at a fraction of its learning rate and
    log no training line; both are said at the start (and nothing when the settings fit)."""
    short, logless, fitting = run_script_many('train.py', [
        [f'--data_dir={byte_data}', '--out_dir=a', *TINY_MODEL, '--max_iters=2', '--eval_interval=2'],
        [f'--data_dir={byte_data}', '--out_dir=b', *TINY_MODEL, '--max_iters=2', '--eval_interval=2',
         '--warmup_iters=0', '--log_interval=5', '--min_lr=1e-2'],
        [f'--data_dir={byte_data}', '--out_dir=c', *TINY_MODEL, '--max_iters=2', '--eval_interval=2',
         '--warmup_iters=1']], cwd=tmp_path)
    assert 'note: warmup_iters=100 >= max_iters=2: the learning rate stays in its warm-up' in short.stdout
    assert f"data: {byte_data} (data_dir is given, so dataset='tinystories' and prepare= are not read)" in short.stdout
    assert 'note: log_interval' not in short.stdout                       # TINY_MODEL logs every step
    assert 'note: log_interval=5 > max_iters=2: no training line will be logged' in logless.stdout
    assert 'warmup_iters=0 >=' not in logless.stdout and 'note: warmup' not in fitting.stdout
    assert logless.stderr.count('note: min_lr=0.01 is above learning_rate=0.0006: the rate rises') == 1
    assert 'note: min_lr' not in fitting.stderr


def test_plot_runs_compares_a_metric_of_several_runs(tmp_path):
    """plot_runs.py: a table of each run's metric (at the end, lowest, highest) and a PNG; a key no
    run has is refused with the keys the runs do have (a stage's own scalars are train/<name>)."""
    # a NaN (a diverged step) is no value of the curve: it made the table's lowest and highest nan
    for name, losses in (('a', [3.0, 2.0, 2.5]), ('b', [3.0, 1.5, 1.8, float('nan')])):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'log.jsonl').write_text(''.join(
            json.dumps({'step': 10 * i, 'time': 0.0, 'train/policy_loss': x}) + '\n' for i, x in enumerate(losses)))
    p = run_script('plot_runs.py', '--runs=a,b', '--key=train/policy_loss', '--out=c.png', '--xlabel=rollout',
                   cwd=tmp_path)
    assert '| a | 2.5000 | 2.0000 | 3.0000 | 10 |' in p.stdout and '| b | 1.8000 | 1.5000 | 3.0000 | 10 |' in p.stdout
    pytest.importorskip('matplotlib')
    assert (tmp_path / 'c.png').stat().st_size > 1000
    bad = run_script('plot_runs.py', '--runs=a,b', '--key=policy_loss', cwd=tmp_path, check=False)
    assert bad.returncode and "no run has 'policy_loss'; keys they have: train/policy_loss" in bad.stderr


def test_a_checkpoint_that_weights_only_refuses_or_without_a_tokenizer_is_explained(tmp_path):
    """A whole checkpoint holding a numpy scalar (other code's save) is not called damaged, nor
    is its deletion advised; one without a tokenizer (an import without tokenizer_from=) says how
    to import it again instead of an AttributeError in the tokenizer."""
    import numpy as np
    from checkpoint import save_checkpoint
    from model import GPT, ModelConfig
    os.makedirs(tmp_path / 'np')
    torch.save({'model': {}, 'metrics': {'loss': np.float64(1.0)}}, tmp_path / 'np' / 'ckpt.pt')
    with pytest.raises(SystemExit) as e:
        load_checkpoint(str(tmp_path / 'np'))
    assert 'holds objects that torch.load(weights_only=True) refuses to unpickle (numpy' in str(e.value)
    assert 'damaged' not in str(e.value) and 'delete' not in str(e.value) and '\x1b' not in str(e.value)
    model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16))
    save_checkpoint(str(tmp_path / 'imp'), {'model': model.state_dict(), 'model_config': model.config.to_dict(),
                                            'tokenizer': None, 'stage': 'import', 'config': {}})
    with pytest.raises(SystemExit, match='holds no tokenizer; import it again with convert_hf.py --direction=import '
                                         '--tokenizer_from='):
        load_model(str(tmp_path / 'imp'))


def test_the_loop_clips_the_gradient(tmp_path, byte_data):
    """grad_clip in the training loop (clip_grad_norm_ is tested on its own; a loop that never clipped
    passed every other test): clipped to a norm of 1e-12 the gradient sits far under AdamW's eps (1e-8), so
    the first step barely moves the weights, where the unclipped one moves them by about the rate."""
    from conftest import run_script_many
    run_script_many('train.py', [train_args(byte_data, name, '--max_iters=1', '--eval_interval=1', '--weight_decay=0',
                                            *extra)
                                 for name, extra in (('init', ['--learning_rate=0', '--min_lr=0']),
                                                     ('clipped', ['--grad_clip=1e-12']), ('free', ['--grad_clip=0']))],
                    cwd=tmp_path)
    w = {name: torch.load(tmp_path / name / 'ckpt.pt', weights_only=True)['model']
         for name in ('init', 'clipped', 'free')}
    moved = {name: max((w[name][k].float() - w['init'][k].float()).abs().max().item() for k in w['init'])
             for name in ('clipped', 'free')}
    assert moved['free'] > 1e-4 and moved['clipped'] < 1e-2 * moved['free'], moved


def test_ctrl_c_before_a_training_loop_ends_in_one_line(tmp_path):
    """A Ctrl-C in a stage's set-up (loading, DPO's reference pass, sampling), before Run handles
    it, ends the script with one line and death by SIGINT, not a traceback."""
    import signal
    import subprocess
    import sys
    from conftest import REPO
    code = ('import os, signal, sys, time\n'
            f'sys.path.insert(0, {REPO!r})\n'
            'from runtime import init_runtime\n'
            "init_runtime('cpu')\n"
            'os.kill(os.getpid(), signal.SIGINT)\n'
            'time.sleep(30)\n')
    p = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGINT and p.stderr.strip() == 'stopped by Ctrl-C', p.stderr   # (a shell: 130)
