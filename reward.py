"""
Reward model: the SFT model's backbone plus a scalar head read at the last token of
prompt + response, trained on preference pairs (prepare/preferences.py) with the Bradley-Terry
loss  -log sigmoid(r_chosen - r_rejected)  (or loss_type='margin': max(0, m - (r_chosen - r_rejected))).
ppo.py and grpo.py load its checkpoint as the reward.

$ python prepare/preferences.py --init_from=out/sft
$ python reward.py --init_from=out/sft --out_dir=out/reward
$ python reward.py --init_from=out/sft --batch_by=prompt     # a prompt's pairs together (all_pairs data)
$ python reward.py --init_from=out/sft --score_reread=True --word_check_weight=1.0   # + per-word checks

Every eval_interval steps it logs: held-out pair accuracy and loss, and the accuracy on the pairs
that each part of the task rule separates most (required words, features, the ending, repetition:
what the model has learned of the rule and what not) and by how far apart the rule puts the two
answers (close: below 0.2 of the score, middle, clear: 0.4 or more; every held-out pair with its
rewards goes to out_dir/val_scored.jsonl); the length bias (Pearson correlation of reward with
response length, beside the rule score's own); the rank correlation between reward and rule
score on fresh samples of the SFT model for held-out prompts; and with word_check_weight, the share
of the held-out answers' word checks the head gets right (does it know which words an answer uses?).
Schedule, optimizer, logging, checkpoints and resume work as in train.py (training.Run).
"""

import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import context_length, load_chat_model, load_checkpoint
from config import configure
from data import read_prepared, write_jsonl
from generate import use_cuda_graph
from rl import reread_word_checks, reward_input, right_padded
from runtime import close_runtime, init_runtime
from task import GAP_BUCKETS, RULE_PARTS, evaluate_task, gap_bucket, rank_correlation, score, score_parts
from training import Run, check_loop_settings

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/reward'
init_from = 'out/sft'        # the SFT checkpoint whose backbone starts the reward model, or 'resume'
eval_interval = 50           # evaluate (and checkpoint) every N steps, and at the end
log_interval = 10
always_save_checkpoint = True
save_checkpoints = True
eval_only = False
gradient_accumulation_steps = 1
# data and loss
prefs_dir = 'data/prefs'     # prefs_train.jsonl, prefs_val.jsonl
task_dir = 'data/tinystories_instruct'   # prompts_val.jsonl for the fresh samples
loss_type = 'bt'             # 'bt' (Bradley-Terry) | 'margin' (margin ranking)
score_pooling = 'last'       # the score: 'last' (the head at the last token) | 'last+mean' (+ the mean
                             # of the head over every token; ModelConfig.score_pooling, kept in the checkpoint)
score_reread = False         # read the prompt again after the answer, score at its end (rl.reward_input;
                             # ModelConfig.score_reread, kept in the checkpoint)
ranking_margin = 1.0         # m of the margin ranking loss
rule_gap_margin = 0.0        # Llama 2's margin (Touvron et al. 2023): each pair's reward difference must pass
                             # rule_gap_margin x the rule's score gap (chosen_score - rejected_score), so that
                             # clearly separated pairs are pushed further apart (pair_loss); 0: off
word_check_weight = 0.0      # > 0 (needs score_reread): the head's output at each required word of the
                             # reread prompt also learns whether the answer uses that word (the rule's
                             # own check, task.word_used, as the label; binary cross entropy at this
                             # weight beside the pair loss): a label per word and answer where the
                             # pair gives one per two answers (rl.reread_word_checks)
batch_size = 16              # pairs (or, batch_by='prompt', prompts) per micro-batch
batch_by = 'pair'            # 'pair': random pairs; 'prompt': random prompts, each with all its pairs,
                             # every answer read once. With all pairs of K answers a prompt, shuffled
                             # pairs show each answer K - 1 times an epoch and the model learns the
                             # answers, not the preference (InstructGPT, Ouyang et al. 2022, 3.5);
                             # its train/loss weighs each prompt alike (its pairs share 1/B), val/loss
                             # and the accuracies each pair alike
