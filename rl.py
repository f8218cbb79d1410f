"""
What PPO (ppo.py) and GRPO (grpo.py) share, in one place (with reward.py: the reward model's
input and its word checks): loading the policy, the frozen reference and the reward, rollouts
(batched KV-cache sampling of answers to task prompts), per-token log-probabilities under the
policy and the reference, rewards (the task rule, the reward model, a mix, or a toy), running
reward normalisation, GAE, the clipped policy and value losses, KL estimators, the adaptive KL
controller and the held-out evaluation.

Layout of a rollout: each row is prompt + response (+ the stop token it sampled: <|end|> or EOT),
right-padded; per-token tensors have one column less and are aligned with the targets
seq[:, 1:], so column t holds what is known about generating token t + 1. `mask` is True on the
columns whose target is a response token.
"""

import contextlib
import math
import os
import sys

import torch

from checkpoint import FROZEN_ROUTING, load_chat_model, load_checkpoint
from data import read_prepared
from generate import generate_chat
from model import through_last, token_logprobs
from task import evaluate_task, prompt_word_spans, score, word_used, words_of


# --- the models and the prompts ---------------------------------------------------------------------

def load_policy(stage, init_from, out_dir, device, dropout):
    """(checkpoint, policy on the CPU, tokenizer with the chat template, the frozen reference on
    `device`, the reference's path) for ppo.py / grpo.py: the policy starts from init_from (the
    SFT model), which is also the reference; with init_from='resume' it continues out_dir and
    the reference is the one that run named."""
    if init_from == 'scratch':
        sys.exit(f"error: {stage}.py starts from a fine-tuned model: set init_from='out/sft' (or 'resume')")
    source = out_dir if init_from == 'resume' else init_from
    ckpt = load_checkpoint(source)
    reference_path = ckpt['reference'] if init_from == 'resume' else source
    policy, tok, ckpt = load_chat_model(source, 'cpu', ckpt, overrides={'dropout': dropout, **FROZEN_ROUTING})
    reference, _, _ = load_chat_model(reference_path, device)
    reference.eval().requires_grad_(False)
    return ckpt, policy, tok, reference, reference_path


def load_rewards(kind, tok, reward_model, mix, no_end_penalty, device):
    """Rewards(kind, ...) with its reward model loaded (frozen) where kind needs one."""
    rm = None
    if kind in ('model', 'mix'):
        rm, rm_tok, _ = load_chat_model(reward_model, device, scalar=None)   # as saved (Rewards checks it)
        if rm_tok.spec() != tok.spec():
            sys.exit(f"error: the reward model's tokenizer ({reward_model}) differs from the policy's")
        rm.eval().requires_grad_(False)
    try:
        return Rewards(kind, tok, rm, mix, no_end_penalty)
    except ValueError as e:
        sys.exit(f'error: {e}')


def reward_input(tok, config, ids, prompt, block_size):
    """What a reward model reads: ids (the prompt's chat turn and the answer, tok.encode_chat), and
    with config.score_reread the prompt once more after them, as a second user turn. In a causal
    model the prompt's tokens cannot see the answer; read again after it, each of them can look back
    for itself there (is the word the prompt asks for in the answer?), and the score, read at the
    end, comes right after those checks instead of having to gather prompt and answer from one
    position (the echo embeddings of Springer et al. 2024 do the same for sentence embeddings).
    At most block_size ids: a long answer loses its end, never the reread."""
    suffix = [tok.chat_id('user')] + tok.encode(prompt) + [tok.chat_id('end')] if config.score_reread else []
    return list(ids)[:block_size - len(suffix)] + suffix


