"""
Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) on the instruction task: no
value model. Each rollout answers rollout_prompts training prompts group_size times; an answer's
advantage is its reward relative to its group, (r - mean) / (std + eps) (scale_rewards=False:
r - mean), given to every token of the answer. The loss per token is PPO's clipped surrogate plus
beta * KL(pi || ref) by the k3 estimator, averaged over each answer's tokens, then over answers.

$ python grpo.py --init_from=out/sft --reward=rule --out_dir=out/grpo

One optimizer step per minibatch of answers; max_iters counts those. Logs as ppo.py (reward, rule
score, reward-model score, KL to the reference, clip fraction, entropy) plus the share of groups
whose answers all scored the same (they carry no signal). Schedule, optimizer, logging,
checkpoints and resume: common.Trainer. Rewards and the other shared pieces: rl.py.
"""

import math
import os
import sys

import torch

from common import (Trainer, all_ranks, close_runtime, configure, init_runtime, load_chat_model,
                    load_checkpoint, read_jsonl, training_defaults, use_cuda_graph)
from model import token_logprobs
from rl import (Rewards, RunningMoments, append_samples, batched_logprobs, clipped_policy_loss, entropy,
                evaluate_policy, group_advantages, kl_k3, masked_mean, rollout_stats, sample_rollout)

# -----------------------------------------------------------------------------
# default config values (and those of common.training_defaults(): optimizer, schedule, logging)
out_dir = 'out/grpo'
init_from = 'out/sft'        # the SFT checkpoint: the policy's start and the reference; or 'resume'
task_dir = 'data/tinystories_instruct'
reward = 'rule'              # 'rule' | 'model' | 'mix' | 'token:<text>' (a toy)
reward_model = 'out/reward'
reward_mix = 0.5
no_end_penalty = 0.2
normalize_reward = False     # running mean/std of rewards (the group normalisation usually suffices)
rollout_prompts = 16         # prompts per rollout ...
group_size = 4               # ... each answered this many times
scale_rewards = True         # divide by the group's std (False: only subtract the group mean)
max_new_tokens = 200
temperature = 1.0
grpo_epochs = 1              # passes over each rollout
minibatch_size = 16          # answers per optimizer step
clip_eps = 0.2
beta = 0.04                  # weight of the KL(pi || ref) penalty in the loss
learning_rate = 1e-5
min_lr = 1e-6
weight_decay = 0.0
warmup_iters = 0
max_iters = 200
eval_interval = 40
log_interval = 2
eval_prompts = 64
sample_every = 5
cuda_graph = None            # rollouts and evaluations: one-token steps replayed as a CUDA graph
                             # (model.DecodeGraph); None: on for CUDA
dropout = 0.0
# -----------------------------------------------------------------------------
config = configure(globals(), defaults=training_defaults())
# (configure() also defines every training_defaults() key as a global here)
# -----------------------------------------------------------------------------
n_answers = rollout_prompts * group_size
n_minibatches = math.ceil(n_answers / minibatch_size)
updates_per_rollout = grpo_epochs * n_minibatches
if init_from == 'scratch':
    sys.exit("error: grpo.py starts from a fine-tuned model: set init_from='out/sft' (or 'resume')")
if group_size < 2:
    sys.exit(f'error: group_size={group_size} must be at least 2 (advantages are relative to the group)')
if eval_interval % updates_per_rollout:
    sys.exit(f'error: eval_interval={eval_interval} must be a multiple of grpo_epochs x minibatches per '
             f'rollout = {updates_per_rollout}, so checkpoints fall between rollouts')
if fsdp:
    sys.exit('error: grpo.py does not support fsdp=True: each rank samples its own rollouts, whose lengths '
             'differ, while a sharded model needs every rank in each forward pass; use DDP (the default)')
rt = init_runtime(device, dtype, seed)
try:
    cuda_graph = use_cuda_graph(cuda_graph, rt.device_type)
except ValueError as e:
    sys.exit(f'error: {e}')

resume = init_from == 'resume'
source = out_dir if resume else init_from
ckpt = load_checkpoint(source)
reference_path = ckpt['reference'] if resume else source
policy, tok, ckpt = load_chat_model(source, 'cpu', ckpt, overrides={'dropout': dropout})
policy.to(rt.device)
reference, _, _ = load_chat_model(reference_path, rt.device)
reference.eval().requires_grad_(False)
rm = None
if reward in ('model', 'mix'):
    rm, rm_tok, _ = load_chat_model(reward_model, rt.device)
    if rm_tok.spec() != tok.spec():
        sys.exit(f"error: the reward model's tokenizer ({reward_model}) differs from the policy's")
    rm.eval().requires_grad_(False)
try:
    rewards = Rewards(reward, tok, rm, reward_mix, no_end_penalty)
except ValueError as e:
    sys.exit(f'error: {e}')
moments = RunningMoments()
if resume and 'reward_moments' in ckpt:
    moments.load_state_dict(ckpt['reward_moments'])
train_prompts = read_jsonl(os.path.join(task_dir, 'prompts_train.jsonl'), ('prompt', 'words'),
                           hint='run python prepare/tinystories_instruct.py')
val_prompts = read_jsonl(os.path.join(task_dir, 'prompts_val.jsonl'), ('prompt', 'words'))[:eval_prompts]
extra = {'parent': ckpt.get('parent', source), 'reference': reference_path, 'reward': reward,
         'reward_model': reward_model if rm is not None else '', 'task_dir': task_dir,
         'data_dir': ckpt.get('data_dir', ''), 'reward_moments': moments.state_dict()}