block_size = 0               # 0: the model's block_size
n_fresh = 128                # fresh samples (SFT model, held-out prompts) for the rank correlation
fresh_temperature = 1.0      # the fresh samples' temperature
max_new_tokens = 300         # the longest fresh sample (tokens)
dropout = 0.0
bias_update_speed = 0.0      # the MoE router biases' step (auxiliary-loss-free balancing): 0 keeps them as
                             # SFT left them (checkpoint.FROZEN_ROUTING); > 0 keeps balancing the load (the
                             # padding is not counted), against a router that drifts at this stage's rate
# optimizer and schedule (as in train.py)
optimizer = 'adamw'          # 'adamw' | 'muon' | 'muonclip'
learning_rate = 3e-5
min_lr = 3e-6
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
muon_momentum = 0.95
qk_clip_tau = 100.0
lr_schedule = 'cosine'       # 'cosine' | 'wsd' | 'constant'
warmup_iters = 20
max_iters = 500
lr_decay_iters = 0           # 0: max_iters
decay_frac = 0.2
# system and logging (as in train.py)
device = 'auto'
dtype = 'auto'
compile = None
compile_mode = 'default'
cuda_graph = None            # answers: one-token steps replayed as a CUDA graph; None: on for CUDA
fsdp = False
seed = 1337
peak_flops = 0.0
tensorboard = False
wandb_project = ''
run_name = ''
# -----------------------------------------------------------------------------
config = configure(globals())
check_loop_settings(config)
# -----------------------------------------------------------------------------
if loss_type not in ('bt', 'margin'):
    sys.exit(f"error: loss_type='{loss_type}'; valid: bt, margin")
if batch_by not in ('pair', 'prompt'):
    sys.exit(f"error: batch_by='{batch_by}'; valid: pair, prompt")
if score_pooling not in ('last', 'last+mean'):
    sys.exit(f"error: score_pooling='{score_pooling}'; valid: last, last+mean")
if bias_update_speed < 0:
    sys.exit(f'error: bias_update_speed={bias_update_speed} must be 0 (the biases as SFT left them) or positive')
if word_check_weight < 0:
    sys.exit(f'error: word_check_weight={word_check_weight} must be 0 (off) or positive')
if rule_gap_margin < 0:
    sys.exit(f'error: rule_gap_margin={rule_gap_margin} must be 0 (off) or positive')
if init_from == 'scratch':
    sys.exit("error: reward.py starts from a fine-tuned model: set init_from='out/sft' (or 'resume')")
rt = init_runtime(device, dtype, seed)
cuda_graph = use_cuda_graph(cuda_graph, rt.device_type)
source = out_dir if init_from == 'resume' else init_from
ckpt = load_checkpoint(source)
parent = ckpt.get('parent', source) if init_from == 'resume' else source   # the SFT model
scoring = {'score_pooling': score_pooling, 'score_reread': score_reread}   # how the score is read
model, tok, ckpt = load_chat_model(source, 'cpu', ckpt, scalar=True, overrides={
    'dropout': dropout, 'bias_update_speed': bias_update_speed, **({} if init_from == 'resume' else scoring)})
if init_from == 'resume':             # a resumed run reads its score as it was trained to
    kept = {k: getattr(model.config, k) for k in scoring}
    if kept != scoring and rt.master:
        print(f"note: the resumed reward model keeps its {', '.join(f'{k}={v!r}' for k, v in kept.items())}")
    config.update(kept)                # (the settings' names are not read again below: model.config is)
if word_check_weight and not model.config.score_reread:
    sys.exit('error: word_check_weight > 0 checks the words where the reward model rereads the prompt: '
             'set score_reread=True')
model.to(rt.device)
block_size = context_length(block_size, model, source)

