"""
RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022) on the instruction
task. Each rollout: answer rollout_prompts training prompts with the policy, score the answers
(reward= 'rule' | 'model' | 'mix' | 'token:<s>'), normalise the scores (running mean/std), and
turn them into per-token rewards r_t = -beta (log pi - log ref)_t with the score added on the
last token; GAE gives advantages and returns from the value model's estimates. Then ppo_epochs
passes of minibatch updates with PPO's clipped policy loss and clipped value loss. beta follows
an adaptive controller toward kl_target (0: fixed beta).

$ python ppo.py --init_from=out/sft --reward=rule --out_dir=out/ppo
$ python ppo.py --init_from=out/sft --reward=model --reward_model=out/reward --value_init=reward

One optimizer step per minibatch; max_iters counts those. Logs per step: the rollout's mean reward,
rule score, reward-model score, KL to the reference, response length, share of ended turns, beta;
the update's policy and value loss, clip fraction, approximate KL to the rollout policy, entropy,
explained variance. Every eval_interval steps: the task score of greedy answers to held-out
prompts and the KL of sampled ones; a table of samples goes to out_dir/samples.md every
sample_every rollouts. Schedule, optimizer, logging, checkpoints and resume: common.Trainer.
"""

import math
import os
import sys

import torch

from common import (Trainer, all_ranks, close_runtime, configure, init_runtime, load_chat_model,
                    load_checkpoint, read_jsonl, training_defaults, use_cuda_graph)
from model import ScalarModel, token_logprobs
from rl import (ActorCritic, AdaptiveKL, Rewards, RunningMoments, append_samples, batched_logprobs,
                clipped_policy_loss, clipped_value_loss, entropy, evaluate_policy, explained_variance, gae,
                per_token_rewards, rollout_stats, sample_rollout, whiten)

# -----------------------------------------------------------------------------
# default config values (and those of common.training_defaults(): optimizer, schedule, logging)
out_dir = 'out/ppo'
init_from = 'out/sft'        # the SFT checkpoint: the policy's start and the reference; or 'resume'
task_dir = 'data/tinystories_instruct'   # prompts_train.jsonl (rollouts), prompts_val.jsonl (eval)
reward = 'rule'              # 'rule' | 'model' | 'mix' | 'token:<text>' (a toy)
reward_model = 'out/reward'  # for reward='model' / 'mix'
reward_mix = 0.5             # mix: weight of the reward model (the rule gets the rest)
no_end_penalty = 0.2         # subtracted from the reward of an answer that did not end its turn
normalize_reward = True      # running mean / std normalisation of the sequence rewards
value_init = 'policy'        # the value model's backbone: 'policy' (the SFT model) or 'reward'
rollout_prompts = 64         # answers per rollout
max_new_tokens = 200
temperature = 1.0
ppo_epochs = 2               # passes over each rollout
minibatch_size = 16          # answers per optimizer step
gamma = 1.0
lam = 0.95
clip_eps = 0.2
value_clip = 0.2
vf_coef = 0.5
kl_beta = 0.05               # KL penalty weight (the start value with kl_target > 0)
kl_target = 0.0              # adaptive KL controller's target (sequence KL, nats); 0: fixed beta
kl_horizon = 10000
learning_rate = 1e-5
min_lr = 1e-6
weight_decay = 0.0
warmup_iters = 0
max_iters = 200
eval_interval = 40
log_interval = 2
eval_prompts = 64
sample_every = 5             # rollouts between tables of samples in samples.md
cuda_graph = None            # rollouts and evaluations: one-token steps replayed as a CUDA graph
                             # (model.DecodeGraph); None: on for CUDA
dropout = 0.0
# -----------------------------------------------------------------------------
config = configure(globals(), defaults=training_defaults())
# (configure() also defines every training_defaults() key as a global here)
# -----------------------------------------------------------------------------
n_minibatches = math.ceil(rollout_prompts / minibatch_size)
updates_per_rollout = ppo_epochs * n_minibatches
if init_from == 'scratch':
    sys.exit("error: ppo.py starts from a fine-tuned model: set init_from='out/sft' (or 'resume')")
