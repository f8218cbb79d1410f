"""rl.py's pieces against hand-computed values, and ppo.py / grpo.py learning a toy reward."""

import contextlib
import json
import math

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from conftest import run_script, run_scripts
from model import GPT, ModelConfig
from rl import (AdaptiveKL, Rewards, RunningMoments, clipped_policy_loss, clipped_value_loss,
                explained_variance, gae, group_advantages, kl_k3, per_token_rewards, sample_rollout,
                whiten)
from tokenizer import ByteTokenizer, with_chat_tokens


def test_gae_by_hand():
    # one response of 3 tokens after a 2-column prompt, rewards [0, 0, 1], values [.5, .6, .7]
    mask = torch.tensor([[False, False, True, True, True, False]])
    r = torch.tensor([[0, 0, 0.0, 0.0, 1.0, 0]])
    v = torch.tensor([[0, 0, 0.5, 0.6, 0.7, 0]])
    adv, ret = gae(r, v, mask, gamma=1.0, lam=0.95)
    # delta = [0 + .6 - .5, 0 + .7 - .6, 1 - .7] = [.1, .1, .3]; A2 = .3, A1 = .1 + .95 * .3,
    # A0 = .1 + .95 * A1
    a2, a1 = 0.3, 0.1 + 0.95 * 0.3
    a0 = 0.1 + 0.95 * a1
    torch.testing.assert_close(adv, torch.tensor([[0, 0, a0, a1, a2, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[0, 0, a0 + .5, a1 + .6, a2 + .7, 0]]))
    # gamma < 1 and a second row of another length: rows are independent
    mask2 = torch.tensor([[True, True, False], [True, True, True]])
    r2 = torch.tensor([[0.0, 2.0, 0], [1.0, 0.0, 1.0]])
    v2 = torch.zeros(2, 3)
    adv2, _ = gae(r2, v2, mask2, gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv2, torch.tensor([[0.5 * 2.0, 2.0, 0], [1 + 0.25 * 1.0, 0.5 * 1.0, 1.0]]))


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv, flat = group_advantages(r, 4, scale=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0, 0, 0, 0, 0]))
    assert flat.tolist() == [False, True]                        # the second group has no signal
    adv, _ = group_advantages(r, 4, scale=True, eps=0.0)
    std = torch.tensor([1.0, 0.0, 0.5, 0.5]).std()               # unbiased, as torch.std
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, 0.0, 0.0]) / std)


def test_per_token_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5, -2.0, 0.0], [-1.0, -2.0, -1.0, -1.0]])
    r = per_token_rewards(torch.tensor([3.0, 5.0]), logp, ref, mask, beta=0.1)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.05, 3.0, 0.0], [0.0, -0.1, 0.0, 5.0]]))


def test_clipped_loss_gradient_is_zero_outside_the_trust_region():
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    # ratios exp(0.5) (above 1 + eps) with positive advantage, exp(-0.5) (below 1 - eps) with
    # negative advantage: clipped, no gradient; ratios inside the region: gradient
    logp = torch.tensor([[0.5, -0.5, 0.05, -0.05]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clip_frac, approx_kl = clipped_policy_loss(logp, old, adv, mask, eps=0.2)
    assert not approx_kl.requires_grad and not clip_frac.requires_grad     # statistics, not losses
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0
    assert logp.grad[0, 2] < 0 and logp.grad[0, 3] > 0          # raise the good token, lower the bad
    assert clip_frac.item() == 0.5
    # the pessimistic side is not clipped: ratio above 1 + eps with a negative advantage
    logp2 = torch.tensor([[0.5]], requires_grad=True)
    loss2, clip_frac2, _ = clipped_policy_loss(logp2, torch.zeros(1, 1), torch.tensor([[-1.0]]), mask[:, :1])
    loss2.backward()
    assert logp2.grad[0, 0] > 0
    assert clip_frac2.item() == 0                   # outside the region, but its gradient is whole
    # DAPO's clip-higher: a ratio of exp(0.25) = 1.28 with A > 0 is clipped at eps 0.2, not at eps_high 0.3
    for eps_high, clipped in ((None, True), (0.3, False)):
        logp3 = torch.tensor([[0.25]], requires_grad=True)
        loss3, clip_frac3, _ = clipped_policy_loss(logp3, torch.zeros(1, 1), torch.ones(1, 1), mask[:, :1],
                                                   eps_high=eps_high)
        loss3.backward()
        assert (logp3.grad[0, 0] == 0) == clipped and clip_frac3.item() == float(clipped)


def test_loss_aggregations_weigh_tokens_as_their_papers_say():
    """rl.aggregate: 'token' gives every response token the same weight; 'sequence' (GRPO) every
    answer, so a short answer's tokens weigh more; 'constant' (Dr. GRPO) every token 1 / (answers x
    the longest answer allowed), whatever its answer's length."""
    from rl import aggregate
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])     # answers of 1 and 4 tokens
    x = torch.zeros(2, 4, requires_grad=True)
    weights = {}
    for how in ('token', 'sequence', 'constant'):
        x.grad = None
        aggregate(x, mask, how, length=8).backward()
        weights[how] = x.grad.clone()
    on = mask.float()
    torch.testing.assert_close(weights['token'], on / 5)
    torch.testing.assert_close(weights['sequence'], torch.tensor([[1 / 2, 0, 0, 0], [1 / 8] * 4]))
    torch.testing.assert_close(weights['constant'], on / (2 * 8))
    with pytest.raises(ValueError, match="unknown aggregation 'answer'"):
        aggregate(x, mask, 'answer')


