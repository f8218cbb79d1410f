"""Expert parallelism (parallel.py) on the CPU over gloo, 2 and 4 spawned ranks: a global batch
split over the ranks gives the loss, every gradient and the router-bias update of one process
on the whole batch; the gathered state dict is the single-process model's and loads back into
the shards; a rank that receives no tokens still joins both exchanges."""

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason='needs torch.distributed with the gloo backend')

CONFIG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, attention='mla', pos_emb='rope',
              norm='rmsnorm', mlp='swiglu', bias=False, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
              moe_intermediate_size=16, scoring_func='sigmoid', routed_scaling_factor=2.5, n_group=2, topk_group=2,
              first_k_dense_replace=1, bias_update_speed=0.01, aux_loss_alpha=0.001, mtp_depth=1)
B_LOCAL, T = 2, 16            # sequences per rank, tokens per sequence


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)                   # the ranks share the CPU cores
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    from model import GPT, ModelConfig
    from parallel import (clip_grad_norm, expert_parameter_names, full_state_dict, load_full_state_dict,
                          shard_experts, sync_gradients, update_router_bias)
    cfg = ModelConfig(**CONFIG)
    out = {}
    torch.manual_seed(0)
    ref = GPT(cfg)                             # the single-process model, on the global batch
    ep = shard_experts(copy.deepcopy(ref))     # this rank's experts only
    experts = set(expert_parameter_names(ep))
    E_local = cfg.n_routed_experts // world
    lo = rank * E_local
    assert len(ep.moe_layers()) == 2 and all(p.shape[0] == E_local for n, p in ep.named_parameters() if n in experts)

    def compare_step(tag, seed):
        """One forward/backward: the loss (mean over ranks) and every gradient against ref's."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, cfg.vocab_size, (B_LOCAL * world, T), generator=g)
        tgt = torch.randint(0, cfg.vocab_size, (B_LOCAL * world, T), generator=g)
        mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for m in (ref, ep):
            m.train()
            m.zero_grad(set_to_none=True)
        loss_ref = ref(idx, tgt)[1]
        loss_ref.backward()
        loss = ep(idx[mine], tgt[mine])[1]
        loss.backward()
        sync_gradients(ep)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        out[f'{tag}/loss'] = abs(mean_loss.item() / world - loss_ref.item())
        ref_params = dict(ref.named_parameters())
        worst = 0.0
        for name, p in ep.named_parameters():
            want = ref_params[name].grad
            if name in experts:
                want = want[lo:lo + E_local]           # this rank owns these experts' gradients
            worst = max(worst, max_diff(p.grad, want))
        out[f'{tag}/grad'] = worst
        out[f'{tag}/grad_scale'] = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)

    # (a) loss and gradients
    compare_step('a', seed=1)
    # (b) the router-bias update: loads summed over ranks, the same step as one process
    loads_ref = ref.update_router_bias()
    loads = update_router_bias(ep)
    out['b/loads'] = max_diff(loads, loads_ref)
    out['b/moved'] = sum(m.router.e_score_correction_bias.abs().sum().item() for m in ref.moe_layers())
    out['b/bias'] = max(max_diff(a.router.e_score_correction_bias, b.router.e_score_correction_bias)
                        for a, b in zip(ref.moe_layers(), ep.moe_layers()))
    # an SGD step on both, so that the checkpoint below holds trained weights
    with torch.no_grad():
        for p, q in zip(ref.parameters(), ep.parameters()):
            p -= 0.5 * p.grad
            q -= 0.5 * q.grad
    # a skewed router: every token chooses rank 0's experts, the other ranks receive nothing
    for m in (ref, ep):
        for layer in m.moe_layers():
            layer.router.e_score_correction_bias[:E_local] += 100.0
    compare_step('skewed', seed=2)
    out['skewed/other_load'] = sum(layer.tokens_per_expert[E_local:].sum().item() for layer in ep.moe_layers())
    for m in (ref, ep):
        for layer in m.moe_layers():
            layer.router.e_score_correction_bias[:E_local] -= 100.0
            layer.tokens_per_expert.zero_()
    # a few AdamW steps with gradient clipping and the bias update: the same trajectory
    # (eps 1e-6: Adam's g / sqrt(v) would turn float rounding of near-zero gradients into lr-sized steps)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, eps=1e-6) for m in (ref, ep)]
    for step in range(3):
        compare_step(f'adamw{step}', seed=10 + step)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        norm = clip_grad_norm(ep, 0.05)
        out[f'adamw{step}/norm'] = abs(norm.item() - norm_ref.item())
        out[f'adamw{step}/clipped'] = norm_ref.item() > 0.05
        for opt in opts:
            opt.step()
        ref.update_router_bias()
        update_router_bias(ep)
    ref_params = dict(ref.named_parameters())
    out['adamw/weights'] = max(max_diff(p, ref_params[n][lo:lo + E_local] if n in experts else ref_params[n])
                               for n, p in ep.named_parameters())
    # (c) the gathered state dict is the single-process one, and loads back into fresh shards
    full = full_state_dict(ep)
    want = ref.state_dict()
    out['c/keys'] = sorted(full) == sorted(want)
    out['c/state'] = max(max_diff(full[k], want[k]) for k in want)
    if rank == 0:
        path = os.path.join(out_dir, 'full.pt')
        torch.save(full, path)
        one = GPT(cfg)
        one.load_state_dict(torch.load(path))       # a plain single-process GPT takes it, strictly
    torch.manual_seed(123)                          # different weights, then the loaded ones
    fresh = shard_experts(GPT(cfg))
    load_full_state_dict(fresh, full)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, cfg.vocab_size, (B_LOCAL * world, T), generator=g)
    ref.eval()
    fresh.eval()
    with torch.no_grad():
        logits_ref = ref(idx)[0]
        logits = fresh(idx[rank * B_LOCAL:(rank + 1) * B_LOCAL])[0]
    out['c/logits'] = max_diff(logits, logits_ref[rank * B_LOCAL:(rank + 1) * B_LOCAL])
    # routed experts not divisible by the ranks: a clear error, before any exchange
    if 6 % world:
        try:
            shard_experts(GPT(ModelConfig(**dict(CONFIG, n_routed_experts=6, n_group=1, topk_group=1))))
            out['error'] = ''
        except ValueError as e:
            out['error'] = str(e)
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(out, f)
    dist.barrier()                                  # leave together (runtime.close_runtime: a rank that
    dist.destroy_process_group()                    # tears gloo down alone can abort the other)


@pytest.fixture(scope='module', params=[2, 4])
def results(request, tmp_path_factory):
    world = request.param
    d = tmp_path_factory.mktemp(f'ep{world}')
    mp.spawn(worker, args=(world, str(d / 'init'), str(d)), nprocs=world, join=True)
    return world, [json.load(open(d / f'rank{r}.json')) for r in range(world)]


def test_loss_and_gradients_equal_one_process(results):
    world, ranks = results
    for r in ranks:
        for tag in ('a', 'skewed'):
            assert r[f'{tag}/loss'] < 1e-5, (world, tag, r)
            assert r[f'{tag}/grad'] < 1e-5 * max(1.0, r[f'{tag}/grad_scale']), (world, tag, r)
        assert r['skewed/other_load'] == 0          # ranks 1.. received no tokens, yet took part


def test_clipped_adamw_steps_follow_one_process(results):
    world, ranks = results
    for r in ranks:
        for step in range(3):
            assert r[f'adamw{step}/loss'] < 1e-5 and r[f'adamw{step}/norm'] < 1e-5, (world, step, r)
            assert r[f'adamw{step}/clipped']
        assert r['adamw/weights'] < 1e-5, (world, r)


def test_router_bias_update_equals_one_process(results):
    world, ranks = results
    for r in ranks:
        assert r['b/moved'] > 0                          # the biases did move
        assert r['b/loads'] == 0 and r['b/bias'] == 0, (world, r)


def test_full_state_dict_loads_in_one_process_and_back_into_shards(results):
    world, ranks = results
    for r in ranks:
        assert r['c/keys'] and r['c/state'] < 1e-5, (world, r)
        assert r['c/logits'] < 1e-5, (world, r)
        if world == 4:
            assert 'divisible by 4' in r['error']


# --- train.py --expert_parallel=N under torchrun ------------------------------------------------

def test_train_py_under_expert_parallelism_equals_one_process(tmp_path, byte_data):
    """train.py --expert_parallel=2 on 2 ranks (no DDP wrapper; training.Run syncs the replicated
    gradients, clips the global norm, sums the expert loads) is the run of one process with twice
    the accumulation. Its checkpoint holds the full expert stacks and their optimizer state (the
    single-process layout: sample.py loads it), a run split by a resume under expert parallelism
    equals the straight run, and one process resumes it."""
    from checkpoint import load_checkpoint
    from conftest import run_script
    from test_distributed import max_difference, torchrun, train_args
    from test_train import losses
    n = ['--max_iters=4', '--eval_interval=2']
    run_script(*train_args(byte_data, 'one', *n, '--gradient_accumulation_steps=2'), cwd=tmp_path)
    p = torchrun(*train_args(byte_data, 'ep', *n, '--expert_parallel=2'), cwd=tmp_path)
    assert 'expert parallelism: each of 2 ranks holds 4 of the 8 routed experts of each of 2 MoE layers' in p.stdout
    one, ep = load_checkpoint(str(tmp_path / 'one')), load_checkpoint(str(tmp_path / 'ep'))
    stacks = [k for k in one['model'] if '.experts.' in k]
    assert stacks and all(ep['model'][k].shape == one['model'][k].shape and one['model'][k].shape[0] == 8
                          for k in stacks)                               # all 8 experts, gathered
    assert max_difference(one['model'], ep['model']) < 1e-5
    biases = [k for k in one['model'] if k.endswith('e_score_correction_bias')]
    assert biases and all(torch.equal(one['model'][k], ep['model'][k]) for k in biases)
    a, b = losses(tmp_path / 'one'), losses(tmp_path / 'ep')
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    fingerprints = ep['replica_fingerprints']                             # the replicated part agrees
    assert len(fingerprints) == 2 and torch.equal(fingerprints[0], fingerprints[1])
    so, se = one['optimizer']['state'], ep['optimizer']['state']         # AdamW moments, all experts
    assert sorted(so) == sorted(se)
    for i in so:
        for k, v in so[i].items():
            assert se[i][k].shape == v.shape, (i, k)
            torch.testing.assert_close(se[i][k].float(), v.float(), rtol=1e-4, atol=1e-8)
    p = run_script('sample.py', '--out_dir=ep', '--max_new_tokens=8', '--num_samples=1', '--device=cpu',
                   cwd=tmp_path)
    assert 'pretrain checkpoint at step 4' in p.stderr
    # a resumed run under expert parallelism continues exactly
    torchrun(*train_args(byte_data, 'split', '--max_iters=2', '--eval_interval=2', '--expert_parallel=2'),
             cwd=tmp_path)
    torchrun(*train_args(byte_data, 'split', *n, '--init_from=resume', '--expert_parallel=2'), cwd=tmp_path)
    split = load_checkpoint(str(tmp_path / 'split'))
    assert losses(tmp_path / 'split') == b
    assert all(torch.equal(split['model'][k], ep['model'][k]) for k in ep['model'])
    # ... and one process continues the expert-parallel checkpoint
    run_script(*train_args(byte_data, 'split', '--max_iters=5', '--eval_interval=5', '--init_from=resume',
                           '--gradient_accumulation_steps=2'), cwd=tmp_path)
    assert load_checkpoint(str(tmp_path / 'split'))['step'] == 5


def test_expert_parallel_refusals(tmp_path, byte_data):
    from conftest import run_script
    from test_distributed import torchrun, train_args
    p = run_script(*train_args(byte_data, 'x', '--max_iters=1', '--expert_parallel=2', '--dtype=float16'),
                   cwd=tmp_path, check=False)
    assert p.returncode != 0 and 'expert_parallel=2 splits the routed experts across processes started by ' \
                                 'torchrun' in p.stderr
    assert "expert_parallel trains in bfloat16 or float32" in p.stderr     # each rank's own loss scale
    p = torchrun(*train_args(byte_data, 'x', '--max_iters=1', '--expert_parallel=4'), cwd=tmp_path, check=False)
    assert p.returncode != 0 and 'expert_parallel=4 must equal the number of processes (2)' in p.stderr
    p = torchrun(*train_args(byte_data, 'x', '--max_iters=1', '--expert_parallel=2', '--n_routed_experts=3'),
                 cwd=tmp_path, check=False)
    assert p.returncode != 0 and 'needs the routed experts (3) divisible by 2' in p.stderr
