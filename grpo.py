"""
Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) on the instruction task: no
value model. Each iteration is one rollout and its updates:

    for each rollout:
        answer rollout_prompts training prompts group_size times each with the policy
        score the answers; an answer's advantage is its reward relative to its group,
            A = (r - mean of the group) / (std of the group + eps)      (scale_rewards=False: r - mean)
        given to every token of the answer
        for each of grpo_epochs epochs, for each minibatch of answers:
            one optimizer step on PPO's clipped surrogate + beta * KL(pi || ref) (its k3 estimate,
            whose gradient in a loss is the reverse KL's: rl.kl_k3),
            averaged over each answer's tokens, then over answers (loss_agg='sequence')

Two variants are settings: Dr. GRPO (Liu et al. 2025) is --scale_rewards=False --loss_agg=constant
(no division by the group's std, no division by each answer's length); DAPO's (Yu et al. 2025)
token-level loss (over every rank's response tokens) and clip-higher are --loss_agg=token
--clip_eps_high=0.28.

$ python grpo.py --init_from=out/sft --reward=rule --out_dir=out/grpo

max_iters, eval_interval, log_interval and warmup_iters count rollouts. Logs as ppo.py (reward,
rule score, reward-model score, KL to the reference, clip fraction, entropy) plus the share of
groups whose answers all scored the same (they carry no signal). The loss on the progress bar
stays near 0 by construction (each group's advantages sum to 0, and the ratio starts at 1): watch
train/reward and the held-out task score instead. Rewards, rollouts and the other pieces PPO
uses too: rl.py.
"""

import os
import sys

import torch

from config import configure
from generate import use_cuda_graph
from rl import (LOSS_AGGREGATIONS, RunningMoments, aggregate, append_samples, batched_logprobs, clear_samples,
                clipped_policy_loss, entropy, evaluate_policy, group_advantages, kl_k3, load_policy, load_rewards,
                mean_stats, merged_steps, minibatch_problem, prompts_of_rollout, read_prompts,
                response_logprobs, room_problem, rollout_stats, sample_rollout, settings_problem, trim_padding)
from runtime import all_ranks, close_runtime, init_runtime
from training import Run, check_loop_settings

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/grpo'
init_from = 'out/sft'        # the SFT checkpoint: the policy's start and the reference; or 'resume'
eval_interval = 10           # rollouts between evaluations (and checkpoints)
log_interval = 1             # rollouts between log lines
always_save_checkpoint = True
save_checkpoints = True
eval_only = False
eval_prompts = 64            # held-out prompts answered at each evaluation
sample_every = 5             # rollouts between tables of samples in samples.md
# the task and the reward
task_dir = 'data/tinystories_instruct'   # prompts_train.jsonl (rollouts), prompts_val.jsonl (eval)
reward = 'rule'              # 'rule' | 'model' | 'mix' | 'token:<text>' (a toy)
reward_model = 'out/reward'  # for reward='model' / 'mix'
reward_mix = 0.5             # mix: weight of the reward model (the rule gets the rest)
no_end_penalty = 0.2         # subtracted from the reward of an answer that did not end its turn (with
                             # reward='rule', on top of the rule's own ending term: task.RULE_WEIGHTS)
normalize_reward = False     # running mean/std of rewards first; with scale_rewards the group's z-score
                             # cancels it (it matters only with scale_rewards=False)
# rollouts and updates
rollout_prompts = 16         # prompts per rollout ...
group_size = 4               # ... each answered this many times
scale_rewards = True         # advantages: divide by the group's std (False: only subtract the group mean)
max_new_tokens = 200         # the longest answer a rollout samples (tokens)
temperature = 1.0            # rollouts sample at it; log-probs and KL use softmax(logits / temperature)
cuda_graph = None            # sampling: one-token steps replayed as a CUDA graph; None: on for CUDA
grpo_epochs = 1              # passes over each rollout
minibatch_size = 16          # answers per optimizer step
gradient_accumulation_steps = 1   # micro-batches per minibatch
clip_eps = 0.2               # the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]
clip_eps_high = None         # None: clip_eps; above it (DAPO: 0.28) unlikely good tokens may grow further
loss_agg = 'sequence'        # per-token terms to one loss (rl.aggregate): 'sequence' (each answer's mean,
                             # then over answers), 'token' (over all tokens), 'constant' (each answer's
                             # sum / max_new_tokens, then over answers)