def test_clipped_value_loss():
    mask = torch.ones(1, 3, dtype=torch.bool)
    v_old, ret = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, -1.0]])
    # all three moved past the clip range: the first two toward R; the third away from R, where the
    # unclipped error is the larger one
    v = torch.tensor([[0.5, 1.0, 0.5]], requires_grad=True)
    loss = clipped_value_loss(v, v_old, ret, mask, eps=0.2)
    # max((V - R)^2, (clip(V) - R)^2) = [max(.25, .64), max(0, .64), max(2.25, 1.44)]
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.64 + 2.25) / 3)
    loss.backward()               # no gradient where the clipped term wins (its V is clamped)
    assert v.grad[0, 1] == 0 and v.grad[0, 0] == 0 and v.grad[0, 2] == pytest.approx((0.5 + 1.0) / 3)


def test_kl_is_zero_when_policy_equals_reference():
    logp = torch.randn(3, 5)
    assert kl_k3(logp, logp).abs().max() == 0
    assert (kl_k3(logp, logp + 0.3) >= 0).all() and kl_k3(logp, logp + 0.3).sum() > 0
    # its direction, by hand: k3 = exp(d) - d - 1 with d = log ref - log pi, whose gradient in
    # log pi is 1 - ref / pi (with d = log pi - log ref both checks above hold as well)
    pi = torch.tensor([0.0], requires_grad=True)
    k = kl_k3(pi, torch.tensor([0.3]))
    assert k.item() == pytest.approx(math.exp(0.3) - 0.3 - 1)
    k.backward()
    assert pi.grad.item() == pytest.approx(1 - math.exp(0.3))
    tok = with_chat_tokens(ByteTokenizer())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=64)).eval()
    prompts = [{'prompt': 'hi', 'words': ['x']}, {'prompt': 'a longer one', 'words': ['y']}]
    ro = sample_rollout(model, tok, prompts, 6, 1.0, generator=torch.Generator().manual_seed(0))
    from rl import batched_logprobs
    import contextlib
    a = batched_logprobs(model, ro['seq'], ro['mask'], contextlib.nullcontext)
    b = batched_logprobs(model, ro['seq'], ro['mask'], contextlib.nullcontext)
    assert ((a - b) * ro['mask']).abs().max() == 0 and (kl_k3(a, b) * ro['mask']).abs().max() == 0
    stopped = [n < 6 for n in ro['lengths']]                 # (at <|end|> or EOT: trained on that token too)
    assert ro['mask'].sum(1).tolist() == [n + s for n, s in zip(ro['lengths'], stopped)]



def as_rollout(tok, prompts, rows):
    """{'seq', 'mask'} of token rows (prompt + response [+ its stop token]) as sample_rollout makes
    them: right-padded, the mask on the response."""
    L = max(map(len, rows)) + 2
    seq = torch.full((len(rows), L), tok.eot_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        seq[i, :len(r)] = torch.tensor(r)
        mask[i, len(tok.encode_chat(p['prompt'])[0]) - 1:len(r) - 1] = True
    return {'seq': seq, 'mask': mask}


def test_a_rereading_reward_model_scores_rollouts_as_reward_py_encodes_pairs():
    """score_reread: what the reward model reads is prompt + answer + the prompt again as a user
    turn, scored at its end, in rollouts (Rewards) as in training (reward_input); a long answer
    loses its end, never the reread; without the flag the sequence is left as it is."""
    from model import ScalarModel
    from rl import reward_input
    tok = with_chat_tokens(ByteTokenizer())
    torch.manual_seed(0)
    rm = ScalarModel(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=64,
                                 score_reread=True)).eval()
    prompts = [{'prompt': 'use fox', 'words': ['fox']}, {'prompt': 'a longer prompt: use dog', 'words': ['dog']}]
    answers = ['The fox ran.', 'dog']
    rows = [tok.encode_chat(p['prompt'], a)[0] for p, a in zip(prompts, answers)]
    ro = {**as_rollout(tok, prompts, rows), 'texts': answers, 'ended': [True, True]}
    r, parts = Rewards('model', tok, rm)(prompts, ro, contextlib.nullcontext)
    for i, (p, ids) in enumerate(zip(prompts, rows)):
        x = reward_input(tok, rm.config, ids, p['prompt'], 64)
        assert x == ids + [tok.chat_id('user')] + tok.encode(p['prompt']) + [tok.chat_id('end')]
        with torch.no_grad():
            alone = rm(torch.tensor([x]), last=torch.tensor([len(x) - 1]))
        torch.testing.assert_close(r[i:i + 1], alone)
    long = reward_input(tok, rm.config, rows[0] * 10, 'use fox', 64)
    assert len(long) == 64 and long[-9:] == [tok.chat_id('user')] + tok.encode('use fox') + [tok.chat_id('end')]
    plain = ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=64)
    assert reward_input(tok, plain, rows[0], 'use fox', 64) == rows[0]