# --- data: each pair -> the chosen and the rejected sequence, and where each one ends -----------
hint = 'run python prepare/preferences.py --init_from=out/sft (or set prefs_dir=)'
train_pairs = read_prepared(prefs_dir, 'prefs_train.jsonl', ('prompt', 'chosen', 'rejected'), hint)
val_pairs = read_prepared(prefs_dir, 'prefs_val.jsonl', ('prompt', 'chosen', 'rejected'), hint)


def rule_gap(pair):
    """How far the task rule puts the pair's answers apart: chosen_score - rejected_score."""
    return pair['chosen_score'] - pair['rejected_score']


if rule_gap_margin and not all('chosen_score' in p and 'rejected_score' in p for p in train_pairs + val_pairs):
    sys.exit(f'error: rule_gap_margin > 0 reads the rule scores of both answers (chosen_score, rejected_score), '
             f'which some pairs in {prefs_dir} lack (prepare/preferences.py writes them; an external set has none)')
if word_check_weight and not any(p.get('words') for p in train_pairs):
    sys.exit(f"error: word_check_weight > 0 checks the prompt's required words, and no training pair in "
             f"{prefs_dir} has any ('words': an external set of pairs has none)")


def what_separates(pair):
    """Which part of the task rule (task.score_parts: words, features and ending at their
    task.RULE_WEIGHTS, and what the repetition penalty takes off) favours the chosen answer most;
    None for a pair without the prompt's words (an external set), one no part favours, or one two
    parts favour equally (a word more and an ending: the model may see either)."""
    if not pair.get('words'):
        return None
    parts = {side: score_parts(score(pair[side], pair['words'], pair.get('features'), pair.get(f'{side}_ended', True)))
             for side in ('chosen', 'rejected')}
    gain = {k: parts['chosen'][k] - parts['rejected'][k] for k in parts['chosen']}
    best = max(gain, key=gain.get)
    tied = sum(abs(g - gain[best]) < 1e-9 for g in gain.values()) > 1
    return best if gain[best] > 0 and not tied else None


# the held-out pairs by what separates them, for the accuracy of each kind (what the model misses)
val_kinds = [what_separates(p) for p in val_pairs]
if rt.master and any(val_kinds):
    counts = {k: val_kinds.count(k) for k in RULE_PARTS}
    print('held-out pairs by what separates them: ' + ', '.join(f'{k} {n}' for k, n in counts.items()))


def encode(pair, side):
    """(token ids, word checks): what the reward model reads of this answer, and with
    word_check_weight the [(position, label)] of its required words (rl.reread_word_checks)."""
    ids, _ = tok.encode_chat(pair['prompt'], pair[side], ended=pair.get(f'{side}_ended', True))
    seq = reward_input(tok, model.config, ids, pair['prompt'], block_size)
    checks = reread_word_checks(tok, ids, seq, pair['prompt'], pair['words'], pair[side]) \
        if word_check_weight and pair.get('words') else []
    return seq, checks


def padded(encoded):
    """x (N, T): the sequences right-padded; last (N,): each one's last position, where its reward
    is read; and the word checks: at (N, K) positions, label (N, K), real (N, K) (False: padding),
    or None with word_check_weight 0."""
    x, last = right_padded([seq for seq, _ in encoded], tok.eot_id, rt.device)
    if not word_check_weight:
        return x, last, None
    k = max(1, max(len(c) for _, c in encoded))
    at, label, real = torch.zeros(len(encoded), k, dtype=torch.long), torch.zeros(len(encoded), k), \
        torch.zeros(len(encoded), k, dtype=torch.bool)
    for i, (_, checks) in enumerate(encoded):
        for j, (position, used) in enumerate(checks):
            at[i, j], label[i, j], real[i, j] = position, used, True
    return x, last, (at.to(rt.device), label.to(rt.device), real.to(rt.device))


def batch(pairs):
    """The B pairs' sequences (x, last, word checks): the chosen ones, then the rejected ones."""
    return padded([encode(p, 'chosen') for p in pairs] + [encode(p, 'rejected') for p in pairs])


