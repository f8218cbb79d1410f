"""
Reward model: the SFT model's backbone plus a scalar head read at the last token of
prompt + response, trained on preference pairs (prepare/preferences.py) with the Bradley-Terry
loss  -log sigmoid(r_chosen - r_rejected)  (or loss='margin': max(0, m - (r_chosen - r_rejected))).
ppo.py and grpo.py load its checkpoint as the reward.

$ python prepare/preferences.py --init_from=out/sft
$ python reward.py --init_from=out/sft --out_dir=out/reward

Every eval_interval steps it logs: held-out pair accuracy and loss; the length bias (Pearson
correlation of reward with response length, beside the rule score's own); and the rank
correlation between reward and rule score on fresh samples of the SFT model for held-out prompts.
Schedule, optimizer, logging, checkpoints and resume: common.Trainer, as in train.py.
"""

import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from common import (Trainer, close_runtime, configure, evaluate_task, init_runtime,
                    load_chat_model, load_checkpoint, rank_correlation, read_jsonl, training_defaults)

# -----------------------------------------------------------------------------
# default config values (and those of common.training_defaults(): optimizer, schedule, logging)
out_dir = 'out/reward'
init_from = 'out/sft'        # the SFT checkpoint whose backbone starts the reward model, or 'resume'
prefs_dir = 'data/prefs'     # prefs_train.jsonl, prefs_val.jsonl
task_dir = 'data/tinystories_instruct'   # prompts_val.jsonl for the fresh samples
loss = 'bt'                  # 'bt' (Bradley-Terry) | 'margin' (margin ranking)
ranking_margin = 1.0         # m of the margin ranking loss
batch_size = 16              # pairs per micro-batch
block_size = 0               # 0: the model's block_size
learning_rate = 3e-5
min_lr = 3e-6
weight_decay = 0.0
warmup_iters = 20
max_iters = 500
eval_interval = 50
n_fresh = 128                # fresh samples (SFT model, held-out prompts) for the rank correlation
fresh_temperature = 1.0
max_new_tokens = 300
dropout = 0.0
# -----------------------------------------------------------------------------
config = configure(globals(), defaults=training_defaults())
# (configure() also defines every training_defaults() key as a global here)
# -----------------------------------------------------------------------------
if loss not in ('bt', 'margin'):
    sys.exit(f"error: loss='{loss}'; valid: bt, margin")
if init_from == 'scratch':
    sys.exit("error: reward.py starts from a fine-tuned model: set init_from='out/sft' (or 'resume')")
rt = init_runtime(device, dtype, seed)
source = out_dir if init_from == 'resume' else init_from
ckpt = load_checkpoint(source)
parent = ckpt.get('parent', source) if init_from == 'resume' else source   # the SFT model
model, tok, ckpt = load_chat_model(source, 'cpu', ckpt, overrides={'dropout': dropout}, scalar=True)
model.to(rt.device)
block_size = block_size or model.config.block_size

# --- data: each pair -> the chosen and the rejected sequence, and where each one ends -----------
hint = 'run python prepare/preferences.py'
train_pairs = read_jsonl(os.path.join(prefs_dir, 'prefs_train.jsonl'), ('prompt', 'chosen', 'rejected'), hint)
val_pairs = read_jsonl(os.path.join(prefs_dir, 'prefs_val.jsonl'), ('prompt', 'chosen', 'rejected'), hint)


def encode(pair, side):
    ids, _ = tok.encode_chat(pair['prompt'], pair[side], ended=pair.get(f'{side}_ended', True))
    return ids[:block_size]