@pytest.mark.parametrize('reread', [False, True])
def test_rollouts_are_scored_as_reward_py_encodes_their_answers_whatever_stopped_them(reread):
    """A rollout keeps the stop token it sampled (<|end|> or EOT: the policy is trained on it), but
    reward.py encodes an answer that did not end its turn with no stop token: the reward model reads
    an EOT-stopped rollout at its last word, where it was trained to."""
    from model import ScalarModel
    from rl import reward_input
    tok = with_chat_tokens(ByteTokenizer())
    torch.manual_seed(0)
    rm = ScalarModel(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=64,
                                 score_reread=reread)).eval()
    prompts = [{'prompt': 'use fox', 'words': ['fox']}, {'prompt': 'use dog', 'words': ['dog']}]
    answers, ended = ['The fox ran.', 'A dog'], [True, False]
    rows = [tok.encode_chat(p['prompt'], a, ended=e)[0] + ([] if e else [tok.eot_id])
            for p, a, e in zip(prompts, answers, ended)]                  # as sample_rollout keeps them
    r, _ = Rewards('model', tok, rm)(prompts, {**as_rollout(tok, prompts, rows), 'texts': answers, 'ended': ended},
                                     contextlib.nullcontext)
    for i, (p, a, e) in enumerate(zip(prompts, answers, ended)):
        x = reward_input(tok, rm.config, tok.encode_chat(p['prompt'], a, ended=e)[0], p['prompt'], 64)   # reward.py's
        with torch.no_grad():
            alone = rm(torch.tensor([x]), last=torch.tensor([len(x) - 1]))
        torch.testing.assert_close(r[i:i + 1], alone)


def test_rollouts_and_greedy_answers_through_static_steps_equal_the_default(monkeypatch):
    """cuda_graph=True in rollouts and evaluations (a captured step on CUDA; on the CPU the same
    static-cache steps run eagerly): the same answers as the default path, sampled with one seed
    and greedy, for prompts of different lengths (left padding) on an MLA + MoE policy."""
    from task import evaluate_task
    tok = with_chat_tokens(ByteTokenizer())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=320, n_layer=2, n_head=2, n_embd=32, block_size=64, attention='mla',
                            pos_emb='rope', q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                            qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                            intermediate_size=64)).eval()
    prompts = [{'prompt': 'hi', 'words': ['x']}, {'prompt': 'a much longer prompt here', 'words': ['y']},
               {'prompt': 'mid size', 'words': ['z']}]
    static_caches = []
    import generate as generate_module
    real_new_cache = generate_module.new_cache
    monkeypatch.setattr(generate_module, 'new_cache', lambda *a, static=False, **kw:
                        static_caches.append(static) or real_new_cache(*a, static=static, **kw))
    ro = {g: sample_rollout(model, tok, prompts, 12, 1.0, generator=torch.Generator().manual_seed(3),
                            cuda_graph=g) for g in (False, True)}
    assert static_caches == [False, True]             # the option reaches the decoder
    assert torch.equal(ro[True]['seq'], ro[False]['seq']) and ro[True]['texts'] == ro[False]['texts']
    ev = {g: evaluate_task(model, tok, prompts, 12, cuda_graph=g) for g in (False, True)}
    assert [a['ids'] for a in ev[True]['answers']] == [a['ids'] for a in ev[False]['answers']]
    assert any(len(a['ids']) > 0 for a in ev[True]['answers'])

def test_rewards_and_normalisation():
    tok = with_chat_tokens(ByteTokenizer())
    ro = {'texts': ['The fox ran.', 'fox fox'], 'ended': [True, False],
          'seq': torch.tensor([[97, 97, 98, 0], [97, 0, 0, 0]]), 'mask': torch.tensor([[True, True, True],
                                                                                        [True, False, False]])}
    prompts = [{'prompt': 'p', 'words': ['fox']}] * 2
    import contextlib
    r, parts = Rewards('rule', tok, no_end_penalty=0.5)(prompts, ro, contextlib.nullcontext)
    assert r[0].item() == pytest.approx(1.0) and r[1].item() == pytest.approx(0.6 + 0.2 - 0.5)
    r, _ = Rewards('token:b', tok)(prompts, ro, contextlib.nullcontext)
    torch.testing.assert_close(r, torch.tensor([1 / 3, 0.0]))
    with pytest.raises(ValueError, match='valid: rule, model, mix'):
        Rewards('human', tok)
    with pytest.raises(ValueError, match='needs a reward model'):
        Rewards('mix', tok)
    m = RunningMoments()
    data = np.random.default_rng(0).normal(3, 2, 100)
    for chunk in np.split(data, 4):
        m.update(torch.tensor(chunk))
    assert m.mean == pytest.approx(data.mean()) and m.std == pytest.approx(data.std())


def test_statistics_and_kl_controller():
    mask = torch.tensor([[True, True, False]])
    assert explained_variance(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1.0, 2.0, 0.0]]), mask) == 1.0
    w = whiten(torch.tensor([[1.0, 3.0, 100.0]]), mask)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * 1.02)     # KL too high: beta up (clipped at +20%)
    assert AdaptiveKL(0.1).update(50.0, 10) == 0.1                # no target: fixed


TOY = ['--init_from=base', '--task_dir=inst', '--reward=token:e', '--no_end_penalty=0', '--max_new_tokens=8',
       '--learning_rate=3e-3', '--compile=False', '--device=cpu', '--peak_flops=1e12', '--eval_prompts=2',
       '--log_interval=1']


@pytest.fixture(scope='module')
def sft_pipeline(pipeline):
    """The shared pipeline plus 'sft': the base model after 40 steps of SFT, where RL starts in the
    real pipeline. Its answers are English-like bytes with 'e' about 7% of them; the base model's
    answers after the chat template are near-uniform bytes ('e' 0.5%), so from there whether a few
    dozen PPO steps ever sample the toy reward's token is a matter of the seed."""
    if not (pipeline / 'sft').exists():
        run_script('sft.py', '--init_from=base', '--out_dir=sft', '--task_dir=inst', '--max_iters=40',
                   '--eval_interval=40', '--learning_rate=3e-3', '--batch_size=8', '--block_size=96',
                   '--eval_prompts=2', '--compile=False', '--device=cpu', '--peak_flops=1e12', cwd=pipeline)
    return pipeline