def scores(model, x, last, checks):
    """The rewards (N,), and with word_check_weight the word checks' loss (None when it is 0; 0 for a
    batch without checks), how many of the checks the head gets right (its output on the label's
    side of 0) and how many there are."""
    if not word_check_weight:
        return model(x, last=last), None, 0, 0
    at, label, real = checks
    r, logit = model(x, last=last, at=at)
    logit, label = logit[real], label[real]
    # binary cross entropy, the output z as a logit: -(y log sigmoid(z) + (1 - y) log(1 - sigmoid(z)))
    loss = F.binary_cross_entropy_with_logits(logit, label) if len(label) else r.sum() * 0
    return r, loss, ((logit > 0) == (label > 0.5)).sum(), len(label)


def by_prompt(pairs):
    """The pairs grouped by prompt: per prompt its distinct answers (as pair dicts and sides, to
    encode) and its pairs as (chosen, rejected) indices into them."""
    groups = {}
    for p in pairs:
        answers, index, comparisons = groups.setdefault(p['prompt'], ([], {}, []))
        ids = []
        for side in ('chosen', 'rejected'):
            key = (p[side], p.get(f'{side}_ended', True))
            if key not in index:
                index[key] = len(answers)
                answers.append((p, side))
            ids.append(index[key])
        comparisons.append(tuple(ids))
    return [(answers, comparisons) for answers, _, comparisons in groups.values()]


def prompt_batch(groups):
    """The B prompts' answers (x, last), each once, and their pairs: chosen and rejected indices
    into x, per pair the weight 1 / (B x the prompt's pairs), so every prompt counts alike, and
    (with rule_gap_margin) its rule gap."""
    seqs, chosen, rejected, weight, gap = [], [], [], [], []
    for answers, comparisons in groups:
        for c, r in comparisons:
            chosen.append(len(seqs) + c)
            rejected.append(len(seqs) + r)
            weight.append(1 / (len(groups) * len(comparisons)))
            if rule_gap_margin:                  # (answers[i]: (a pair holding the answer, its side))
                gap.append(answers[c][0][f'{answers[c][1]}_score'] - answers[r][0][f'{answers[r][1]}_score'])
        seqs += [encode(p, side) for p, side in answers]
    x, last, checks = padded(seqs)
    return x, last, checks, torch.tensor(chosen, device=rt.device), torch.tensor(rejected, device=rt.device), \
        torch.tensor(weight, device=rt.device), torch.tensor(gap, device=rt.device) if rule_gap_margin else None


def pair_loss(r_chosen, r_rejected, weight=None, gap=None):
    """The mean loss of the pairs (or, with weight, their weighted sum), over diff = r_c - r_r - k gap
    (k = rule_gap_margin; gap: the pairs' rule gaps, Llama 2's margin, or none):
        bt:     -log sigmoid(diff)               margin: max(0, ranking_margin - diff)"""
    diff = r_chosen - r_rejected
    if gap is not None:
        diff = diff - rule_gap_margin * gap
    if loss_type == 'bt':
        per_pair = -F.logsigmoid(diff)                    # Bradley-Terry: P(chosen > rejected) = sigma(diff)
    else:
        per_pair = F.relu(ranking_margin - diff)          # hinge: the difference must pass ranking_margin
    return per_pair.mean() if weight is None else (weight * per_pair).sum()


@torch.no_grad()
def rewards_of(model, encoded):
    """The reward of each (token ids, word checks) (encode()), read at its last token, in batches of
    2 x batch_size; and the share of its word checks on the label's side (None without any)."""
    out, correct, n = [], 0, 0
    for i in range(0, len(encoded), 2 * batch_size):
        with rt.autocast():
            r, _, c, k = scores(model, *padded(encoded[i:i + 2 * batch_size]))
        out, correct, n = out + r.float().tolist(), correct + int(c), n + k
    return out, (correct / n if n else None)