beta = 0.04                  # weight of the KL(pi || ref) penalty in the loss
dropout = 0.0
# optimizer and schedule (as in train.py; the schedule counts rollouts)
optimizer = 'adamw'          # 'adamw' | 'muon' | 'muonclip'
learning_rate = 1e-5
min_lr = 1e-6
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
muon_momentum = 0.95
qk_clip_tau = 100.0
lr_schedule = 'cosine'       # 'cosine' | 'wsd' | 'constant'
warmup_iters = 0             # rollouts of linear warm-up to learning_rate
max_iters = 100              # rollouts
lr_decay_iters = 0           # 0: max_iters
decay_frac = 0.2
# system and logging (as in train.py)
device = 'auto'
dtype = 'auto'
compile = None
compile_mode = 'default'
fsdp = False                 # refused: each rank samples rollouts of other lengths (use DDP)
seed = 1337
peak_flops = 0.0
tensorboard = False
wandb_project = ''
run_name = ''
# -----------------------------------------------------------------------------
config = configure(globals())
check_loop_settings(config)
# -----------------------------------------------------------------------------
n_answers = rollout_prompts * group_size
if group_size < 2:
    sys.exit(f'error: group_size={group_size} must be at least 2 (advantages are relative to the group)')
problem = minibatch_problem(n_answers, minibatch_size, gradient_accumulation_steps, 'rollout_prompts x group_size')
if problem:
    sys.exit(f'error: {problem}')
if loss_agg not in LOSS_AGGREGATIONS:
    sys.exit(f"error: loss_agg={loss_agg!r}: one of {', '.join(LOSS_AGGREGATIONS)}")
if clip_eps_high is not None and (isinstance(clip_eps_high, bool) or not isinstance(clip_eps_high, (int, float))
                                  or clip_eps_high < 0):
    sys.exit(f'error: clip_eps_high={clip_eps_high!r} must be a number >= 0 (or None: clip_eps)')
problem = settings_problem('grpo', config)
if problem:
    sys.exit(f'error: {problem}')
rt = init_runtime(device, dtype, seed)
cuda_graph = use_cuda_graph(cuda_graph, rt.device_type)

# --- models: the policy (trained), the frozen reference, the reward -------------------------------
resume = init_from == 'resume'
ckpt, policy, tok, reference, reference_path = load_policy('grpo', init_from, out_dir, rt.device, dropout)
policy.to(rt.device)
rewards = load_rewards(reward, tok, reward_model, reward_mix, no_end_penalty, rt.device)
moments = RunningMoments()
if resume and 'reward_moments' in ckpt:
    moments.load_state_dict(ckpt['reward_moments'])
train_prompts, val_prompts = read_prompts(task_dir, eval_prompts)
problem = room_problem(tok, train_prompts + val_prompts, max_new_tokens, policy.config.block_size)
if problem:
    sys.exit(f'error: {problem}')
clear_samples(out_dir, resume, rt.master)
extra = {'parent': ckpt.get('parent', reference_path) if resume else reference_path,   # what it started from
         'reference': reference_path, 'reward': reward,
         'reward_model': reward_model if rewards.reward_model is not None else '', 'task_dir': task_dir,
         'data_dir': ckpt.get('data_dir', ''), 'reward_moments': moments.state_dict()}
# optimizer, DDP, torch.compile, the log, and the resumed optimizer state, step and RNG
run = Run(config, rt, policy, 'grpo', tok.spec(), policy.flops_per_token(mtp=False),   # (no MTP run here)
          resume=ckpt if resume else None,
          checkpoint_extra=extra, unused_parameters=policy.config.mtp_depth > 0)    # no targets: MTP unused
ckpt = None


@torch.no_grad()
def make_rollout(r):
    """Rollout r: rollout_prompts prompts, each answered group_size times (the answers of a group
    are adjacent rows), a function of (seed, r, rank) and the current weights; their rewards,
    group-relative advantages and per answer token the log-probabilities under the policy and
    the reference."""
    policy.eval()
    chosen, gen = prompts_of_rollout(train_prompts, rollout_prompts, seed, r, rt.rank, rt.device)
    prompts = [p for p in chosen for _ in range(group_size)]
    ro = sample_rollout(policy, tok, prompts, max_new_tokens, temperature, generator=gen, autocast=rt.autocast,
                        cuda_graph=cuda_graph)
    seq, mask = ro['seq'], ro['mask']
    old_logp = batched_logprobs(policy, seq, mask, rt.autocast, temperature=temperature, vocab=tok.vocab_size)
    ref_logp = batched_logprobs(reference, seq, mask, rt.autocast, temperature=temperature, vocab=tok.vocab_size)
    scores, parts = rewards(prompts, ro, rt.autocast)    # (rl.Rewards: the rule / reward model, minus
    # no_end_penalty where an answer did not end.) A shaping term of your own goes here, e.g. a length
    # penalty: scores = scores - c * ro['lengths'] (as a tensor); the held-out val/reward stays unshaped
    if normalize_reward:
        moments.update(all_ranks(scores))      # every rank's rewards: the same moments everywhere
    # A_i = (r_i - mean of its group) / (std of its group + eps), given to every token of answer i
    adv, zero_spread = group_advantages(moments.normalize(scores) if normalize_reward else scores,
                                        group_size, scale_rewards)
    stats = {**rollout_stats(scores, parts, ro), 'zero_spread_groups': zero_spread.float().mean().item(),
             'kl_ref': ((old_logp - ref_logp) * mask).sum(1).mean().item()}   # k1: can be < 0 (rl.evaluate_policy)
    extra.update(reward_moments=moments.state_dict())   # (extra is the dict the checkpoints save)
    if rt.master and sample_every and r % sample_every == 0:
        append_samples(os.path.join(out_dir, 'samples.md'), f'rollout {r}', ('prompt', 'answer', 'reward', 'advantage'),
                       [(p['prompt'], t, f'{x:.3f}', f'{a:+.2f}')
                        for p, t, x, a in zip(prompts, ro['texts'], scores.tolist(), adv.tolist())][:group_size])
    policy.train()
    return {'seq': seq, 'mask': mask, 'old_logp': old_logp, 'ref_logp': ref_logp,
            'adv': adv[:, None].expand_as(old_logp) * mask}, stats