def rewards_logged(folder):
    rows = [json.loads(line) for line in open(folder / 'log.jsonl')]
    return [r['train/reward'] for r in rows if 'train/reward' in r], rows


def test_ppo_raises_a_toy_reward(sft_pipeline):
    pipeline = sft_pipeline
    ppo = ['--init_from=sft', '--rollout_prompts=16', '--minibatch_size=8', '--max_iters=16', '--eval_interval=8']
    run_script('ppo.py', '--out_dir=ppo', *TOY, *ppo, '--value_learning_rate=3e-2', cwd=pipeline)   # 16 rollouts of 4 updates
    run_script('ppo.py', '--out_dir=ppo_1x', *TOY, *ppo, cwd=pipeline)          # the value model at the policy's rate
    rewards, rows = rewards_logged(pipeline / 'ppo')
    assert len(rewards) == 16 and np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    # the new value head starts at 0: no early values noisier than the returns (with its random
    # init the first three rollouts' explained variance was -1.2, -11.9, -1.0)
    ev = [r['train/explained_variance'] for r in rows if 'train/explained_variance' in r]
    assert min(ev[:3]) > -0.5, ev
    # the value model at 10x the policy's rate explains part of the returns' variance by the end,
    # more than at the policy's rate (the last five rollouts averaged 0.18 against 0.08)
    ev_1x = [r['train/explained_variance'] for r in rewards_logged(pipeline / 'ppo_1x')[1]
             if 'train/explained_variance' in r]
    assert np.mean(ev[-5:]) > max(0.12, np.mean(ev_1x[-5:]) + 0.05), (ev, ev_1x)
    assert {'train/value_loss', 'train/clip_frac', 'train/entropy', 'train/explained_variance', 'train/kl_ref',
            'train/beta'} <= set(rows[-2])
    assert (pipeline / 'ppo' / 'samples.md').read_text().count('| reward |') >= 2
    evals = [r for r in rows if 'val/kl_ref' in r]                 # rollouts 0, 8, 16: rl.evaluate_policy
    assert len(evals) == 3 and evals[0]['val/kl_ref'] == 0 and evals[-1]['val/kl_ref'] > 0
    assert {'task/score_greedy', 'task/all_words_greedy', 'val/reward_sampled'} <= set(evals[-1])
    from checkpoint import load_model
    model, _, ckpt = load_model(str(pipeline / 'ppo'))           # the policy loads as a plain GPT
    assert type(model) is GPT and ckpt['stage'] == 'ppo' and 'value_model' in ckpt and ckpt['step'] == 16
    assert ckpt['parent'] == ckpt['reference'] == 'sft'         # what it started from (not the SFT's own parent)


def test_grpo_raises_a_toy_reward(sft_pipeline):
    pipeline = sft_pipeline
    run_script('grpo.py', '--out_dir=grpo', *TOY, '--init_from=sft', '--rollout_prompts=4', '--group_size=4',
               '--minibatch_size=8', '--max_iters=32', '--eval_interval=16', cwd=pipeline)   # 2 updates each
    rewards, rows = rewards_logged(pipeline / 'grpo')
    assert len(rewards) == 32 and np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    assert {'train/zero_spread_groups', 'train/kl_loss', 'train/clip_frac'} <= set(rows[-2])
    assert (pipeline / 'grpo' / 'samples.md').read_text().count('| advantage |') >= 2
    evals = [r for r in rows if 'val/kl_ref' in r]
    assert len(evals) == 3 and evals[-1]['val/kl_ref'] > 0 and 'task/score_greedy' in evals[-1]


def test_ppo_whitens_advantages_unless_told_not_to(sft_pipeline):
    """ppo.py: one update per rollout at ratio 1 has policy loss minus the mean advantage over the
    rollout's tokens: 0 once whitened, not with --whiten_advantages=False (the rewards, all >= 0, not
    normalised)."""
    args = [*TOY, '--init_from=sft', '--rollout_prompts=8', '--minibatch_size=8', '--ppo_epochs=1', '--max_iters=1',
            '--eval_interval=1', '--eval_prompts=0', "--reward=token: ", '--max_new_tokens=24',
            '--normalize_reward=False']
    first = {}
    for whitened in (True, False):
        run_script('ppo.py', f'--out_dir=ppo_w{whitened}', *args, f'--whiten_advantages={whitened}', cwd=sft_pipeline)
        first[whitened] = next(r for r in rewards_logged(sft_pipeline / f'ppo_w{whitened}')[1]
                               if 'train/policy_loss' in r)
    assert first[True]['train/reward'] == first[False]['train/reward']
    assert abs(first[True]['train/policy_loss']) < 1e-6 < abs(first[False]['train/policy_loss'])


def test_grpo_loss_aggregations_reach_the_loss(sft_pipeline):
    """grpo.py --loss_agg: at the first update the ratio is 1, so the policy loss is minus the mean
    advantage as the aggregation weighs it: 0 under GRPO's per-answer mean (each group's advantages
    sum to 0), not under the token mean or Dr. GRPO's constant, which weigh a long answer more."""
    args = [*TOY, '--init_from=sft', '--rollout_prompts=2', '--group_size=4', '--minibatch_size=8', '--max_iters=1',
            '--eval_interval=1', '--eval_prompts=0', '--scale_rewards=False', "--reward=token: ", '--max_new_tokens=40']
    first = {}
    for agg in ('sequence', 'token', 'constant'):
        run_script('grpo.py', f'--out_dir=grpo_{agg}', *args, f'--loss_agg={agg}', '--clip_eps_high=0.28',
                   cwd=sft_pipeline)
        first[agg] = next(r for r in rewards_logged(sft_pipeline / f'grpo_{agg}')[1] if 'train/policy_loss' in r)
    assert len({r['train/reward'] for r in first.values()}) == 1            # the same rollout each time
    assert abs(first['sequence']['train/policy_loss']) < 1e-6
    assert abs(first['token']['train/policy_loss']) > 1e-4 and abs(first['constant']['train/policy_loss']) > 1e-4
    assert first['token']['train/policy_loss'] != first['constant']['train/policy_loss']