# fresh samples of the SFT model on held-out prompts, scored by the rule once, for the rank correlation
fresh = []
if n_fresh and rt.master:
    prompts = read_prepared(task_dir, 'prompts_val.jsonl', ('prompt', 'words'),
                            hint='run python prepare/tinystories_instruct.py')[:n_fresh]
    sampler, _, _ = load_chat_model(parent, rt.device)
    sampler.eval()
    r = evaluate_task(sampler, tok, prompts, max_new_tokens, fresh_temperature, autocast=rt.autocast, seed=seed,
                      cuda_graph=cuda_graph)
    for p, a, s in zip(prompts, r['answers'], r['scores']):
        ids, _ = tok.encode_chat(p['prompt'], a['text'], ended=a['ended'])
        fresh.append(((reward_input(tok, model.config, ids, p['prompt'], block_size), []), s['score']))
    del sampler
    print(f'{len(fresh)} fresh samples from {parent}: mean rule score {r["score"]:.3f}')


# the held-out pairs (the chosen answers, then the rejected ones): their sequences, response
# lengths and rule scores, the same at every evaluation, made once
val_seqs = [encode(p, side) for side in ('chosen', 'rejected') for p in val_pairs]
val_lengths = [len(tok.encode(p[side])) for side in ('chosen', 'rejected') for p in val_pairs]
val_rule = [p.get(f'{side}_score', float('nan')) for side in ('chosen', 'rejected') for p in val_pairs]
# how far apart the rule puts each pair's answers (chosen - rejected), and its task.GAP_BUCKETS name
val_gap = [c - r for c, r in zip(val_rule[:len(val_pairs)], val_rule[len(val_pairs):])]
val_buckets = [gap_bucket(g) for g in val_gap]


def evaluate(model):
    r, checked = rewards_of(model, val_seqs)
    rc, rr = torch.tensor(r[:len(val_pairs)]), torch.tensor(r[len(val_pairs):])
    gap = torch.tensor(val_gap) if rule_gap_margin else None     # (every pair has its scores then)
    metrics = {'val/loss': pair_loss(rc, rr, gap=gap).item(), 'val/accuracy': (rc > rr).sum().item() / len(rc),
               'val/reward_margin': (rc - rr).mean().item()}
    if checked is not None:          # does the head know, at each reread word, whether the answer uses it?
        metrics['val/word_check_accuracy'] = checked
    # the accuracy on the pairs of each kind, and of each size of the rule's gap between the answers
    for name, of_pair in [*((k, val_kinds) for k in RULE_PARTS), *((b, val_buckets) for b in GAP_BUCKETS)]:
        mask = torch.tensor([x == name for x in of_pair])
        if mask.any():
            metrics[f'val/accuracy_{name}'] = (rc[mask] > rr[mask]).sum().item() / int(mask.sum())
            metrics[f'val/pairs_{name}'] = int(mask.sum())
    # every held-out pair with its rewards (the latest evaluation's), to read what the model gets wrong
    write_jsonl(os.path.join(out_dir, 'val_scored.jsonl'), [
        {'prompt': p['prompt'], 'words': p.get('words'), 'kind': k, 'rule_gap': None if b is None else round(g, 6),
         'reward_chosen': c, 'reward_rejected': j, 'correct': c > j, 'chosen': p['chosen'], 'rejected': p['rejected'],
         'chosen_score': p.get('chosen_score'), 'rejected_score': p.get('rejected_score'),
         'features': p.get('features'), 'chosen_ended': p.get('chosen_ended', True),
         'rejected_ended': p.get('rejected_ended', True)}
        for p, k, g, b, c, j in zip(val_pairs, val_kinds, val_gap, val_buckets, rc.tolist(), rr.tolist())])
    # length bias: does the reward follow response length more than the rule does?
    if np.std(val_lengths) > 0:
        metrics['val/length_corr'] = float(np.corrcoef(r, val_lengths)[0, 1])
        if not any(math.isnan(v) for v in val_rule) and np.std(val_rule) > 0:
            metrics['val/rule_length_corr'] = float(np.corrcoef(val_rule, val_lengths)[0, 1])
    if fresh:
        rf, _ = rewards_of(model, [enc for enc, _ in fresh])
        metrics['fresh/rank_corr'] = rank_correlation(rf, [sc for _, sc in fresh])
    return metrics


