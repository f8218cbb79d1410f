"""
RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022) on the instruction
task. Each iteration is one rollout and its updates:

    for each rollout:
        answer rollout_prompts training prompts with the policy (sampling, KV cache)
        score the answers (reward= 'rule' | 'model' | 'mix' | 'token:<s>'), normalise the scores
        per-token rewards r_t = -beta (log pi - log ref)_t, the score added on the last token
        advantages and returns by GAE from the value model's estimates; advantages whitened
        for each of ppo_epochs epochs, for each minibatch of answers:
            one optimizer step on PPO's clipped policy loss + vf_coef * its clipped value loss

beta follows an adaptive controller toward kl_target (0: fixed beta).

$ python ppo.py --init_from=out/sft --reward=rule --out_dir=out/ppo
$ python ppo.py --init_from=out/sft --reward=model --reward_model=out/reward --value_init=reward

max_iters, eval_interval, log_interval and warmup_iters count rollouts. Logged per rollout: its
mean reward, rule score, reward-model score, KL to the reference, response length, share of
ended turns and beta; the updates' mean policy and value loss, clip fraction, approximate KL to
the rollout policy, entropy and explained variance. Every eval_interval rollouts: the task score
of greedy answers to held-out prompts and the KL of sampled ones; a table of samples goes to
out_dir/samples.md every sample_every rollouts. The checkpoint holds the policy as 'model' (it
loads like any language model) and the value model beside it.
"""

import os
import sys

import torch

from checkpoint import FROZEN_ROUTING, load_chat_model
from config import configure
from generate import use_cuda_graph
from model import ScalarModel, through_last
from rl import (AdaptiveKL, RunningMoments, append_samples, batched_logprobs, clear_samples,
                clipped_policy_loss, clipped_value_loss, entropy, evaluate_policy, explained_variance, gae,
                load_policy, load_rewards, mean_stats, merged_steps, minibatch_problem,
                per_token_rewards, prompts_of_rollout, read_prompts, response_logprobs, rollout_stats, room_problem,
                sample_rollout, settings_problem, trim_padding, whiten)
from runtime import all_ranks, close_runtime, init_runtime
from training import Run, check_loop_settings

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/ppo'
init_from = 'out/sft'        # the SFT checkpoint: the policy's start and the reference; or 'resume'
eval_interval = 5            # rollouts between evaluations (and checkpoints)
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
normalize_reward = True      # running mean / std normalisation of the sequence rewards
value_init = 'policy'        # the value model's backbone: 'policy' (the SFT model) or 'reward'
# rollouts and updates
rollout_prompts = 64         # answers per rollout
max_new_tokens = 200         # the longest answer a rollout samples (tokens)
temperature = 1.0            # rollouts sample at it; log-probs and KL use softmax(logits / temperature)
cuda_graph = None            # sampling: one-token steps replayed as a CUDA graph; None: on for CUDA
ppo_epochs = 2               # passes over each rollout
minibatch_size = 16          # answers per optimizer step
gradient_accumulation_steps = 1   # micro-batches per minibatch
gamma = 1.0                  # discount of later rewards in the returns (1: none; the reward comes at the end)
lam = 0.95                   # GAE's lambda: 1 is the Monte-Carlo return, 0 one-step bootstrapping
clip_eps = 0.2               # the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps] (PPO)
value_clip = 0.2             # the value's move from its rollout value is clipped to +-value_clip (PPO2's value loss)
vf_coef = 0.5                # weight of the value loss beside the policy loss
kl_beta = 0.05               # KL penalty weight (the start value with kl_target > 0)
kl_target = 0.0              # adaptive KL controller's target (sequence KL, nats); 0: fixed beta
kl_horizon = 10000           # adaptive KL: answers over which beta moves by at most 20% (rl.AdaptiveKL)
whiten_advantages = True     # advantages to zero mean and unit variance over the rollout's tokens
                             # (False: as GAE gives them)
dropout = 0.0
# optimizer and schedule (as in train.py; the schedule counts rollouts)
optimizer = 'adamw'          # 'adamw' | 'muon' | 'muonclip'
learning_rate = 1e-5
min_lr = 1e-6
value_learning_rate = 0.0    # the value model's peak rate (0: learning_rate); it follows the same
                             # schedule. A fresh value head needs more than the policy may move:
                             # at the policy's 2e-5 the story task's values explained none of the
                             # returns' variance in 20 rollouts (explained variance 0.00 throughout)
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
muon_momentum = 0.95
qk_clip_tau = 100.0
lr_schedule = 'cosine'       # 'cosine' | 'wsd' | 'constant'
warmup_iters = 0             # rollouts of linear warm-up to learning_rate
max_iters = 50               # rollouts
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
if value_learning_rate < 0:
    sys.exit(f'error: value_learning_rate={value_learning_rate}; it must be >= 0 (0: learning_rate)')