buffer = {'index': None}


@torch.no_grad()
def make_rollout(r):
    """Rollout r: rollout_prompts prompts, each answered group_size times (rows of a group are
    adjacent), a function of (seed, r, rank) and the current weights."""
    policy.eval()
    g = torch.Generator().manual_seed(seed * 1_000_003 + r * 7919 + rt.rank)
    chosen = [train_prompts[int(i)] for i in torch.randint(len(train_prompts), (rollout_prompts,), generator=g)]
    prompts = [p for p in chosen for _ in range(group_size)]
    gen = torch.Generator(device=rt.device).manual_seed(seed * 1_000_003 + r * 7919 + rt.rank)
    ro = sample_rollout(policy, tok, prompts, max_new_tokens, temperature, generator=gen, autocast=rt.autocast,
                        cuda_graph=cuda_graph)
    seq, mask = ro['seq'], ro['mask']
    old_logp = batched_logprobs(policy, seq, mask, rt.autocast)
    ref_logp = batched_logprobs(reference, seq, mask, rt.autocast)
    scores, parts = rewards(prompts, ro, rt.autocast)
    used = scores
    if normalize_reward:
        moments.update(all_ranks(scores))          # every rank's rewards: the same moments everywhere
        used = moments.normalize(scores)
    adv, flat_groups = group_advantages(used, group_size, scale_rewards)
    stats = {**rollout_stats(scores, parts, ro), 'zero_spread_groups': flat_groups.float().mean().item(),
             'kl_ref': ((old_logp - ref_logp) * mask).sum(1).mean().item()}
    extra.update(reward_moments=moments.state_dict())
    buffer.update(index=r, seq=seq, mask=mask, old_logp=old_logp, ref_logp=ref_logp,
                  adv=adv[:, None].expand_as(old_logp) * mask, stats=stats)
    if rt.master and sample_every and r % sample_every == 0:
        append_samples(os.path.join(out_dir, 'samples.md'), f'rollout {r} (step {r * updates_per_rollout})',
                       ('prompt', 'answer', 'reward', 'advantage'),
                       [(p['prompt'], t, f'{x:.3f}', f'{a:+.2f}')
                        for p, t, x, a in zip(prompts, ro['texts'], scores.tolist(), adv.tolist())][:group_size])
    policy.train()


def loss_fn(m, step, micro_step):
    r, u = divmod(step, updates_per_rollout)
    if buffer['index'] != r:
        make_rollout(r)
    epoch, mb = divmod(u, n_minibatches)
    perm = torch.randperm(n_answers, generator=torch.Generator().manual_seed(seed + 31 * r + epoch))
    idx = perm[mb * minibatch_size:(mb + 1) * minibatch_size].to(rt.device)
    idx = idx.chunk(gradient_accumulation_steps)[micro_step] if gradient_accumulation_steps > 1 else idx
    b = {k: buffer[k][idx] for k in ('seq', 'mask', 'old_logp', 'ref_logp', 'adv')}
    length = int(b['mask'].any(0).nonzero().max()) + 2                # trim right padding
    seq, mask = b['seq'][:, :length], b['mask'][:, :length - 1]
    cut = lambda t: t[:, :length - 1]                                  # noqa: E731
    logits, _ = m(seq[:, :-1])
    logp = token_logprobs(logits, seq[:, 1:].masked_fill(~mask, -1))
    pg_loss, clip_frac, approx_kl = clipped_policy_loss(logp, cut(b['old_logp']), cut(b['adv']), mask, clip_eps,
                                                        per_sequence=True)
    kl = kl_k3(logp, cut(b['ref_logp']))
    kl_loss = masked_mean(masked_mean(kl, mask, dim=1), mask.any(1))
    with torch.no_grad():
        stats = {'policy_loss': pg_loss.detach(), 'kl_loss': kl_loss.detach(), 'clip_frac': clip_frac,
                 'approx_kl': approx_kl, 'entropy': entropy(logits.detach(), mask), 'tokens': seq.numel(),
                 **buffer['stats']}
    return pg_loss + beta * kl_loss, stats


@torch.no_grad()
def evaluate(m):
    return evaluate_policy(policy, reference, tok, val_prompts, rewards, max_new_tokens, temperature, rt.autocast,
                           seed, cuda_graph)


os.makedirs(out_dir, exist_ok=True)
if not resume and rt.master and os.path.exists(os.path.join(out_dir, 'samples.md')):
    os.remove(os.path.join(out_dir, 'samples.md'))
tokens_per_step = minibatch_size * (max_new_tokens + 64) * rt.world_size
trainer = Trainer(config, rt, policy, 'grpo', tok.spec(), tokens_per_step, policy.flops_per_token(),
                  resume=ckpt if resume else None, checkpoint_extra=extra,
                  unused_parameters=policy.config.mtp_depth > 0)    # no targets: MTP unused
ckpt = None
trainer.run(loss_fn, evaluate, plot_keys=('train/policy_loss', 'train/kl_loss'),
            extra_plots=[(('train/reward', 'train/rule_score', 'train/rule_words', 'train/reward_model_score'),
                          'reward.png', 'reward'),
                         (('train/kl_ref', 'val/kl_ref'), 'kl.png', 'KL(policy || reference), nats')])
close_runtime(rt)
