"""
Direct Preference Optimization (Rafailov et al. 2023): fine-tune the SFT model on preference
pairs (prepare/preferences.py) without a reward model.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

pi_c, pi_r: log-probabilities of the chosen / rejected response under the policy, summed over the
response tokens only (prompt and padding masked); ref_c, ref_r: the same under the frozen
reference (the SFT model), computed once before training. beta * (pi - ref) is the implicit
reward. Two variants, one setting each: loss_type='ipo' (Azar et al. 2023) regresses the log-ratio
margin h = (pi_c - ref_c) - (pi_r - ref_r) to a fixed target instead of pushing it ever higher,

    loss = (h - 1 / (2 beta))^2

and sft_weight > 0 (RPO, Pang et al. 2024) adds the chosen answers' negative log-likelihood per
token, -pi_c / |chosen| (logged as nll_chosen either way: DPO alone may make the chosen answers
less likely too, as long as the rejected ones fall faster). The implicit reward's margin and
accuracy (chosen > rejected; a tie counts half, so the untrained policy, equal to its reference,
scores 0.5 on the held-out pairs where both passes round alike, as on the CPU: the reference runs
over the same batches) are logged for training and held-out pairs, with the task score of greedy
answers to held-out prompts. Schedule, optimizer, logging, checkpoints and resume work as in
train.py (training.Run).

$ python dpo.py --init_from=out/sft --out_dir=out/dpo
"""

import os
import sys

import torch
import torch.nn.functional as F

from checkpoint import FROZEN_ROUTING, context_length, load_chat_model, load_checkpoint
from config import configure
from data import chat_batch, read_prepared
from generate import use_cuda_graph
from model import through_last, token_logprobs
from runlog import progress
from runtime import close_runtime, init_runtime
from task import evaluate_task
from training import Run, check_loop_settings

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/dpo'
init_from = 'out/sft'        # the SFT checkpoint: the policy's start and the reference; or 'resume'
eval_interval = 50           # evaluate (and checkpoint) every N steps, and at the end
log_interval = 10
always_save_checkpoint = True
save_checkpoints = True
eval_only = False
gradient_accumulation_steps = 1
# data and loss
prefs_dir = 'data/prefs'     # prefs_train.jsonl, prefs_val.jsonl (prepare/preferences.py)
task_dir = 'data/tinystories_instruct'   # prompts_val.jsonl for the task score
beta = 0.1                   # strength of the KL constraint to the reference
loss_type = 'sigmoid'        # 'sigmoid' (DPO: -log sigmoid(beta h)) | 'ipo' ((h - 1 / (2 beta))^2)
sft_weight = 0.0             # + sft_weight x the chosen answers' NLL per token (RPO); 0: DPO alone
batch_size = 8               # pairs per micro-batch
block_size = 0               # 0: the model's block_size
eval_prompts = 64            # held-out prompts answered (greedy) at each evaluation
max_new_tokens = 300         # the longest of those answers (tokens)
dropout = 0.0
# optimizer and schedule (as in train.py)
optimizer = 'adamw'          # 'adamw' | 'muon' | 'muonclip'
learning_rate = 5e-6
min_lr = 5e-7
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
if loss_type not in ('sigmoid', 'ipo'):
    sys.exit(f"error: loss_type='{loss_type}'; valid: sigmoid, ipo")
if sft_weight < 0:
    sys.exit(f'error: sft_weight={sft_weight} must be 0 (DPO alone) or positive')
if not beta > 0:     # beta < 0 trains toward the rejected answers (and its metrics, times beta, look perfect)
    sys.exit(f'error: beta={beta} must be positive (the KL constraint\'s strength; 0.1 is usual)')
if init_from == 'scratch':
    sys.exit("error: dpo.py starts from a fine-tuned model: set init_from='out/sft' (or 'resume')")
rt = init_runtime(device, dtype, seed)
cuda_graph = use_cuda_graph(cuda_graph, rt.device_type)
source = out_dir if init_from == 'resume' else init_from
ckpt = load_checkpoint(source)
reference = ckpt.get('reference', source) if init_from == 'resume' else source
model, tok, ckpt = load_chat_model(source, 'cpu', ckpt, overrides={'dropout': dropout, **FROZEN_ROUTING})
model.to(rt.device)
block_size = context_length(block_size, model, source)

hint = 'run python prepare/preferences.py --init_from=out/sft (or set prefs_dir=)'
train_pairs = read_prepared(prefs_dir, 'prefs_train.jsonl', ('prompt', 'chosen', 'rejected'), hint)
val_pairs = read_prepared(prefs_dir, 'prefs_val.jsonl', ('prompt', 'chosen', 'rejected'), hint)
# the story task's held-out prompts, where the task folder has them (prepare/chat.py's has none)
has_prompts = os.path.isfile(os.path.join(task_dir, 'prompts_val.jsonl'))
prompts = read_prepared(task_dir, 'prompts_val.jsonl', ('prompt', 'words'),
                        hint='run python prepare/tinystories_instruct.py') if eval_prompts and has_prompts else []
