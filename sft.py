"""
Supervised fine-tuning on the instruction task (task.py), or on instruction data of one's own
(prepare/chat.py reads the prompt/response, Alpaca, OpenAI messages and ShareGPT formats): the
loss falls on the response only.

$ python prepare/tinystories_instruct.py
$ python sft.py --init_from=out/tinystories_moe --out_dir=out/sft
$ python sft.py config/sft_tinystories.py
$ python prepare/chat.py --source=my_chats.jsonl --out_dir=data/my_chats
$ python sft.py --init_from=out/tinystories_moe --task_dir=data/my_chats --out_dir=out/sft_mine

Each example is rendered with the chat template (tokenizer.py):
    EOT <|user|> prompt <|end|> <|assistant|> response <|end|>
and the targets are -1 (no loss) everywhere except the response and its closing <|end|>.
Batches are packed (examples concatenated into block_size windows, the masks kept) or, with
packing=False, drawn from examples of similar length and right-padded. In a packed window each
example attends to itself alone, at positions counted from its own start (a block-diagonal causal
mask, GPT.forward's segments), as it is when answered: packed_attention='window' lets the tokens
attend across the whole window instead (pretraining's way, and the fused causal attention kernel).
curriculum=True starts from the shortest examples and widens to all of them over curriculum_iters
steps. word_loss_weight > 1 weights the tokens where a task answer first uses a required word:
copying the word is the skill the task asks for, and those tokens are a few percent of an answer's
loss. prompt_loss_weight > 0 trains on the prompts' tokens too, at that weight. Every eval_interval
steps: the response loss on sft_val and, where the task folder has held-out prompts of the story
task (prompts_val.jsonl), the task score of greedy and sampled answers to them. Schedule,
optimizer, logging, checkpoints and resume work as in train.py (training.Run).
"""

import json
import math
import os
import sys

import torch

from checkpoint import context_length, load_chat_model
from config import configure
from data import chat_batch, encode_chat_examples, neighbours_in_length, pack_chat_examples, read_prepared
from generate import generate_chat, use_cuda_graph
from model import masked_cross_entropy, through_last
from runtime import close_runtime, init_runtime
from task import LIST_WORDS, evaluate_task
from training import Run, check_loop_settings

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/sft'
init_from = 'out/run'        # the pretrained checkpoint to fine-tune, or 'resume' (continue out_dir)
eval_interval = 100          # evaluate (and checkpoint) every N steps, and at the end
eval_iters = 20              # validation batches for the response loss
log_interval = 10
always_save_checkpoint = True
save_checkpoints = True
eval_only = False
# data
task_dir = 'data/tinystories_instruct'   # from prepare/tinystories_instruct.py (the story task) or
                             # prepare/chat.py (data of one's own: no task score)
batch_size = 16              # sequences per micro-batch (per GPU)
block_size = 0               # 0: the model's block_size
gradient_accumulation_steps = 1
packing = True               # pack examples into full windows; False: similar-length padded batches
packed_attention = 'example'  # with packing: 'example' (each example sees only itself, positions from
                             # its start) | 'window' (causal attention over the whole window)
curriculum = False           # shortest examples first, widening to all over curriculum_iters steps
curriculum_iters = 0         # 0: half of max_iters
curriculum_start = 0.1       # share of the examples (the shortest) available at step 0
word_loss_weight = 1.0       # loss weight of the tokens where an answer first uses a required word
                             # (records with 'words'); 1: every response token alike. On the story task
                             # (speedrun.sh on an H100), the share of greedy answers that use all their
                             # required words, two weights compared within one run each: 1 -> 5: 23.8% ->
                             # 71.1%; 5 -> 10: 71.5% -> 87.5%; 10 -> 20: 82.8% -> 91.0% (20: the profile's;
                             # bits per byte within 0.015; docs/results.md)
prompt_loss_weight = 0.0     # loss weight of the prompt's tokens (0: the response only; 1: every token,
                             # as pretraining weighs them); above 0 the mean runs over every target, so a
                             # response token weighs 1/N_all, not 1/N_response: train/loss is not comparable
                             # across weights, the validation loss (the response's alone) is