def test_grpo_of_an_mtp_model_logs_the_balance_of_the_moe_layers_it_runs(pipeline):
    """GRPO runs the main model alone: the MTP module's MoE layer routes no token, and is logged as
    null in moe/imbalance, out of moe/max_imbalance and moe/load_cv (which an idle layer's 0 would
    pull down), not as a layer of perfect balance."""
    from conftest import TINY_MODEL
    moe = ['--n_routed_experts=4', '--num_experts_per_tok=2', '--moe_intermediate_size=16', '--first_k_dense_replace=1',
           '--mtp_depth=1', '--pos_emb=rope']
    run_script('train.py', '--data_dir=data', '--out_dir=base_moe', *TINY_MODEL, *moe, '--block_size=256',
               '--max_iters=4', '--eval_interval=4', cwd=pipeline)
    run_script('grpo.py', '--out_dir=grpo_moe', *TOY, '--init_from=base_moe', '--rollout_prompts=2', '--group_size=2',
               '--minibatch_size=4', '--max_iters=2', '--eval_interval=2', '--eval_prompts=0', cwd=pipeline)
    _, rows = rewards_logged(pipeline / 'grpo_moe')
    steps = [r for r in rows if 'moe/imbalance' in r]
    assert len(steps) == 2
    for r in steps:                                    # layer 1's MoE, then the MTP module's
        assert r['moe/imbalance'][0] >= 1 and r['moe/imbalance'][1] is None
        assert r['moe/max_imbalance'] == r['moe/imbalance'][0] and r['moe/load_cv'] > 0


def test_ppo_resume_continues_exactly(pipeline):
    args = [*TOY, '--rollout_prompts=8', '--minibatch_size=4', '--ppo_epochs=1', '--eval_interval=2',
            '--log_interval=1', '--lr_decay_iters=4']               # rollouts of 2 updates each
    run_script('ppo.py', '--out_dir=pa', *args, '--max_iters=4', cwd=pipeline)
    run_script('ppo.py', '--out_dir=pb', *args, '--max_iters=2', cwd=pipeline)
    run_script('ppo.py', '--out_dir=pb', *args, '--max_iters=4', '--init_from=resume', cwd=pipeline)
    a = [r['train/loss'] for r in rewards_logged(pipeline / 'pa')[1] if 'train/loss' in r]
    b = [r['train/loss'] for r in rewards_logged(pipeline / 'pb')[1] if 'train/loss' in r]
    assert a == b and len(a) == 4


def test_reward_model_in_the_loop(pipeline):
    pairs = pipeline / 'rl_pairs.jsonl'
    pairs.write_text(''.join(json.dumps({'prompt': f'p{i}', 'chosen': 'a banana.', 'rejected': 'a dog.'}) + '\n'
                             for i in range(20)))
    run_script('prepare/preferences.py', f'--source={pairs}', '--out_dir=rl_prefs', cwd=pipeline)
    run_script('reward.py', '--init_from=base', '--out_dir=rl_rm', '--prefs_dir=rl_prefs', '--max_iters=4',
               '--eval_interval=4', '--batch_size=4', '--n_fresh=0', '--compile=False', '--device=cpu',
               '--peak_flops=1e12', cwd=pipeline)
    common = ['--init_from=base', '--task_dir=inst', '--reward=mix', '--reward_model=rl_rm', '--max_new_tokens=6',
              '--compile=False', '--device=cpu', '--peak_flops=1e12', '--eval_prompts=2', '--log_interval=1']
    run_script('ppo.py', '--out_dir=ppo_rm', *common, '--value_init=reward', '--rollout_prompts=4',
               '--minibatch_size=4', '--ppo_epochs=1', '--max_iters=2', '--eval_interval=2', '--always_save_checkpoint=False',
               cwd=pipeline)
    run_script('grpo.py', '--out_dir=grpo_rm', *common, '--rollout_prompts=2', '--group_size=2',
               '--minibatch_size=4', '--max_iters=2', '--eval_interval=2', '--always_save_checkpoint=False',
               cwd=pipeline)
    for folder in ('ppo_rm', 'grpo_rm'):
        # saved even with always_save_checkpoint=False: RL evaluations have no val loss to improve
        assert load_checkpoint(str(pipeline / folder))['step'] == 2
        rows = rewards_logged(pipeline / folder)[1]
        assert {'train/rule_score', 'train/rule_words', 'train/reward_model_score'} <= set(rows[0]) | set(rows[1])
        assert {'val/reward_model_score', 'val/words_sampled', 'task/words_greedy'} <= set(rows[-1])
    # a reward model is no language model: the scripts that need one say so instead of sampling its
    # untrained LM head or scoring it as one
    from conftest import run_script_many
    for p in run_script_many('sample.py', [['--out_dir=rl_rm', '--device=cpu']], cwd=pipeline) + \
            run_script_many('eval.py', [['--out_dir=rl_rm', '--device=cpu']], cwd=pipeline):
        assert p.returncode and 'rl_rm holds a reward model (a scalar score, no language model head)' in p.stderr