def reread_word_checks(tok, ids, seq, prompt, words, answer):
    """Where a reward model that rereads the prompt (seq = reward_input(..., ids, prompt, ...)) can
    check each required word, and the check's label: [(position in seq, 1.0 if the answer uses the
    word else 0.0)], one per word of `words`, at the word's last token in the reread prompt (there
    the model has read the whole word and can look back for it in the answer). task.word_used
    decides the label, as the rule does. [] for an answer reward_input cut short (a word of its
    lost tail would be labelled used with nothing to look back at); a word the tokenizer merges
    with the text after it (its tokens are not a prefix of the prompt's) or that the prompt does
    not list is left out."""
    prompt_ids = tok.encode(prompt)
    if len(seq) != len(ids) + len(prompt_ids) + 2:   # + <|user|> ... <|end|>: the answer was cut
        return []
    first = len(seq) - 1 - len(prompt_ids)        # the reread prompt: seq[first:-1] (then <|end|>)
    answer_words = words_of(answer)
    checks = []
    for w, span in zip(words, prompt_word_spans(prompt, words)):
        if span is None:
            continue
        through = tok.encode(prompt[:span[1]])     # the prompt's tokens through the word
        if through == prompt_ids[:len(through)]:
            checks.append((first + len(through) - 1, float(word_used(w, answer_words))))
    return checks


def right_padded(seqs, pad_id, device):
    """x (N, T): token-id sequences right-padded with pad_id; last (N,): each one's last position,
    where a reward model reads its score. Both on `device`."""
    x = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x.to(device), torch.tensor([len(s) - 1 for s in seqs], device=device)


def read_prompts(task_dir, n_val):
    """(training prompts for rollouts, the first n_val held-out prompts for evaluation)."""
    hint = 'run python prepare/tinystories_instruct.py (or set task_dir=)'
    train = read_prepared(task_dir, 'prompts_train.jsonl', ('prompt', 'words'), hint)
    val = read_prepared(task_dir, 'prompts_val.jsonl', ('prompt', 'words'), hint)[:n_val]
    return train, val


def prompts_of_rollout(prompts, n, seed, r, rank, device):
    """The n training prompts of rollout r on this rank, and a generator on `device` for sampling
    their answers: functions of (seed, r, rank), so a resumed run draws the same ones."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + r * 7919 + rank)
    chosen = [prompts[int(i)] for i in torch.randint(len(prompts), (n,), generator=g)]
    return chosen, torch.Generator(device=device).manual_seed(seed * 1_000_003 + r * 7919 + rank)


def clear_samples(out_dir, resume, master):
    """A fresh out_dir/samples.md (the tables of sample answers) unless resuming."""
    os.makedirs(out_dir, exist_ok=True)
    if not resume and master and os.path.exists(os.path.join(out_dir, 'samples.md')):
        os.remove(os.path.join(out_dir, 'samples.md'))


# --- rollouts -----------------------------------------------------------------------------------

@torch.no_grad()
def sample_rollout(policy, tok, prompts, max_new_tokens, temperature=1.0, generator=None,
                   autocast=None, batch_size=64, cuda_graph=False):
    """Answer every prompt (dicts with 'prompt') once with the policy. Returns a dict with
    seq (N, L) prompt + response [+ the stop token it sampled, <|end|> or EOT] right-padded,
    mask (N, L-1), texts, ended, lengths. Sampled from the whole softmax at `temperature` (no
    top-k or top-p), the distribution whose log-probs response_logprobs computes: on-policy.
    cuda_graph: decode through a captured one-token step (generate.generate_chat)."""
    autocast = autocast or contextlib.nullcontext
    answers = generate_chat(policy, tok, [p['prompt'] for p in prompts], max_new_tokens, temperature,
                            batch_size=batch_size, autocast=autocast, generator=generator,
                            cuda_graph=cuda_graph)
    rows, masks = [], []
    for p, a in zip(prompts, answers):
        prompt_ids = tok.encode_chat(p['prompt'])[0]
        response = a['ids'] + ([a['stop']] if a['stop'] is not None else [])   # trained on what it sampled
        rows.append(prompt_ids + response)
        masks.append([False] * (len(prompt_ids) - 1) + [True] * len(response))
    L = max(len(r) for r in rows)
    seq = torch.full((len(rows), L), tok.eot_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L - 1), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        seq[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m)
    device = next(policy.parameters()).device
    return {'seq': seq.to(device), 'mask': mask.to(device), 'texts': [a['text'] for a in answers],
            'ended': [a['ended'] for a in answers], 'lengths': [len(a['ids']) for a in answers]}


def trim_padding(b):
    """A minibatch of a rollout without the right padding that no answer in it reaches: with j the
    last column any answer's mask covers (mask[:, j] marks whether seq[:, j + 1] is a response
    token), seq keeps j + 2 columns and every per-token tensor (mask, old log-probs, advantages,
    values, returns: one column fewer than seq) keeps j + 1."""
    length = int(b['mask'].any(0).nonzero().max()) + 2
    return {k: v[:, :length] if k == 'seq' else v[:, :length - 1] for k, v in b.items()}


def response_logprobs(model, seq, mask, temperature=1.0, vocab=None):
    """(N, L-1) log p(token) of the response tokens under `model` sampling at `temperature` over
    the tokenizer's `vocab` ids (softmax(logits[:vocab] / T): the distribution the rollout was drawn
    from, so that the ratios and the KL are on-policy), 0 elsewhere; the logits returned too (for
    the entropy)."""
    logits, _ = model(seq[:, :-1], counted=through_last(mask))   # the padding is no expert load
    logits = logits[..., :vocab]                         # without the padding ids, never sampled
    if temperature != 1.0:
        logits = logits / temperature
    targets = seq[:, 1:].masked_fill(~mask, -1)
    return token_logprobs(logits, targets), logits


@torch.no_grad()
def batched_logprobs(model, seq, mask, autocast, batch_size=32, temperature=1.0, vocab=None):
    """response_logprobs of a rollout's rows, batch_size rows at a time, without gradients."""
    out = []
    for i in range(0, seq.size(0), batch_size):
        with autocast():
            lp, _ = response_logprobs(model, seq[i:i + batch_size], mask[i:i + batch_size], temperature, vocab)
        out.append(lp.float())
    return torch.cat(out)