def batch(pairs):
    """x (2B, T): the chosen sequences then the rejected ones, right-padded; last (2B,): the
    position of each sequence's last token, where the reward is read."""
    seqs = [encode(p, 'chosen') for p in pairs] + [encode(p, 'rejected') for p in pairs]
    x = torch.full((len(seqs), max(map(len, seqs))), tok.eot_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    last = torch.tensor([len(s) - 1 for s in seqs])
    return x.to(rt.device), last.to(rt.device)


def pair_loss(r_chosen, r_rejected):
    diff = r_chosen - r_rejected
    if loss == 'bt':
        return -F.logsigmoid(diff).mean()                 # Bradley-Terry: P(chosen > rejected) = sigma(diff)
    return F.relu(ranking_margin - diff).mean()


def loss_fn(model, step, micro_step):
    g = trainer.batch_generator(step, micro_step)
    pairs = [train_pairs[int(i)] for i in torch.randint(len(train_pairs), (batch_size,), generator=g)]
    x, last = batch(pairs)
    rc, rr = model(x, last=last).chunk(2)
    return pair_loss(rc, rr), {'accuracy': (rc > rr).float().mean().detach(),
                               'reward_margin': (rc - rr).mean().detach(), 'tokens': x.numel()}


@torch.no_grad()
def rewards_of(model, seqs_last):
    out = []
    for i in range(0, len(seqs_last), 2 * batch_size):
        chunk = seqs_last[i:i + 2 * batch_size]
        x = torch.full((len(chunk), max(len(s) for s, _ in chunk)), tok.eot_id, dtype=torch.long)
        for j, (s, _) in enumerate(chunk):
            x[j, :len(s)] = torch.tensor(s)
        last = torch.tensor([n for _, n in chunk])
        with rt.autocast():
            out += model(x.to(rt.device), last=last.to(rt.device)).float().tolist()
    return out


# fresh samples of the SFT model on held-out prompts, scored by the rule once, for the rank correlation
fresh = []
if n_fresh and rt.master:
    prompts = read_jsonl(os.path.join(task_dir, 'prompts_val.jsonl'), ('prompt', 'words'),
                         hint='run python prepare/tinystories_instruct.py')[:n_fresh]
    sampler, _, _ = load_chat_model(parent, rt.device)
    sampler.eval()
    r = evaluate_task(sampler, tok, prompts, max_new_tokens, fresh_temperature, autocast=rt.autocast, seed=seed)
    for p, a, s in zip(prompts, r['answers'], r['scores']):
        ids, _ = tok.encode_chat(p['prompt'], a['text'], ended=a['ended'])
        fresh.append((ids[:block_size], min(len(ids), block_size) - 1, s['score']))
    del sampler
    print(f'{len(fresh)} fresh samples from {parent}: mean rule score {r["score"]:.3f}')


def evaluate(model):
    seqs = [(encode(p, s), len(encode(p, s)) - 1) for s in ('chosen', 'rejected') for p in val_pairs]
    r = rewards_of(model, seqs)
    rc, rr = torch.tensor(r[:len(val_pairs)]), torch.tensor(r[len(val_pairs):])
    metrics = {'val/loss': pair_loss(rc, rr).item(), 'val/accuracy': (rc > rr).float().mean().item(),
               'val/reward_margin': (rc - rr).mean().item()}
    # length bias: does the reward follow response length more than the rule does?
    lengths = [len(tok.encode(p[s])) for s in ('chosen', 'rejected') for p in val_pairs]
    rule = [p.get(f'{s}_score', float('nan')) for s in ('chosen', 'rejected') for p in val_pairs]
    if np.std(lengths) > 0:
        metrics['val/length_corr'] = float(np.corrcoef(r, lengths)[0, 1])
        if not any(math.isnan(v) for v in rule) and np.std(rule) > 0:
            metrics['val/rule_length_corr'] = float(np.corrcoef(rule, lengths)[0, 1])
    if fresh:
        rf = rewards_of(model, [(s, n) for s, n, _ in fresh])
        metrics['fresh/rank_corr'] = rank_correlation(rf, [sc for _, _, sc in fresh])
    return metrics


tokens_per_step = 2 * batch_size * block_size * gradient_accumulation_steps * rt.world_size
trainer = Trainer(config, rt, model, 'reward', tok.spec(), tokens_per_step, model.flops_per_token(block_size),
                  resume=ckpt if init_from == 'resume' else None,
                  checkpoint_extra={'parent': parent, 'prefs_dir': prefs_dir, 'data_dir': ckpt.get('data_dir', '')},
                  unused_parameters=True)                # scores only: the LM head (and MTP) unused
ckpt = None
trainer.run(loss_fn, evaluate, plot_keys=('train/loss', 'val/loss'))
close_runtime(rt)