prompt_like_repeat = 1       # examples whose required words all come from task.py's word lists, as every
                             # held-out prompt's do, appear this many times in the training set
eval_prompts = 64            # held-out prompts answered (greedy and sampled) at each evaluation
max_new_tokens = 300         # the longest of those answers (tokens)
sample_temperature = 0.8     # the sampled answers' temperature
dropout = 0.0
# optimizer and schedule (as in train.py)
optimizer = 'adamw'          # 'adamw' | 'muon' | 'muonclip'
learning_rate = 1e-4
min_lr = 1e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
muon_momentum = 0.95
qk_clip_tau = 100.0
lr_schedule = 'cosine'       # 'cosine' | 'wsd' | 'constant'
warmup_iters = 50
max_iters = 1000
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
if prompt_like_repeat < 1:
    sys.exit(f'error: prompt_like_repeat={prompt_like_repeat} must be at least 1')
if word_loss_weight <= 0:
    sys.exit(f'error: word_loss_weight={word_loss_weight} must be positive')
if prompt_loss_weight < 0:
    sys.exit(f'error: prompt_loss_weight={prompt_loss_weight} must be 0 (the response only) or positive')
if packed_attention not in ('example', 'window'):
    sys.exit(f"error: packed_attention='{packed_attention}'; valid: example, window")
rt = init_runtime(device, dtype, seed)
cuda_graph = use_cuda_graph(cuda_graph, rt.device_type)

# --- model and tokenizer ----------------------------------------------------------------------
source = out_dir if init_from == 'resume' else init_from
if init_from == 'scratch':
    sys.exit("error: sft.py fine-tunes a trained model: set init_from='out/RUN' (or 'resume')")
model, tok, ckpt = load_chat_model(source, 'cpu', overrides={'dropout': dropout})
model.to(rt.device)
block_size = context_length(block_size, model, source)


# --- data ---------------------------------------------------------------------------------------
def read_task(name, required):
    """The records of a task file; each example's prompt and response must be text, the response
    not empty (an empty one would train the model to answer nothing)."""
    rows = read_prepared(task_dir, name, required, hint='run python prepare/tinystories_instruct.py, or '
                         'prepare/chat.py for data of your own (or set task_dir=)')
    for n, r in enumerate(rows, 1):
        if not isinstance(r['prompt'], str) or 'response' in required and not (
                isinstance(r['response'], str) and r['response'].strip()):
            sys.exit(f'error: {task_dir}/{name} record {n}: prompt and response must be text, the response not '
                     f'empty (prompt {json.dumps(r["prompt"])[:40]}, response {json.dumps(r.get("response"))[:40]})')
    if not rows:
        sys.exit(f'error: {task_dir}/{name} holds no examples')
    return rows


def encode(rows, word_weight=1.0, prompt_weight=0.0):
    """Token ids and response masks (with word_weight != 1 or prompt_weight, loss weights), cut to
    block_size + 1."""
    try:
        out, cut = encode_chat_examples(tok, rows, block_size, word_weight, show_progress=rt.master)
    except ValueError as e:               # e.g. a character a char tokenizer's corpus never had
        sys.exit(f"error: {task_dir}'s examples cannot be tokenized with the model's {tok.kind} tokenizer: {e}")
    if prompt_weight:   # the prompt's tokens weigh prompt_weight; not the first, an example's EOT, which
        # in a packed window would be a target of the example before
        out = [(ids, mask[:1] + [m if m else prompt_weight for m in mask[1:]]) for ids, mask in out]
    if cut and rt.master:
        print(f'note: {cut} of {len(rows)} examples are longer than block_size + 1 = {block_size + 1} '
              f'tokens and were cut (their ending is not trained)')
    return out


train_records = read_task('sft_train.jsonl', ('prompt', 'response'))
if prompt_like_repeat > 1:          # more of the kind of example the held-out prompts ask for
    like = [r for r in train_records if r.get('words') and all(w in LIST_WORDS for w in r['words'])]
    train_records = train_records + like * (prompt_like_repeat - 1)
    if rt.master:
        print(f'{len(like):,} of the examples ask only for listed words, as the held-out prompts do: '
              f'{prompt_like_repeat} copies of each')