def grpo_loss(b):
    """The loss of a minibatch b of the rollout: the clipped surrogate per token plus beta * the k3
    estimate of the KL to the reference (its gradient: KL(ref || pi)'s, rl.kl_k3), each aggregated
    as loss_agg says (by default averaged over each answer's tokens, then over answers); with
    statistics."""
    b = trim_padding(b)
    mask = b['mask']
    logp, logits = response_logprobs(run.model, b['seq'], mask, temperature, tok.vocab_size)
    pg_loss, clip_frac, approx_kl = clipped_policy_loss(logp, b['old_logp'], b['adv'], mask, clip_eps, clip_eps_high,
                                                        loss_agg, max_new_tokens)
    kl_loss = aggregate(kl_k3(logp, b['ref_logp']), mask, loss_agg, max_new_tokens)
    with torch.no_grad():
        stats = {'policy_loss': pg_loss.detach(), 'kl_loss': kl_loss.detach(), 'clip_frac': clip_frac,
                 'approx_kl': approx_kl, 'entropy': entropy(logits.detach(), mask)}
    return pg_loss + beta * kl_loss, stats, b['seq'].numel()


def evaluate(_):
    return evaluate_policy(policy, reference, tok, val_prompts, rewards, max_new_tokens, temperature, rt.autocast,
                           seed, cuda_graph)


# --- the training loop: a rollout, then epochs of minibatch updates ------------------------------
plots = [(('train/policy_loss', 'train/kl_loss'), 'loss.png', 'loss'),
         (('train/reward', 'train/rule_score', 'train/rule_words', 'train/reward_model_score'), 'reward.png', 'reward'),
         (('train/kl_ref', 'val/kl_ref'), 'kl.png', 'KL(policy || reference), nats')]
r = run.step                                  # rollouts done: 0, or where a resumed run stopped
while run.evaluate(r, evaluate, plots):       # every eval_interval rollouts: evaluate, plot, save
    lr = run.set_lr(r)
    buffer, stats_of_rollout = make_rollout(r)
    losses, updates, outs, tokens = [], [], [], 0
    for epoch in range(grpo_epochs):                # passes over the rollout, in shuffled minibatches
        order = torch.randperm(n_answers, generator=torch.Generator().manual_seed(seed + 31 * r + epoch))
        for idx in order.to(rt.device).split(minibatch_size):   # one optimizer step per minibatch
            parts = torch.tensor_split(idx, gradient_accumulation_steps)   # equal micro-batches (minibatch_problem)
            # grpo_loss is a mean over a micro-batch's answers ('sequence', 'constant': each counts
            # 1 / gradient_accumulation_steps) or its response tokens ('token': each counts by its
            # share of the minibatch's), so the step's loss is the minibatch's whatever the accumulation
            share = (run.token_share_weights([buffer['mask'][part].sum() for part in parts]) if loss_agg == 'token'
                     else [1 / gradient_accumulation_steps] * gradient_accumulation_steps)
            loss, stats = 0.0, {}
            for micro, part in enumerate(parts):
                with run.sync(micro):              # DDP reduces gradients on the last micro-step only
                    with rt.autocast():
                        micro_loss, micro_stats, n = grpo_loss({k: v[part] for k, v in buffer.items()})
                    run.backward(micro_loss * share[micro])
                loss, tokens = loss + micro_loss.detach() * share[micro], tokens + n
                stats = {k: stats.get(k, 0) + v * share[micro] for k, v in micro_stats.items()}
            outs.append(run.optimizer_step())      # clip, step, zero grads, router biases, QK-Clip
            losses.append(loss)
            updates.append(stats)
    r += 1
    if not run.log(r, lr, torch.stack(losses).mean(), tokens, merged_steps(outs),
                   {**mean_stats(updates), **stats_of_rollout}):
        break                                 # (every log_interval rollouts; False: NaN/inf loss)
run.finish(plots)
close_runtime(rt)