def rollout_stats(scores, parts, rollout):
    """What every rollout logs: its mean reward, the rule's and the reward model's mean scores
    (side by side, to catch reward hacking), answer length and the share of ended turns."""
    n = len(rollout['lengths'])
    stats = {'reward': scores.mean().item(), 'response_tokens': sum(rollout['lengths']) / n,
             'ended': sum(rollout['ended']) / n}
    if parts['rule'] is not None:
        stats['rule_score'] = parts['rule'].mean().item()
        stats['rule_words'] = parts['words'].mean().item()     # the rule's largest part (0.6 of it)
    if parts['model'] is not None:
        stats['reward_model_score'] = parts['model'].mean().item()
    return stats


def append_samples(path, title, columns, rows):
    """Append a markdown table of sample answers (rows of prompt, answer, numbers...) to path."""
    cell = lambda x: x.replace('|', '/').replace('\n', ' ')[:300] if isinstance(x, str) else x   # noqa: E731
    with open(path, 'a') as f:
        f.write(f'\n## {title}\n\n| ' + ' | '.join(columns) + ' |\n|' + ' --- |' * len(columns) + '\n')
        for row in rows:
            f.write('| ' + ' | '.join(str(cell(x)) for x in row) + ' |\n')


@torch.no_grad()
def evaluate_policy(policy, reference, tok, prompts, rewards, max_new_tokens, temperature, autocast, seed,
                    cuda_graph=False):
    """The held-out evaluation of PPO and GRPO: the task score of greedy answers, then sampled
    answers (seeded) scored by the rewards, with their KL(policy || reference) per answer (k1)."""
    if not prompts:
        return {}
    r = evaluate_task(policy, tok, prompts, max_new_tokens, 0.0, autocast=autocast, seed=seed,
                      cuda_graph=cuda_graph)
    metrics = {'task/score_greedy': r['score'], 'task/all_words_greedy': r['all_words'],
               'task/words_greedy': r['words']}
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ro = sample_rollout(policy, tok, prompts, max_new_tokens, temperature, generator=gen, autocast=autocast,
                        cuda_graph=cuda_graph)
    lp = batched_logprobs(policy, ro['seq'], ro['mask'], autocast, temperature=temperature, vocab=tok.vocab_size)
    ref = batched_logprobs(reference, ro['seq'], ro['mask'], autocast, temperature=temperature, vocab=tok.vocab_size)
    # the sequence KL(pi || ref) by the k1 estimator: the mean over sampled answers of their summed
    # log-ratio. Unbiased, but one answer's can be below 0, so a mean over few can be too (the loss's
    # k3 estimator, rl.kl_k3, is >= 0 per token)
    metrics['val/kl_ref'] = ((lp - ref) * ro['mask']).sum(1).mean().item()
    scores, parts = rewards(prompts, ro, autocast)
    metrics['val/reward_sampled'] = scores.mean().item()
    if parts['model'] is not None:
        metrics['val/reward_model_score'] = parts['model'].mean().item()
    if parts['rule'] is not None:
        metrics['val/rule_score_sampled'] = parts['rule'].mean().item()
        metrics['val/words_sampled'] = parts['words'].mean().item()
    return metrics