prompts = prompts[:eval_prompts]
if eval_prompts and not has_prompts and rt.master:
    print(f"note: {task_dir} has no prompts_val.jsonl (the story task's held-out prompts): no task score, the "
          f"pairs' loss and accuracy alone")


def encode(pair, side, cut=True):
    ids, mask = tok.encode_chat(pair['prompt'], pair[side], ended=pair.get(f'{side}_ended', True))
    return (ids[:block_size + 1], mask[:block_size + 1]) if cut else (ids, mask)


def answer_cut_away(pair):
    """Whether block_size + 1 tokens end before an answer's first token: the pair would score 0
    against 0, a loss of log 2 without a gradient."""
    return not all(any(encode(pair, side)[1]) for side in ('chosen', 'rejected'))


n_pairs = len(train_pairs) + len(val_pairs)
train_pairs = [p for p in train_pairs if not answer_cut_away(p)]
val_pairs = [p for p in val_pairs if not answer_cut_away(p)]
if len(train_pairs) + len(val_pairs) < n_pairs and rt.master:
    print(f'note: {n_pairs - len(train_pairs) - len(val_pairs)} of the {n_pairs} pairs are left out: an answer has '
          f'no token within block_size + 1 = {block_size + 1} tokens (its prompt fills them, or it is empty)')
if not train_pairs or not val_pairs:
    fix = (f"raise block_size (the model's: {model.config.block_size})" if block_size < model.config.block_size
           else "the prompts are longer than the model's context: shorten them")
    sys.exit(f"error: no {'training' if not train_pairs else 'held-out'} pair keeps a token of both answers within "
             f"block_size + 1 = {block_size + 1} tokens: {fix}")
n_long = sum(len(encode(p, side, cut=False)[0]) > block_size + 1 for p in train_pairs + val_pairs
             for side in ('chosen', 'rejected'))
if n_long and rt.master:
    print(f'note: {n_long} of the {2 * (len(train_pairs) + len(val_pairs))} answers (with their prompts) are '
          f'longer than block_size + 1 = {block_size + 1} tokens and were cut: their pairs compare the '
          f'answers\' beginnings only')


def sequence_logprobs(model, pairs):
    """((logp of each chosen response, logp of each rejected response), (their response tokens),
    tokens in the batch): the log-probabilities are sums over the response tokens, chosen and
    rejected run as one batch."""
    rows = [encode(p, 'chosen') for p in pairs] + [encode(p, 'rejected') for p in pairs]
    x, y = chat_batch(rows, tok.eot_id)
    x, y = x.to(rt.device), y.to(rt.device)
    # (no targets: logits alone, so no MoE balance loss or MTP term; the router biases are frozen,
    # FROZEN_ROUTING: the preference loss below is the whole objective)
    logits, _ = model(x, counted=through_last(y >= 0))      # the padding is no expert load
    return token_logprobs(logits, y, tok.vocab_size).sum(1).chunk(2), (y >= 0).sum(1).chunk(2), x.numel()


@torch.no_grad()
def reference_logprobs(ref_model, pairs, desc, chunk):
    """(N, 2) log-probabilities of every pair's chosen and rejected response under the frozen
    reference model: computed once, before training, as they never change; `chunk` pairs a pass."""
    out = []
    for i in progress(range(0, len(pairs), chunk), desc=desc, disable=not rt.master):
        with rt.autocast():
            (c, r), _, _ = sequence_logprobs(ref_model, pairs[i:i + chunk])
        out.append(torch.stack([c, r], 1))
    return torch.cat(out)


ref_model, _, _ = load_chat_model(reference, rt.device)
ref_model.eval()
# no gradients: twice the pairs fit a pass
ref_train = reference_logprobs(ref_model, train_pairs, 'reference log-probs (train)', 2 * batch_size)
# the held-out pairs in evaluate()'s batches: the same shapes round alike, so the untrained policy ties
ref_val = reference_logprobs(ref_model, val_pairs, 'reference log-probs (val)', batch_size)
del ref_model                                 # not needed again: its memory goes to training