if value_init not in ('policy', 'reward'):
    sys.exit(f"error: value_init='{value_init}'; valid: policy, reward")
problem = minibatch_problem(rollout_prompts, minibatch_size, gradient_accumulation_steps, 'rollout_prompts')
if problem:
    sys.exit(f'error: {problem}')
problem = settings_problem('ppo', config)
if problem:
    sys.exit(f'error: {problem}')
rt = init_runtime(device, dtype, seed)
cuda_graph = use_cuda_graph(cuda_graph, rt.device_type)

# --- models: the policy and the value model (trained), the frozen reference, the reward ---------
resume = init_from == 'resume'
ckpt, policy, tok, reference, reference_path = load_policy('ppo', init_from, out_dir, rt.device, dropout)
if resume:
    value = ScalarModel(type(policy.config)(**{**ckpt['value_model_config'], 'dropout': dropout}))
    value.load_state_dict(ckpt['value_model'])
else:
    value_source = reward_model if value_init == 'reward' else init_from
    value, value_tok, _ = load_chat_model(value_source, 'cpu', overrides={'dropout': dropout, **FROZEN_ROUTING},
                                          scalar=True)          # (dropout as the policy's: 0, settings_problem)
    if value_tok.spec() != tok.spec():
        sys.exit(f"error: the value model's tokenizer ({value_source}) differs from the policy's")
    if value_init == 'policy':
        # a new head starts at V = 0 for every token. Its random init (std 1/sqrt(d+1) on hidden states
        # whose RMS is the final norm's trained gain) gave values several times the returns' variance
        # (explained variance about -5 for all 20 rollouts of the H200 life cycle), and value_clip
        # lets a rollout move each value by only 0.2, so the noise stays and so do the advantages built on it
        torch.nn.init.zeros_(value.score_head.weight)
policy.to(rt.device)
value.to(rt.device)
rewards = load_rewards(reward, tok, reward_model, reward_mix, no_end_penalty, rt.device)
kl_ctl = AdaptiveKL(ckpt.get('kl_beta', kl_beta) if resume else kl_beta, kl_target, kl_horizon)
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
         'data_dir': ckpt.get('data_dir', ''), 'kl_beta': kl_ctl.beta, 'reward_moments': moments.state_dict()}
# one optimizer over the policy and the value model; DDP, torch.compile; the resumed state
# training FLOPs a token: the policy's and the value model's forward and backward (no MTP modules run here)
flops_per_token = policy.flops_per_token(mtp=False) + value.flops_per_token(mtp=False)
run = Run(config, rt, policy, 'ppo', tok.spec(), flops_per_token, resume=ckpt if resume else None,
          checkpoint_extra=extra, also_train=value, also_train_lr=value_learning_rate,
          unused_parameters=True)             # no targets: MTP unused; the value model's LM head too
ckpt = None


