"""experiments/long_context.py: a RoPE model evaluated past its training length with each scaling;
within the trained length the unscaled model's losses are exactly those of the model as trained."""

import json

import torch
import torch.nn.functional as F

from checkpoint import load_model
from conftest import TINY_MODEL, run_script, run_script_many
from data import TokenData

ROPE = ['--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu', '--bias=False']


def test_losses_by_position_with_every_scaling(tmp_path, byte_data):
    run_script('train.py', '--data_dir=data', '--out_dir=run', *TINY_MODEL, *ROPE, '--max_iters=20',
               '--eval_interval=20', '--learning_rate=3e-3', '--warmup_iters=2', cwd=tmp_path)
    p = run_script('experiments/long_context.py', '--out_dir=run', '--factors=2,4', '--batches=2', '--batch_size=2',
                   '--device=cpu', cwd=tmp_path)
    assert '| 0-15 (trained) |' in p.stdout and '| 112-127 |' in p.stdout
    assert '| 2x (64 tokens) | none | linear | dynamic | yarn |\n| --- | --- | --- | --- | --- |' in p.stdout
    res = json.load(open(tmp_path / 'run' / 'long_context.json'))
    assert res['block_size'] == 32 and res['bucket'] == 16
    assert sorted(res['losses']) == sorted(f'{f}x_{s}' for f in (2, 4) for s in ('none', 'linear', 'dynamic', 'yarn'))
    assert all(len(v) == (4 if k.startswith('2x') else 8) for k, v in res['losses'].items())
    assert all(0 < x < 20 for v in res['losses'].values() for x in v)
    # positions < 32 attend only to positions < 32: unscaled, they are the trained model's own losses
    model, _, _ = load_model(str(tmp_path / 'run'))
    model.eval()
    data = TokenData(str(tmp_path / 'data'))
    for f in (2, 4):
        g = torch.Generator().manual_seed(1337 + f)
        windows = [data.batch('val', 2, 32 * f, g) for _ in range(2)]
        with torch.no_grad():
            ce = sum(F.cross_entropy(model(x[:, :32])[0].transpose(1, 2), y[:, :32], reduction='none').sum(0)
                     for x, y in windows) / 4
        expected = ce.view(2, 16).mean(1).tolist()
        assert all(abs(a - b) < 1e-5 for a, b in zip(res['losses'][f'{f}x_none'][:2], expected))
        # dynamic NTK scales by the length generated so far: none inside the trained length
        assert all(abs(a - b) < 1e-5 for a, b in zip(res['losses'][f'{f}x_dynamic'][:2], expected))
        assert res['losses'][f'{f}x_dynamic'][2:] != res['losses'][f'{f}x_none'][2:]
        for s in ('linear', 'yarn'):                     # these scale every position (a tiny model cares little)
            assert abs(res['losses'][f'{f}x_{s}'][0] - expected[0]) > 1e-7, s


def test_learned_positions_are_refused(tmp_path, byte_data):
    run_script('train.py', '--data_dir=data', '--out_dir=learned', *TINY_MODEL, '--max_iters=1', cwd=tmp_path)
    learned, ntk = run_script_many('experiments/long_context.py', [
        ['--out_dir=learned', '--device=cpu'], ['--out_dir=learned', '--scalings=ntk', '--device=cpu']], cwd=tmp_path)
    assert learned.returncode != 0 and "pos_emb is 'learned': only RoPE positions extend" in learned.stderr
    assert ntk.returncode != 0 and "scalings='ntk'; valid: none, linear, dynamic, yarn" in ntk.stderr