def test_minibatches_split_into_equal_micro_batches_or_are_refused():
    from rl import minibatch_problem
    assert minibatch_problem(64, 16, 4, 'n') is None and minibatch_problem(64, 10, 1, 'n') is None
    assert 'multiple of it and divide n = 64' in minibatch_problem(64, 10, 2, 'n')     # 64 % 10: a short last one
    assert 'multiple of it' in minibatch_problem(64, 16, 3, 'n')


@pytest.mark.parametrize('script, extra', [('ppo.py', []), ('grpo.py', ['--loss_agg=token', '--group_size=2']),
                                           ('grpo.py', ['--loss_agg=sequence', '--group_size=2'])])
def test_gradient_accumulation_leaves_an_rl_update_as_it_was(sft_pipeline, script, extra):
    """A minibatch cut into 2 micro-batches makes the update of the whole minibatch at once: the
    loop weighs each micro-batch's token mean by its share of the minibatch's response tokens
    (answer means by 1/2), so the loss and the gradient's norm of two rollouts agree."""
    name = f"{script[:-3]}_{extra[0].split('=')[1] if extra else 'ppo'}"
    pipeline = sft_pipeline         # the SFT model's answers end at different lengths: unequal micro-batches
    args = [*TOY, '--init_from=sft', '--max_new_tokens=48', '--rollout_prompts=4', '--minibatch_size=4',
            '--max_iters=2', '--eval_interval=2', '--eval_prompts=0', '--dropout=0.0', *extra]
    for accumulation in (1, 2):
        run_script(script, *args, f'--out_dir={name}_acc{accumulation}',
                   f'--gradient_accumulation_steps={accumulation}', cwd=pipeline)
    rows = [[r for r in map(json.loads, open(pipeline / f'{name}_acc{n}' / 'log.jsonl')) if 'train/loss' in r]
            for n in (1, 2)]
    assert any(r['train/response_tokens'] < 48 for r in rows[0]), rows[0]   # some answers shorter than others
    for a, b in zip(*rows):     # (Adam turns float noise in near-zero gradients into small differences)
        assert b['train/loss'] == pytest.approx(a['train/loss'], rel=1e-3, abs=1e-6)   # PPO, 1/2 each: 0.10 vs 0.05
        assert b['grad_norm'] == pytest.approx(a['grad_norm'], rel=1e-2)


def test_a_rollouts_steps_are_logged_as_one():
    """PPO / GRPO log once per rollout: the mean gradient norm of its optimizer steps and the expert
    loads of all of them (each step's counts start from the step before), not the last step's."""
    from rl import merged_steps
    outs = [{'grad_norm': torch.tensor(1.0), 'loads': torch.tensor([[1., 3.]]), 'parts': {}},
            {'grad_norm': torch.tensor(3.0), 'loads': torch.tensor([[2., 2.]]), 'parts': {}}]
    out = merged_steps(outs)
    assert float(out['grad_norm']) == 2.0 and out['loads'].tolist() == [[3., 5.]] and out['parts'] == {}
    assert 'grad_norm' not in merged_steps([{'loads': None, 'parts': {}}])


def test_response_logprobs_are_of_the_distribution_the_rollout_samples_from():
    """At temperature T the rollout samples from softmax(logits / T) over the tokenizer's ids (the
    model's vocabulary is padded past them, and sample_next never picks a padding id): the
    log-probabilities PPO and GRPO take their ratios and KL from are of that distribution, on the
    response tokens only, however much mass the padding ids' logits would take."""
    from generate import sample_next
    from rl import response_logprobs
    torch.manual_seed(0)
    V = 50                                               # the tokenizer's ids; the model has 64
    model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16)).eval()
    with torch.no_grad():
        model.lm_head.weight[V:] = model.lm_head.weight[:V].mean(0) + 0.5   # the padding: high logits
    seq = torch.randint(V, (2, 9))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 4:] = True                                   # tokens 5.. are the response
    with torch.no_grad():
        logits = model(seq[:, :-1])[0]
        for T in (1.0, 0.7):
            lp, _ = response_logprobs(model, seq, mask, T, vocab=V)
            want = torch.log_softmax(logits[..., :V] / T, -1).gather(-1, seq[:, 1:, None])[..., 0] * mask
            torch.testing.assert_close(lp, want)
            padded = torch.log_softmax(logits / T, -1).gather(-1, seq[:, 1:, None])[..., 0] * mask
            assert (padded - want).abs().max() > 0.1      # over the padded vocabulary it would be off
        # the rollout's sampler at position 5 of row 0, 20,000 draws: the same distribution
        row = logits[0, 5:6].repeat(20_000, 1)
        drawn = sample_next(row, 0.7, vocab_limit=V, generator=torch.Generator().manual_seed(0))
        assert drawn.max() < V
        freq = torch.bincount(drawn.flatten(), minlength=V).float() / drawn.numel()
        p = torch.softmax(logits[0, 5, :V] / 0.7, -1)
        assert (freq - p).abs().max() < 0.02