if eval_interval % updates_per_rollout:
    sys.exit(f'error: eval_interval={eval_interval} must be a multiple of ppo_epochs x minibatches per '
             f'rollout = {updates_per_rollout}, so checkpoints fall between rollouts')
if value_init not in ('policy', 'reward'):
    sys.exit(f"error: value_init='{value_init}'; valid: policy, reward")
if fsdp:
    sys.exit('error: ppo.py does not support fsdp=True: each rank samples its own rollouts, whose lengths '
             'differ, while a sharded model needs every rank in each forward pass; use DDP (the default)')
rt = init_runtime(device, dtype, seed)
try:
    cuda_graph = use_cuda_graph(cuda_graph, rt.device_type)
except ValueError as e:
    sys.exit(f'error: {e}')

# --- models: policy, value, frozen reference, reward model ------------------------------------
resume = init_from == 'resume'
source = out_dir if resume else init_from
ckpt = load_checkpoint(source)
reference_path = ckpt['reference'] if resume else source
policy, tok, ckpt = load_chat_model(source, 'cpu', ckpt, overrides={'dropout': dropout})
if resume:
    value = ScalarModel(type(policy.config)(**ckpt['value_model_config']))
    value.load_state_dict(ckpt['value_model'])
else:
    value_source = reward_model if value_init == 'reward' else source
    value, value_tok, _ = load_chat_model(value_source, 'cpu', scalar=True)
    if value_tok.spec() != tok.spec():
        sys.exit(f"error: the value model's tokenizer ({value_source}) differs from the policy's")
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
model = ActorCritic(policy, value).to(rt.device)
kl_ctl = AdaptiveKL(ckpt.get('kl_beta', kl_beta) if resume else kl_beta, kl_target, kl_horizon)
moments = RunningMoments()
if resume and 'reward_moments' in ckpt:
    moments.load_state_dict(ckpt['reward_moments'])
train_prompts = read_jsonl(os.path.join(task_dir, 'prompts_train.jsonl'), ('prompt', 'words'),
                           hint='run python prepare/tinystories_instruct.py')
val_prompts = read_jsonl(os.path.join(task_dir, 'prompts_val.jsonl'), ('prompt', 'words'))[:eval_prompts]
extra = {'parent': ckpt.get('parent', source), 'reference': reference_path, 'reward': reward,
         'reward_model': reward_model if rm is not None else '', 'task_dir': task_dir,
         'data_dir': ckpt.get('data_dir', ''), 'kl_beta': kl_ctl.beta, 'reward_moments': moments.state_dict()}

# --- rollouts -----------------------------------------------------------------------------------
buffer = {'index': None}


@torch.no_grad()
def make_rollout(r):
    """Rollout r: a function of (seed, r, rank) and the current weights, so a resumed run makes
    the same one."""
    model.eval()
    g = torch.Generator().manual_seed(seed * 1_000_003 + r * 7919 + rt.rank)
    prompts = [train_prompts[int(i)] for i in torch.randint(len(train_prompts), (rollout_prompts,), generator=g)]
    gen = torch.Generator(device=rt.device).manual_seed(seed * 1_000_003 + r * 7919 + rt.rank)
    ro = sample_rollout(policy, tok, prompts, max_new_tokens, temperature, generator=gen, autocast=rt.autocast,
                        cuda_graph=cuda_graph)
    seq, mask = ro['seq'], ro['mask']
    old_logp = batched_logprobs(policy, seq, mask, rt.autocast)
    ref_logp = batched_logprobs(reference, seq, mask, rt.autocast)
    with rt.autocast():
        old_values = torch.cat([value.values(seq[i:i + 32, :-1]).float() for i in range(0, len(seq), 32)]) * mask
    scores, parts = rewards(prompts, ro, rt.autocast)
    if normalize_reward:
        moments.update(all_ranks(scores))          # every rank's rewards: the same moments everywhere
        scores_used = moments.normalize(scores)
    else:
        scores_used = scores
    token_rewards = per_token_rewards(scores_used, old_logp, ref_logp, mask, kl_ctl.beta)
    adv, returns = gae(token_rewards, old_values, mask, gamma, lam)
    kl = all_ranks(((old_logp - ref_logp) * mask).sum(1)).mean().item()   # sequence KL(pi || ref), k1, all ranks
    stats = {**rollout_stats(scores, parts, ro), 'kl_ref': kl, 'beta': kl_ctl.beta}
    kl_ctl.update(kl, len(prompts) * rt.world_size)
    extra.update(kl_beta=kl_ctl.beta, reward_moments=moments.state_dict())
    buffer.update(index=r, seq=seq, mask=mask, old_logp=old_logp, old_values=old_values,
                  adv=whiten(adv, mask), returns=returns, stats=stats)
    if rt.master and sample_every and r % sample_every == 0:
        append_samples(os.path.join(out_dir, 'samples.md'), f'rollout {r} (step {r * updates_per_rollout})',
                       ('prompt', 'answer', 'reward'),
                       [(p['prompt'], t, f'{x:.3f}') for p, t, x in zip(prompts, ro['texts'], scores.tolist())][:4])
    model.train()