def dpo(pi_c, pi_r, ref, n_c):
    """The loss (mean over the pairs), the implicit rewards beta * (pi - ref) of chosen and
    rejected, and the chosen answers' NLL per token (mean over the pairs).
    h = log pi(y_c)/ref(y_c) - log pi(y_r)/ref(y_r), so r_c - r_r = beta h.
    DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta h). IPO (Azar et al. 2023, eq. 17, its
    tau is beta here): (h - 1 / (2 beta))^2. RPO (Pang et al. 2024): + sft_weight x the chosen
    answer's NLL divided by its length."""
    ref_c, ref_r = ref.unbind(1)
    r_c, r_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    if loss_type == 'ipo':                    # h = (r_c - r_r) / beta; loss = (h - 1 / (2 beta))^2
        loss = ((r_c - r_r) / beta - 1 / (2 * beta)).pow(2).mean()
    else:                                     # loss = -log sigmoid(beta h) = -log sigmoid(r_c - r_r)
        loss = -F.logsigmoid(r_c - r_r).mean()
    nll_chosen = (-pi_c / n_c.clamp(min=1)).mean()  # -log p(chosen) / |chosen|
    return loss + sft_weight * nll_chosen, r_c, r_r, nll_chosen


def pair_accuracy(r_c, r_r):
    """Per pair, 1 where the implicit reward prefers the chosen answer, 0.5 for a tie (as at step 0,
    where the policy is its reference), 0 otherwise: the mean is the accuracy."""
    return (r_c > r_r).float() + 0.5 * (r_c == r_r).float()


@torch.no_grad()
def evaluate(model):
    losses, nlls, margins, correct = [], [], [], []
    for i in range(0, len(val_pairs), batch_size):
        with rt.autocast():
            (pi_c, pi_r), (n_c, _), _ = sequence_logprobs(model, val_pairs[i:i + batch_size])
        loss, r_c, r_r, nll = dpo(pi_c, pi_r, ref_val[i:i + batch_size].to(rt.device), n_c)
        losses.append(loss.item() * len(r_c))
        nlls.append(nll.item() * len(r_c))
        margins += (r_c - r_r).tolist()
        correct += pair_accuracy(r_c, r_r).tolist()
    n = len(val_pairs)
    metrics = {'val/loss': sum(losses) / n, 'val/reward_margin': sum(margins) / n, 'val/accuracy': sum(correct) / n,
               'val/nll_chosen': sum(nlls) / n}
    if prompts:
        r = evaluate_task(model, tok, prompts, max_new_tokens, 0.0, autocast=rt.autocast, seed=seed,
                          cuda_graph=cuda_graph)
        metrics.update({'task/score_greedy': r['score'], 'task/all_words_greedy': r['all_words']})
    return metrics


# optimizer, FSDP / DDP, torch.compile, the log, and the resumed optimizer state, step and RNG
run = Run(config, rt, model, 'dpo', tok.spec(), model.flops_per_token(block_size, mtp=False),   # (no MTP run here)
          resume=ckpt if init_from == 'resume' else None,
          checkpoint_extra={'parent': ckpt.get('parent', source) if init_from == 'resume' else source,
                            'reference': reference,
                            'prefs_dir': prefs_dir, 'data_dir': ckpt.get('data_dir', ''), 'task_dir': task_dir},
          unused_parameters=model.config.mtp_depth > 0)    # no targets: MTP unused
ckpt = None                                   # Run holds what it needs; free the loaded tensors

# --- the training loop: a random batch of pairs per micro-step ----------------------------------
step = run.step                               # 0, or where a resumed run stopped
while run.evaluate(step, evaluate):           # every eval_interval steps: evaluate, plot, save
    lr = run.set_lr(step)
    loss, tokens = torch.zeros((), device=rt.device), 0
    metrics = dict.fromkeys(('reward_margin', 'accuracy', 'reward_chosen', 'reward_rejected', 'nll_chosen'), 0.0)
    for micro in range(gradient_accumulation_steps):
        ix = run.epoch_batch(step, micro, len(train_pairs), batch_size)   # every pair once an epoch
        with run.sync(micro):                 # DDP / FSDP reduce gradients on the last micro-step only
            with rt.autocast():
                (pi_c, pi_r), (n_c, _), n_tokens = sequence_logprobs(run.model, [train_pairs[int(i)] for i in ix])
                micro_loss, r_c, r_r, nll_chosen = dpo(pi_c, pi_r, ref_train[ix].to(rt.device), n_c)
                micro_loss = micro_loss / gradient_accumulation_steps
            run.backward(micro_loss)
        loss, tokens = loss + micro_loss.detach(), tokens + n_tokens
        # the step's implicit rewards and nll_chosen: means over its micro-batches, as the loss
        for name, value in (('reward_margin', r_c - r_r), ('accuracy', pair_accuracy(r_c, r_r)),
                            ('reward_chosen', r_c), ('reward_rejected', r_r), ('nll_chosen', nll_chosen)):
            metrics[name] = metrics[name] + value.detach().mean() / gradient_accumulation_steps
    out = run.optimizer_step()                # clip, step, zero grads, router biases, QK-Clip
    step += 1
    if not run.log(step, lr, loss, tokens, out, metrics):   # every log_interval; False: NaN/inf
        break
run.finish()
close_runtime(rt)