def test_bad_settings(pipeline):
    minibatch, group, token, value_lr, split, temperature, dropout, room, agg, eps_high, reward, epochs = run_scripts([
        ('ppo.py', ['--init_from=base', '--task_dir=inst', '--minibatch_size=65', '--device=cpu']),
        ('grpo.py', ['--init_from=base', '--group_size=1']),
        ('ppo.py', ['--init_from=base', '--task_dir=inst', '--reward=token:ab', '--eval_interval=8', '--device=cpu']),
        ('ppo.py', ['--value_learning_rate=-1e-4']),
        ('grpo.py', ['--init_from=base', '--minibatch_size=16', '--gradient_accumulation_steps=3']),
        ('grpo.py', ['--init_from=base', '--temperature=0']),
        ('ppo.py', ['--init_from=base', '--dropout=0.1']),
        ('grpo.py', ['--init_from=base', '--task_dir=inst', '--max_new_tokens=5000', '--device=cpu']),
        ('grpo.py', ['--loss_agg=answer']),
        ('grpo.py', ['--clip_eps_high=-0.5']),
        ('grpo.py', ['--init_from=base', '--reward=rules']),         # (was refused after loading two models)
        ('ppo.py', ['--init_from=base', '--ppo_epochs=0'])],
        cwd=pipeline)
    assert dropout.returncode and 'dropout=0.1: the policy ratio compares' in dropout.stderr
    assert room.returncode and "with max_new_tokens=5000 a rollout would pass the model's block_size" in room.stderr, \
        room.stderr
    assert split.returncode and 'gradient_accumulation_steps=3, minibatch_size=16 must be a multiple' in split.stderr
    assert temperature.returncode and 'temperature=0.0 must be positive' in temperature.stderr
    assert value_lr.returncode and 'value_learning_rate=-0.0001; it must be >= 0' in value_lr.stderr
    assert minibatch.returncode and 'minibatch_size=65 must be between 1 and rollout_prompts = 64' in minibatch.stderr
    assert group.returncode and 'group_size=1 must be at least 2' in group.stderr
    assert token.returncode and "'ab' must be one token" in token.stderr
    assert agg.returncode and "loss_agg='answer': one of token, sequence, constant" in agg.stderr
    assert eps_high.returncode and 'clip_eps_high=-0.5 must be a number >= 0' in eps_high.stderr
    assert reward.returncode and "reward='rules'; valid: rule, model, mix, token:<text>" in reward.stderr
    assert epochs.returncode and 'ppo_epochs=0 must be 1 or more' in epochs.stderr


def test_settings_no_rl_run_can_use_are_refused_by_name():
    """Each out-of-range number its own error (a negative clip_eps clamped every ratio to one value,
    kl_horizon=0 divided by zero, zero epochs failed in torch.stack)."""
    from rl import settings_problem
    ppo = {'fsdp': False, 'temperature': 1.0, 'dropout': 0.0, 'reward': 'rule', 'clip_eps': 0.2, 'gamma': 1.0,
           'lam': 0.95, 'reward_mix': 0.5, 'value_clip': 0.2, 'vf_coef': 0.5, 'kl_beta': 0.05, 'kl_target': 0.0,
           'no_end_penalty': 0.2, 'ppo_epochs': 2, 'max_new_tokens': 200, 'kl_horizon': 10000, 'rollout_prompts': 64}
    grpo = {'fsdp': False, 'temperature': 1.0, 'dropout': 0.0, 'reward': 'token:a', 'clip_eps': 0.2, 'beta': 0.04,
            'reward_mix': 0.5, 'no_end_penalty': 0.2, 'grpo_epochs': 1, 'max_new_tokens': 200, 'rollout_prompts': 16}
    assert settings_problem('ppo', ppo) is None and settings_problem('grpo', grpo) is None
    for c, key, value, says in [
            (ppo, 'clip_eps', -0.1, 'clip_eps=-0.1 must be in [0, 1)'), (ppo, 'clip_eps', 1.5, 'clip_eps=1.5 must'),
            (ppo, 'gamma', 1.2, 'gamma=1.2 must be between 0 and 1'), (ppo, 'lam', -0.5, 'lam=-0.5 must be between'),
            (grpo, 'reward_mix', 2.0, 'reward_mix=2.0 must be between 0 and 1'),
            (ppo, 'value_clip', -0.2, 'value_clip=-0.2 must be 0 or more'), (ppo, 'kl_target', -1.0, 'kl_target=-1.0'),
            (grpo, 'beta', -0.04, 'beta=-0.04 must be 0 or more'), (ppo, 'vf_coef', -1, 'vf_coef=-1 must be 0'),
            (ppo, 'kl_horizon', 0, 'kl_horizon=0 must be 1 or more'), (grpo, 'grpo_epochs', 0, 'grpo_epochs=0 must'),
            (grpo, 'max_new_tokens', 0, 'max_new_tokens=0 must be 1 or more'),
            (ppo, 'reward', 'judge', "reward='judge'; valid: rule, model, mix, token:<text>")]:
        problem = settings_problem('x', {**c, key: value})
        assert problem is not None and says in problem, (key, problem)


def test_rl_curves_reads_the_printed_evaluations(tmp_path):
    """experiments/rl_curves.py: the table (start -> end per run, steps turned into rollouts)
    and the PNG from the `step N: ...` lines of PPO / GRPO logs; a log without them is refused."""
    line = 'step {}: task/score_greedy {}, task/all_words_greedy 0.0000, val/kl_ref {}, val/reward_sampled 0.3, val/rule_score_sampled {}'
    (tmp_path / 'ppo1.log').write_text('config: ...\r' + '\n'.join(
        line.format(s, g, k, r) for s, g, k, r in [(0, 0.42, 0.0, 0.39), (40, 0.41, 2.5, 0.41), (80, 0.43, 3.0, 0.42)]))
    (tmp_path / 'bad.log').write_text('nothing here\n')
    proc = run_script('experiments/rl_curves.py', '--logs=ppo1.log', '--steps_per_rollout=8', '--out=c.png',
                      cwd=tmp_path)
    assert '| ppo1 | 10 | 0.4200 -> 0.4300 | 0.3900 -> 0.4200 | 3.00 |' in proc.stdout
    assert (tmp_path / 'c.png').stat().st_size > 0
    bad = run_script('experiments/rl_curves.py', '--logs=bad.log', '--steps_per_rollout=8', cwd=tmp_path, check=False)
    assert bad.returncode != 0 and 'no evaluation lines' in bad.stderr