REWARD_KINDS = ('rule', 'model', 'mix')        # and 'token:<text>', a toy


def settings_problem(stage, c):
    """Why ppo.py / grpo.py (stage) cannot run with the settings c; None if they can. Checked
    before any model is read; keys one of the two scripts lacks are skipped."""
    if c['fsdp']:
        return (f'{stage}.py does not support fsdp=True: each rank samples its own rollouts, whose lengths '
                'differ, while a sharded model needs every rank in each forward pass; use DDP (the default)')
    if c['temperature'] <= 0:
        return f"temperature={c['temperature']} must be positive (RL samples its rollouts)"
    if c['dropout'] > 0:   # the old log-probs come from eval mode: the first ratio would not be 1
        return (f"dropout={c['dropout']}: the policy ratio compares training-mode log-probs with the rollout's "
                f"(eval mode, no dropout), so it would not start at 1; set dropout=0")
    if c['reward'] not in REWARD_KINDS and not c['reward'].startswith('token:'):
        return f"reward={c['reward']!r}; valid: {', '.join(REWARD_KINDS)}, token:<text>"
    if not 0 <= c['clip_eps'] < 1:                    # the ratio's clip range [1 - eps, 1 + eps]
        return f"clip_eps={c['clip_eps']} must be in [0, 1)"
    for key in ('gamma', 'lam', 'reward_mix'):        # a discount, GAE's lambda, a mixing weight
        if key in c and not 0 <= c[key] <= 1:
            return f'{key}={c[key]} must be between 0 and 1'
    for key in ('value_clip', 'vf_coef', 'kl_beta', 'kl_target', 'beta', 'no_end_penalty'):
        if key in c and c[key] < 0:
            return f'{key}={c[key]} must be 0 or more'
    for key in ('ppo_epochs', 'grpo_epochs', 'max_new_tokens', 'kl_horizon', 'rollout_prompts'):
        if key in c and c[key] < 1:
            return f'{key}={c[key]} must be 1 or more'
    return None


def room_problem(tok, prompts, max_new_tokens, block_size):
    """Why the longest prompt (in the chat template) + max_new_tokens would not fit the model's
    block_size (generation would then restart from the window's second half, which the log-probs of
    the whole sequence do not see); None if it fits."""
    longest = max(len(tok.encode_chat(p['prompt'])[0]) for p in prompts)
    if longest + max_new_tokens > block_size:
        return (f'the longest prompt is {longest} tokens; with max_new_tokens={max_new_tokens} a rollout '
                f'would pass the model\'s block_size {block_size}: set max_new_tokens={block_size - longest} '
                f'or less')
    return None