train_ex = encode(train_records, word_loss_weight, prompt_loss_weight)
val_records = read_task('sft_val.jsonl', ('prompt', 'response'))
val_ex = encode(val_records)
for name, ex in (('training', train_ex), ('validation', val_ex)):
    if not any(any(mask[1:]) for _, mask in ex):       # (mask[0]: the EOT, never a target)
        sys.exit(f'error: no {name} example has a response token within block_size + 1 = {block_size + 1} tokens: '
                 f'the prompts fill the window, nothing would be trained (raise block_size)')
# the story task's held-out prompts, where the task folder has them (prepare/chat.py's has none)
has_prompts = os.path.isfile(os.path.join(task_dir, 'prompts_val.jsonl'))
prompts = read_task('prompts_val.jsonl', ('prompt', 'words'))[:eval_prompts] if eval_prompts and has_prompts else []
if eval_prompts and not has_prompts and rt.master:
    print(f'note: {task_dir} has no prompts_val.jsonl (the story task\'s held-out prompts): no task score, the '
          f'response loss on sft_val alone')
# the examples shortest first: the curriculum's order, and neighbours in length for padded batches
by_length = sorted(range(len(train_ex)), key=lambda i: len(train_ex[i][0]))
curriculum_iters = curriculum_iters or max(1, max_iters // 2)
if rt.master:
    print(f'{len(train_ex):,} training and {len(val_ex):,} validation examples, {len(prompts)} held-out '
          f'prompts; {tok.kind} tokenizer with the chat template ({tok.vocab_size:,} ids)')


def pool_at(step):
    """The examples a batch may draw from: all of them, or with the curriculum the shortest
    share curriculum_start + (1 - curriculum_start) * step / curriculum_iters."""
    if not curriculum:
        return by_length
    frac = min(1.0, curriculum_start + (1 - curriculum_start) * step / curriculum_iters)
    return by_length[:max(batch_size, math.ceil(frac * len(by_length)))]


def batch_rows(step, micro):
    """(batch_size rows, their examples' numbers per token or None) for this micro-batch, a function
    of (seed, step, its global index)."""
    g = run.batch_generator(step, micro)
    pool = pool_at(step)
    if packing:                      # concatenate random examples until each window is full
        rows, segments = pack_chat_examples(train_ex, pool, batch_size, block_size, g)
        return rows, (segments if packed_attention == 'example' else None)
    return neighbours_in_length(train_ex, pool, batch_size, g), None


@torch.no_grad()
def response_loss(model):
    """Mean loss per response token over the first eval_iters batches of sft_val (fixed), through
    the model uncompiled: each batch is as long as its longest example, and compiling a no-grad
    graph for those shapes made an evaluation-only run on the CPU (4 batches of 8) take 37.0 s
    instead of 5.6 s."""
    model = getattr(model, '_orig_mod', model)
    total, count = 0.0, 0
    for k in range(0, min(len(val_ex), eval_iters * batch_size), batch_size):
        x, y = chat_batch(val_ex[k:k + batch_size], tok.eot_id)
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            logits, _ = model(x)
        n = int((y >= 0).sum())
        total += masked_cross_entropy(logits, y).item() * n        # the mean over the n response tokens
        count += n
    return total / max(count, 1)


def evaluate(model):
    metrics = {'val/loss': response_loss(model)}
    if prompts:
        for name, temperature in (('greedy', 0.0), ('sampled', sample_temperature)):
            r = evaluate_task(model, tok, prompts, max_new_tokens, temperature, autocast=rt.autocast, seed=seed,
                              cuda_graph=cuda_graph)
            metrics.update({f'task/score_{name}': r['score'], f'task/all_words_{name}': r['all_words']})
            if name == 'greedy':
                print(f"  prompt: {r['example']['prompt']}\n  greedy answer: {r['example']['answer'][:300]!r}")
    elif eval_prompts and rt.master:  # no task: what the model answers to a held-out prompt, to read
        first = val_records[0]         # (its whole conversation, as it was trained)
        answer = generate_chat(getattr(model, '_orig_mod', model), tok, [first.get('messages') or first['prompt']],
                               max_new_tokens, 0.0, autocast=rt.autocast)[0]['text']
        print(f"  prompt: {first['prompt'][:200]!r}\n  greedy answer: {answer[:300]!r}")
    return metrics


# optimizer, FSDP / DDP, torch.compile, the log, and the resumed optimizer state, step and RNG
run = Run(config, rt, model, 'sft', tok.spec(), model.flops_per_token(block_size),
          resume=ckpt if init_from == 'resume' else None,
          checkpoint_extra={'task_dir': task_dir,
                            'parent': ckpt.get('parent', source) if init_from == 'resume' else source,
                            'data_dir': ckpt.get('data_dir', '')})
ckpt = None                                   # Run holds what it needs; free the loaded tensors


def train_loss(x, y, w, segments):
    """The model's loss on the response tokens (y is -1 on the prompt and the padding): the mean
    cross entropy over the N response tokens, plus the MoE and MTP terms. With word_loss_weight != 1
    the required words' tokens weigh w_t (and with prompt_loss_weight the prompt's tokens, then
    among the N): + sum_t (w_t - 1) CE_t / N over the targets whose w_t is not 1, so that the cross
    entropy becomes sum_t w_t CE_t / N. (That needs the logits: the fused loss, which never holds
    them, serves the unweighted case alone.) The weights reach the main head only: the MTP modules'
    term reads y as it is (the response tokens at weight 1, and with 0 < prompt_loss_weight < 1 the
    prompt's too, at 1)."""
    counted = through_last(y >= 0)            # what follows a row's last target is no expert load
    if word_loss_weight == 1 and prompt_loss_weight in (0, 1):
        return run.model(x, y, segments=segments, return_logits=False, counted=counted)[1]
    logits, loss = run.model(x, y, segments=segments, counted=counted)
    extra = (w != 1) & (y >= 0)
    if extra.any():
        ce = torch.nn.functional.cross_entropy(logits[extra].float(), y[extra], reduction='none')
        loss = loss + ((w[extra] - 1) * ce).sum() / (y >= 0).sum()
    return loss


# --- the training loop: the loss on the response tokens only ------------------------------------
step = run.step                               # 0, or where a resumed run stopped
while run.evaluate(step, evaluate):           # every eval_interval steps: evaluate, plot, save
    lr = run.set_lr(step)
    loss, tokens = torch.zeros((), device=rt.device), 0
    micro_batches = []                        # x, y, the targets' loss weights w, segments
    for micro in range(gradient_accumulation_steps):
        rows, segments = batch_rows(step, micro)
        micro_batches.append((*chat_batch(rows, tok.eot_id, block_size if packing else None, weights=True), segments))
    # a micro-batch's mean loss counts by its share of the step's response tokens (all ranks'), so the
    # step's loss is their mean, as in one large batch: w_m = world_size * n_m / N
    share = run.token_share_weights([int((y >= 0).sum()) for _, y, _, _ in micro_batches])
    for micro, (x, y, w, segments) in enumerate(micro_batches):
        x, y, w = x.to(rt.device), y.to(rt.device), w.to(rt.device)
        segments = segments.to(rt.device) if segments is not None else None
        with run.sync(micro):                 # DDP / FSDP reduce gradients on the last micro-step only
            with rt.autocast():
                micro_loss = train_loss(x, y, w, segments) * share[micro]
            run.backward(micro_loss)
        loss, tokens = loss + micro_loss.detach(), tokens + x.numel()
    out = run.optimizer_step()                # clip, step, zero grads, router biases, QK-Clip
    step += 1
    # train/loss: the weighted loss above + the MoE and MTP terms; val/loss (evaluate): the response
    # tokens' plain cross entropy; train/lm_loss: the main head's plain cross entropy over every target
    if not run.log(step, lr, loss, tokens, out):   # every log_interval steps; False: NaN/inf loss
        break
run.finish()
close_runtime(rt)