def loss_fn(m, step, micro_step):
    r, u = divmod(step, updates_per_rollout)
    if buffer['index'] != r:
        make_rollout(r)
    epoch, mb = divmod(u, n_minibatches)
    perm = torch.randperm(rollout_prompts, generator=torch.Generator().manual_seed(seed + 31 * r + epoch))
    idx = perm[mb * minibatch_size:(mb + 1) * minibatch_size].to(rt.device)
    idx = idx.chunk(gradient_accumulation_steps)[micro_step] if gradient_accumulation_steps > 1 else idx
    b = {k: buffer[k][idx] for k in ('seq', 'mask', 'old_logp', 'old_values', 'adv', 'returns')}
    length = int(b['mask'].any(0).nonzero().max()) + 2                # trim right padding
    seq, mask = b['seq'][:, :length], b['mask'][:, :length - 1]
    cut = lambda t: t[:, :length - 1]                                  # noqa: E731
    logits, values = m(seq[:, :-1])
    logp = token_logprobs(logits, seq[:, 1:].masked_fill(~mask, -1))
    pg_loss, clip_frac, approx_kl = clipped_policy_loss(logp, cut(b['old_logp']), cut(b['adv']), mask, clip_eps)
    vf_loss = clipped_value_loss(values.float() * mask, cut(b['old_values']), cut(b['returns']), mask, value_clip)
    with torch.no_grad():
        stats = {'policy_loss': pg_loss.detach(), 'value_loss': vf_loss.detach(), 'clip_frac': clip_frac,
                 'approx_kl': approx_kl, 'entropy': entropy(logits.detach(), mask),
                 'explained_variance': explained_variance(values.float() * mask, cut(b['returns']), mask),
                 'tokens': seq.numel(), **buffer['stats']}
    return pg_loss + vf_coef * vf_loss, stats


@torch.no_grad()
def evaluate(m):
    return evaluate_policy(policy, reference, tok, val_prompts, rewards, max_new_tokens, temperature, rt.autocast,
                           seed, cuda_graph)


os.makedirs(out_dir, exist_ok=True)
if not resume and rt.master and os.path.exists(os.path.join(out_dir, 'samples.md')):
    os.remove(os.path.join(out_dir, 'samples.md'))
tokens_per_step = minibatch_size * (max_new_tokens + 64) * rt.world_size
trainer = Trainer(config, rt, model, 'ppo', tok.spec(), tokens_per_step, policy.flops_per_token() * 2,
                  resume=ckpt if resume else None, checkpoint_extra=extra,
                  unused_parameters=True)                # no targets: MTP unused; the value model's LM head too
ckpt = None
trainer.run(loss_fn, evaluate, plot_keys=('train/policy_loss', 'train/value_loss'),
            extra_plots=[(('train/reward', 'train/rule_score', 'train/rule_words', 'train/reward_model_score'),
                          'reward.png', 'reward'),
                         (('train/kl_ref', 'val/kl_ref'), 'kl.png', 'KL(policy || reference), nats')])
close_runtime(rt)