def minibatch_problem(n_answers, minibatch_size, gradient_accumulation_steps, what):
    """Why a rollout of n_answers (named `what`) cannot be cut into minibatches of minibatch_size
    answers, each into gradient_accumulation_steps equal micro-batches; None if it can."""
    if not 1 <= minibatch_size <= n_answers:
        return f'minibatch_size={minibatch_size} must be between 1 and {what} = {n_answers}'
    if gradient_accumulation_steps > 1 and (minibatch_size % gradient_accumulation_steps
                                            or n_answers % minibatch_size):
        return (f'with gradient_accumulation_steps={gradient_accumulation_steps}, minibatch_size='
                f'{minibatch_size} must be a multiple of it and divide {what} = {n_answers}, so that every '
                f'minibatch makes that many equal micro-batches')
    return None


def merged_steps(outs):
    """The outputs of one rollout's optimizer steps (Run.optimizer_step) as one, for Run.log: the
    mean gradient norm and the expert loads summed over the steps (each step's are counted from the
    step before), the rest the last step's."""
    out = dict(outs[-1])
    norms = [o['grad_norm'] for o in outs if o.get('grad_norm') is not None]
    if norms:
        out['grad_norm'] = torch.stack([torch.as_tensor(n, dtype=torch.float32) for n in norms]).mean()
    loads = [o['loads'] for o in outs if o.get('loads') is not None]
    if loads:
        out['loads'] = torch.stack(loads).sum(0)
    return out


def mean_stats(rows):
    """{name: mean over rows} of a list of {name: 0-d tensor} (one per update), on the device."""
    return {k: torch.stack([row[k] for row in rows]).mean() for k in rows[0]}


# --- rewards ------------------------------------------------------------------------------------

class Rewards:
    """Sequence rewards for a rollout. kind: 'rule' (task.score), 'model' (a reward.py model,
    read at the last token), 'mix' (mix * model + (1 - mix) * rule), or 'token:<s>' (a toy: the
    share of response tokens that are the single token <s>). A turn that did not end loses
    no_end_penalty. Returns (rewards (N,), {'rule': scores or None, 'model': scores or None,
    'words': the rule's share of required words used, or None})."""

    def __init__(self, kind, tok, reward_model=None, mix=0.5, no_end_penalty=0.0):
        self.kind, self.tok, self.reward_model = kind, tok, reward_model
        self.mix, self.no_end_penalty = mix, no_end_penalty
        if kind.startswith('token:'):
            ids = tok.encode(kind[len('token:'):])
            if len(ids) != 1:
                raise ValueError(f"reward='{kind}': '{kind[len('token:'):]}' must be one token, it is {len(ids)}")
            self.token = ids[0]
        elif kind not in REWARD_KINDS:
            raise ValueError(f"reward='{kind}'; valid: {', '.join(REWARD_KINDS)}, token:<text>")
        if kind in ('model', 'mix') and reward_model is None:
            raise ValueError(f"reward='{kind}' needs a reward model (reward_model=out/reward)")

    @torch.no_grad()
    def __call__(self, prompts, rollout, autocast, batch_size=32):
        device = rollout['seq'].device
        rule = model_scores = None
        words = None
        if self.kind in ('rule', 'mix'):
            checks = [score(t, p['words'], p.get('features'), e)
                      for t, p, e in zip(rollout['texts'], prompts, rollout['ended'])]
            rule = torch.tensor([x['score'] for x in checks], device=device)
            words = torch.tensor([x['words'] for x in checks], device=device)  # share of required words used
        if self.kind in ('model', 'mix'):
            seq, mask = rollout['seq'], rollout['mask']
            last = mask.shape[1] - mask.flip(1).float().argmax(1)    # seq's index of the last response token
            last = torch.where(mask.any(1), last, torch.zeros_like(last))
            # an answer that stopped at EOT is read at the token before it: reward.py encodes an answer
            # without <|end|> with no stop token after it (encode_chat, ended=False)
            last = last - ((seq.gather(1, last[:, None])[:, 0] == self.tok.eot_id) & mask.any(1)).long()
            rm_config = self.reward_model.config
            if rm_config.score_reread:                                # + the prompt again (reward_input)
                seq, last = right_padded([reward_input(self.tok, rm_config, seq[i, :j + 1].tolist(), p['prompt'],
                                                       rm_config.block_size)
                                          for i, (j, p) in enumerate(zip(last.tolist(), prompts))],
                                         self.tok.eot_id, device)
            outs = []
            for i in range(0, seq.size(0), batch_size):
                with autocast():
                    outs.append(self.reward_model(seq[i:i + batch_size], last=last[i:i + batch_size]).float())
            model_scores = torch.cat(outs)
        if self.kind == 'rule':
            r = rule.clone()
        elif self.kind == 'model':
            r = model_scores.clone()
        elif self.kind == 'mix':
            r = self.mix * model_scores + (1 - self.mix) * rule
        else:
            hits = ((rollout['seq'][:, 1:] == self.token) & rollout['mask']).sum(1).float()
            r = hits / rollout['mask'].sum(1).clamp(min=1)
        ended = torch.tensor(rollout['ended'], device=device)
        r = r - self.no_end_penalty * (~ended).float()
        return r, {'rule': rule, 'model': model_scores, 'words': words}