@pytest.mark.parametrize('kind', ['byte', 'gpt2'])
def test_reread_word_checks_sit_at_the_last_token_of_each_listed_word(kind):
    """reward.py --word_check_weight: each required word is checked at its last token in the
    reread prompt (found in the prompt's list of words, not in 'Write a story'), labelled by
    whether the answer uses it as the rule counts it (an inflection: 'ran' uses 'run')."""
    from conftest import shared_file
    from rl import reread_word_checks, reward_input
    from tokenizer import gpt2_tokenizer
    tok = with_chat_tokens(ByteTokenizer() if kind == 'byte' else gpt2_tokenizer(shared_file('gpt2.tiktoken')))
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=256, score_reread=True)
    prompt = 'Write a story that uses the words: story, run, dog. The story should have dialogue.'
    answer = 'The cat ran home and told a story.'
    ids, _ = tok.encode_chat(prompt, answer)
    seq = reward_input(tok, config, ids, prompt, 256)
    checks = reread_word_checks(tok, ids, seq, prompt, ['story', 'run', 'dog'], answer)
    assert [label for _, label in checks] == [1.0, 1.0, 0.0]
    reread_start = len(seq) - 1 - len(tok.encode(prompt))
    listed = prompt.index('words: ') + len('words: ')
    for (position, _), word in zip(checks, ['story', 'run', 'dog']):
        assert reread_start < position < len(seq) - 1                # inside the reread prompt
        through = tok.decode(seq[reread_start:position + 1])         # the prompt up to that token
        assert through.endswith(word) and len(through) > listed, (through, word)
    # an answer cut to fit block_size has no checks (a word of its lost tail has nothing to look at)
    long = 'A dog sat. ' * 60 + answer
    ids, _ = tok.encode_chat(prompt, long)
    cut = reward_input(tok, config, ids, prompt, 256)
    assert len(cut) == 256 and reread_word_checks(tok, ids, cut, prompt, ['story', 'run', 'dog'], long) == []
    # a prompt that does not list its words (not make_prompt's) has none to check
    other = 'Tell me about a story, a run and a dog.'
    ids, _ = tok.encode_chat(other, answer)
    assert reread_word_checks(tok, ids, reward_input(tok, config, ids, other, 256), other, ['story'], answer) == []


def test_a_scalar_model_reads_its_outputs_at_the_positions_it_is_given():
    """ScalarModel(x, last=, at=) returns the scores and the per-token outputs (values) at `at`."""
    from model import ScalarModel
    torch.manual_seed(0)
    for pooling in ('last', 'last+mean'):
        rm = ScalarModel(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=32,
                                     score_pooling=pooling)).eval()
        x, last = torch.randint(64, (2, 12)), torch.tensor([11, 7])
        at = torch.tensor([[3, 5], [0, 7]])
        with torch.no_grad():
            s, v_at = rm(x, last=last, at=at)
            torch.testing.assert_close(s, rm(x, last=last))
            for b in range(2):     # a row's outputs depend on its own tokens up to each position only
                v = rm(x[b:b + 1, :last[b] + 1], values=True)[0]
                torch.testing.assert_close(v_at[b], v[at[b]])


def test_a_scalar_model_counts_neither_the_language_model_head_nor_mtp_in_its_flops():
    """A reward or value model runs the trunk and its score head (C -> 1) only: PPO's MFU counted the
    value model's unused vocabulary head (V x C a token) and its MTP module."""
    from model import GPT, ModelConfig, ScalarModel
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=256, block_size=32, mtp_depth=1)
    lm, scalar = GPT(cfg), ScalarModel(cfg)
    assert scalar.active_matmul_params() == lm.active_matmul_params(mtp=False) - 256 * 32 + 32
    assert scalar.active_matmul_params(mtp=True) == scalar.active_matmul_params(mtp=False)


def test_ppo_s_value_model_runs_without_the_checkpoint_s_dropout(sft_pipeline, tmp_path):
    """The policy ratio needs dropout 0 (settings_problem); the value model, loaded from a checkpoint
    fine-tuned with dropout, kept its 0.1 (its old values came from eval mode, its trained ones not)."""
    import shutil
    from checkpoint import load_checkpoint, save_checkpoint
    pipeline = sft_pipeline
    ckpt = load_checkpoint(str(pipeline / 'sft'))
    ckpt['model_config']['dropout'] = 0.1
    shutil.copytree(pipeline / 'sft', tmp_path / 'sft_dropout')
    save_checkpoint(str(tmp_path / 'sft_dropout'), ckpt)
    run_script('ppo.py', *TOY, f"--init_from={tmp_path / 'sft_dropout'}", f"--out_dir={tmp_path / 'ppo'}",
               '--rollout_prompts=4', '--minibatch_size=4', '--max_iters=1', '--eval_interval=1', cwd=pipeline)
    saved = load_checkpoint(str(tmp_path / 'ppo'))
    assert saved['value_model_config']['dropout'] == 0.0 and saved['model_config']['dropout'] == 0.0