# optimizer, FSDP / DDP, torch.compile, the log, and the resumed optimizer state, step and RNG
run = Run(config, rt, model, 'reward', tok.spec(), model.flops_per_token(block_size),
          resume=ckpt if init_from == 'resume' else None,
          checkpoint_extra={'parent': parent, 'prefs_dir': prefs_dir, 'data_dir': ckpt.get('data_dir', '')},
          unused_parameters=True)             # scores only: the LM head (and MTP) unused
ckpt = None

# --- the training loop: a random batch of pairs (or of prompts) per micro-step -------------------
train_groups = by_prompt(train_pairs) if batch_by == 'prompt' else None
step = run.step                               # 0, or where a resumed run stopped
while run.evaluate(step, evaluate):           # every eval_interval steps: evaluate, plot, save
    lr = run.set_lr(step)
    loss, tokens = torch.zeros((), device=rt.device), 0
    correct, margin, n_pairs = 0, 0, 0                 # over the step's micro-batches, on the device
    check_loss, checks_correct, n_checks = 0, 0, 0      # the word checks' (word_check_weight > 0)
    for micro in range(gradient_accumulation_steps):
        # read in epochs: every prompt (or pair) once before any comes again
        if batch_by == 'prompt':
            ix = run.epoch_batch(step, micro, len(train_groups), batch_size)
            x, last, checks, chosen, rejected, weight, gap = prompt_batch([train_groups[i] for i in ix])
        else:
            ix = run.epoch_batch(step, micro, len(train_pairs), batch_size)
            x, last, checks = batch([train_pairs[i] for i in ix])
            chosen = torch.arange(batch_size, device=rt.device)   # x: the chosen, then the rejected
            rejected, weight = chosen + batch_size, None
            gap = torch.tensor([rule_gap(train_pairs[i]) for i in ix], device=rt.device) if rule_gap_margin else None
        with run.sync(micro):                 # DDP / FSDP reduce gradients on the last micro-step only
            with rt.autocast():
                r, word_loss, n_right, n_checked = scores(run.model, x, last, checks)
                rc, rr = r[chosen], r[rejected]                 # rewards of chosen and rejected
                micro_loss = pair_loss(rc, rr, weight, gap) / gradient_accumulation_steps
                total_loss = micro_loss                          # what backward() gets: the pair loss
                if word_loss is not None:                        # + w x the word checks' cross entropy
                    total_loss = micro_loss + word_check_weight * word_loss / gradient_accumulation_steps
                    check_loss = check_loss + word_loss.detach() / gradient_accumulation_steps
                    checks_correct, n_checks = checks_correct + n_right, n_checks + n_checked
            run.backward(total_loss)
        loss, tokens = loss + micro_loss.detach(), tokens + x.numel()     # (the pair loss, as val/loss)
        correct, margin = correct + (rc > rr).float().sum().detach(), margin + (rc - rr).sum().detach()
        n_pairs += len(rc)
    out = run.optimizer_step()                # clip, step, zero grads, router biases, QK-Clip
    step += 1
    metrics = {'accuracy': correct / n_pairs, 'reward_margin': margin / n_pairs}
    if word_check_weight:    # (every rank logs the same names: a step without checks, its answers all cut, logs 0)
        metrics.update(word_check_loss=check_loss, word_check_accuracy=checks_correct / max(n_checks, 1))
    if not run.log(step, lr, loss, tokens, out, metrics):   # every log_interval; False: NaN/inf
        break
run.finish()
close_runtime(rt)