class RunningMoments:
    """Running mean and standard deviation of every value seen (Chan et al.'s parallel update),
    for reward normalisation: r' = (r - mean) / std."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x):
        x = x.double().flatten()
        n_b, mean_b = x.numel(), x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        delta, n = mean_b - self.mean, self.n + n_b
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta ** 2 * self.n * n_b / n
        self.n = n

    @property
    def std(self):
        return math.sqrt(self.m2 / self.n) if self.n > 1 else 1.0

    def normalize(self, x):
        return (x - self.mean) / (self.std + 1e-8)

    def state_dict(self):
        return {'n': self.n, 'mean': self.mean, 'm2': self.m2}

    def load_state_dict(self, s):
        self.n, self.mean, self.m2 = s['n'], s['mean'], s['m2']


# --- advantages ---------------------------------------------------------------------------------

def masked_mean(x, mask, dim=None):
    mask = mask.float()
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x, mask):
    """Advantages to zero mean and unit variance over the masked entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) / (var.sqrt() + 1e-8)) * mask


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2016), over each row's response columns:
        delta_t = r_t + gamma V_{t+1} - V_t      (V after the last response token = 0)
        A_t = delta_t + gamma lambda A_{t+1},    returns R_t = A_t + V_t.
    rewards, values, mask: (N, T); 0 outside the mask."""
    T = rewards.size(1)
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    m = mask.float()
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * m[:, t]
        next_adv = adv[:, t]
        next_value = values[:, t] * m[:, t]
    return adv, (adv + values) * m


def per_token_rewards(seq_rewards, logp, ref_logp, mask, beta):
    """PPO's reward stream: r_t = -beta (log pi - log ref)_t on every response token (a KL
    penalty, the k1 estimator), plus the sequence reward on its last response token. In a reward
    (which the policy gradient treats as fixed) k1 is the estimator whose expected gradient is that
    of KL(pi || ref); k3 there estimates the KL's value without bias but not its gradient. GRPO puts
    k3 in its loss instead, where its expected gradient is that of the reverse KL(ref || pi): a pull
    toward the reference all the same, but not of the KL it estimates (Tang & Munos 2025)."""
    r = -beta * (logp - ref_logp) * mask
    last = mask.shape[1] - 1 - mask.flip(1).float().argmax(1)
    r[torch.arange(r.size(0)), last] += seq_rewards
    return r


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """GRPO's advantages of rewards (N,), the N / group_size groups in adjacent rows:
        A_i = (r_i - mean of its group) / (std of its group + eps)     (scale=False: r_i - mean)
    with the sample std (G - 1 in the denominator, torch's default; DeepSeekMath's formula does not
    say which). Returns (A (N,), (N / group_size,) True where a group's rewards are all equal: its
    advantages are all 0, it teaches nothing)."""
    g = rewards.view(-1, group_size)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True) + eps)
    return adv.flatten(), (g.std(1) == 0)


# --- losses and statistics ----------------------------------------------------------------------

LOSS_AGGREGATIONS = ('token', 'sequence', 'constant')


def aggregate(x, mask, how='token', length=None):
    """A per-token loss x (B, T) over the response tokens (mask) as one number:
      'token'     the mean over every response token of the batch: each token weighs the same
                  (PPO; DAPO's token-level loss, Yu et al. 2025)
      'sequence'  each answer's mean over its tokens, then the mean over the answers: each answer
                  weighs the same, so a token of a short answer weighs more than one of a long
                  answer (GRPO, Shao et al. 2024)
      'constant'  each answer's sum over its tokens / length (a constant: the longest answer a
                  rollout samples), then the mean over the answers: no bias by length (Dr. GRPO,
                  Liu et al. 2025)"""
    if how == 'token':
        return masked_mean(x, mask)
    if how == 'sequence':
        return masked_mean(masked_mean(x, mask, dim=1), mask.any(1))
    if how == 'constant':
        return (x * mask).sum() / (mask.size(0) * length)
    raise ValueError(f"unknown aggregation {how!r}: one of {', '.join(LOSS_AGGREGATIONS)}")


def clipped_policy_loss(logp, old_logp, adv, mask, eps=0.2, eps_high=None, agg='token', length=None):
    """PPO's clipped surrogate (Schulman et al. 2017):
        L = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A),   rho = exp(log pi - log pi_old),
    whose gradient is zero where the ratio has left the trust region in A's favour. eps_high (None:
    eps) above eps lets unlikely tokens with A > 0 grow further (DAPO's clip-higher). Aggregated
    over the response tokens as `agg` says (aggregate). Returns (loss, clip fraction: the share of
    response tokens whose gradient the clip took away, approximate KL(old || new))."""
    eps_high = eps if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped_term = ratio * adv, ratio.clamp(1 - eps, 1 + eps_high) * adv
    loss = -aggregate(torch.minimum(unclipped, clipped_term), mask, agg, length)
    clipped = (clipped_term < unclipped) & mask         # the min took the clipped term: no gradient there
    # k2 = (log r)^2 / 2, Schulman's low-variance estimator of KL(old || new): a statistic, no gradient
    approx_kl = masked_mean(0.5 * (logp.detach() - old_logp) ** 2, mask)
    return loss, clipped.float().sum() / mask.float().sum().clamp(min=1), approx_kl


def clipped_value_loss(values, old_values, returns, mask, eps=0.2):
    """0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2), over response tokens."""
    clipped = old_values + (values - old_values).clamp(-eps, eps)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_k3(logp, ref_logp):
    """Per-token KL(pi || ref) by the k3 estimator (Schulman 2020), unbiased and >= 0:
    exp(log ref - log pi) - (log ref - log pi) - 1. As a loss (GRPO's), differentiated at tokens
    sampled from pi, its expected gradient is that of KL(ref || pi), the reverse KL: d k3 = (1 -
    ref/pi) d log pi, and E_pi[(1 - ref/pi) d log pi] = -sum ref d log pi (Tang & Munos 2025);
    k2 = (log pi - log ref)^2 / 2 would give KL(pi || ref)'s."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def entropy(logits, mask):
    """Mean entropy of the next-token distribution over response positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over response tokens: 1 for a perfect value function."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return 1 - var_d / var_r.clamp(min=1e-8)


class AdaptiveKL:
    """Ziegler et al. (2019): move beta so the measured KL tracks `target`:
        beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
    after each rollout of n sequences; fixed when target is 0."""

    def __init__(self, beta, target=0.0, horizon=10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n):
        if self.target > 0:
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + err * n / self.horizon
        return self.beta