@torch.no_grad()
def make_rollout(r):
    """Rollout r: answers to rollout_prompts prompts (a function of (seed, r, rank) and the
    current weights), their rewards, and per answer token the log-probabilities under the policy
    and the reference, the value estimates, advantages (GAE, whitened) and returns."""
    policy.eval()
    value.eval()
    prompts, gen = prompts_of_rollout(train_prompts, rollout_prompts, seed, r, rt.rank, rt.device)
    ro = sample_rollout(policy, tok, prompts, max_new_tokens, temperature, generator=gen, autocast=rt.autocast,
                        cuda_graph=cuda_graph)
    seq, mask = ro['seq'], ro['mask']
    old_logp = batched_logprobs(policy, seq, mask, rt.autocast, temperature=temperature, vocab=tok.vocab_size)
    ref_logp = batched_logprobs(reference, seq, mask, rt.autocast, temperature=temperature, vocab=tok.vocab_size)
    with rt.autocast():   # V[:, t]: the value of the state seq[:, :t + 1], aligned with the log-prob columns
        old_values = torch.cat([value.values(seq[i:i + 32, :-1]).float() for i in range(0, len(seq), 32)]) * mask
    scores, parts = rewards(prompts, ro, rt.autocast)
    if normalize_reward:
        moments.update(all_ranks(scores))      # every rank's rewards: the same moments everywhere
    # r_t = -beta (log pi - log ref)_t, plus the (normalised) score on the answer's last token
    token_rewards = per_token_rewards(moments.normalize(scores) if normalize_reward else scores,
                                      old_logp, ref_logp, mask, kl_ctl.beta)
    # delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns R_t = A_t + V_t
    adv, returns = gae(token_rewards, old_values, mask, gamma, lam)
    kl = all_ranks(((old_logp - ref_logp) * mask).sum(1)).mean().item()   # sequence KL(pi || ref), k1
    stats = {**rollout_stats(scores, parts, ro), 'kl_ref': kl, 'beta': kl_ctl.beta}
    kl_ctl.update(kl, len(prompts) * rt.world_size)
    extra.update(kl_beta=kl_ctl.beta, reward_moments=moments.state_dict())
    if rt.master and sample_every and r % sample_every == 0:
        append_samples(os.path.join(out_dir, 'samples.md'), f'rollout {r}', ('prompt', 'answer', 'reward'),
                       [(p['prompt'], t, f'{x:.3f}') for p, t, x in zip(prompts, ro['texts'], scores.tolist())][:4])
    policy.train()
    value.train()
    return {'seq': seq, 'mask': mask, 'old_logp': old_logp, 'old_values': old_values,
            'adv': whiten(adv, mask) if whiten_advantages else adv, 'returns': returns}, stats


def ppo_loss(b):
    """The loss of a minibatch b of the rollout: PPO's clipped surrogate + vf_coef * the clipped
    value loss, over response tokens; with the update's statistics."""
    b = trim_padding(b)
    mask = b['mask']
    logp, logits = response_logprobs(run.model, b['seq'], mask, temperature, tok.vocab_size)
    values = run.also(b['seq'][:, :-1], values=True, counted=through_last(mask)).float() * mask
    # -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi / pi_old; and 0.5 max((V - R)^2, (V_clipped - R)^2)
    pg_loss, clip_frac, approx_kl = clipped_policy_loss(logp, b['old_logp'], b['adv'], mask, clip_eps)
    vf_loss = clipped_value_loss(values, b['old_values'], b['returns'], mask, value_clip)
    with torch.no_grad():
        stats = {'policy_loss': pg_loss.detach(), 'value_loss': vf_loss.detach(), 'clip_frac': clip_frac,
                 'approx_kl': approx_kl, 'entropy': entropy(logits.detach(), mask),
                 'explained_variance': explained_variance(values, b['returns'], mask)}
    return pg_loss + vf_coef * vf_loss, stats, b['seq'].numel()


# --- the training loop: a rollout, then epochs of minibatch updates ------------------------------
plots = [(('train/policy_loss', 'train/value_loss'), 'loss.png', 'loss'),
         (('train/reward', 'train/rule_score', 'train/rule_words', 'train/reward_model_score'), 'reward.png', 'reward'),
         (('train/kl_ref', 'val/kl_ref'), 'kl.png', 'KL(policy || reference), nats')]
r = run.step                                  # rollouts done: 0, or where a resumed run stopped


def evaluate(_):
    return evaluate_policy(policy, reference, tok, val_prompts, rewards, max_new_tokens, temperature, rt.autocast,
                           seed, cuda_graph)


while run.evaluate(r, evaluate, plots):       # every eval_interval rollouts: evaluate, plot, save
    lr = run.set_lr(r)
    buffer, stats_of_rollout = make_rollout(r)
    losses, updates, outs, tokens = [], [], [], 0
    for epoch in range(ppo_epochs):                # passes over the rollout, in shuffled minibatches
        order = torch.randperm(rollout_prompts, generator=torch.Generator().manual_seed(seed + 31 * r + epoch))
        for idx in order.to(rt.device).split(minibatch_size):   # one optimizer step per minibatch
            parts = torch.tensor_split(idx, gradient_accumulation_steps)   # equal micro-batches (minibatch_problem)
            # ppo_loss is a mean over a micro-batch's response tokens: each counts by its share of
            # the minibatch's, so the step's loss is their mean whatever the accumulation
            share = run.token_share_weights([buffer['mask'][part].sum() for part in parts])
            loss, stats = 0.0, {}
            for micro, part in enumerate(parts):
                with run.sync(micro):              # DDP reduces gradients on the last micro-step only
                    with rt.autocast():
                        micro_loss, micro_stats, n = ppo_loss({k: v[part] for k, v in buffer.items()})
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
