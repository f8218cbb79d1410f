"""
Knowledge distillation: a smaller student learns from a trained teacher that shares its tokenizer.

$ python distill.py config/distill_tinystories.py                        # logit distillation
$ python distill.py config/distill_tinystories.py --mode=sequence        # sequence-level distillation
$ python distill.py --teacher=out/sft --task_dir=data/tinystories_instruct --init_from=out/small ...
$ python eval.py --compare=out/tinystories_moe,out/distill

mode='logits' (Hinton et al. 2015). At every position the teacher's and the student's next-token
distributions are softened by a temperature T, p = softmax(z_teacher / T), q = softmax(z_student / T),
and the student minimises
    loss = alpha * T^2 * KL + (1 - alpha) * CE(z_student, the real next token)
with KL = KL(p || q) (kl='forward') or KL(q || p) (kl='reverse'); T^2 keeps the gradient's scale
independent of T. top_k_logits=k keeps only the teacher's k most likely ids per position plus one
bucket holding the rest of its mass (the formulas: model.teacher_log_probs, model.distillation_kl).
The teacher is frozen: eval mode, no gradients, its weights in the run's compute dtype on a GPU
(bf16) and in float32 on the CPU (where bf16 matmuls are slow and the tests compare exactly).

mode='sequence' (Kim & Rush 2016). Sample num_samples documents from the teacher (batched through
the KV cache, each begun from the end-of-text token, as documents are in the data), write them to
seq_data_dir in the prepare/ format (train.bin: the samples; val.bin: a copy of the real data's
val split, so bits per byte are measured on real text), then train the student on them with the
plain next-token loss: the same as `python train.py --data_dir=<seq_data_dir>` with the student's
keys (generate_only=True writes the corpus and stops).

Pretraining data by default (data_dir: the teacher's own); with task_dir= the instruction data
(prepare/tinystories_instruct.py): the chat-formatted SFT examples, packed as sft.py packs them
(each example attending to itself alone),
with both losses on the response tokens only, and the task score in every evaluation.
The student is any ModelConfig (every field is a key, as in train.py) or a trained checkpoint
(init_from='out/RUN'). Schedule, optimizer, logging, checkpoints and exact resume work as in
train.py (training.Run). Every evaluation logs val/loss (on pretraining data, as train.py does,
loss and bits per byte of every held-out split of the real data: val, and e.g. val_tinystories) and
val/kl, the student's KL(p || q) to the teacher at T = 1, with the teacher's own val loss beside it.
The checkpoint (stage 'distill') is a plain language model that sample.py and eval.py load.
"""

import json
import math
import os
import shutil
import sys

import torch


from checkpoint import load_chat_model, load_checkpoint, load_model
from config import configure, last_given, model_config_from
from data import (TokenData, chat_batch, encode_chat_examples, eval_generator, load_tokenizer_spec,
                  pack_chat_examples, read_prepared, write_token_dataset)
from generate import generate_tokens, use_cuda_graph
from model import GPT, ModelConfig, chunked_distillation_kl, masked_cross_entropy, padded_vocab_size
from runlog import progress
from runtime import close_runtime, init_runtime
from task import evaluate_task
from tokenizer import base_spec, tokenizer_from_spec
from training import Run, check_loop_settings

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/distill'
teacher = ''                 # the teacher's checkpoint folder (e.g. out/tinystories_moe, out/sft); required
mode = 'logits'              # 'logits': match the teacher's distributions | 'sequence': train on its samples
init_from = 'scratch'        # the student: 'scratch' (from the ModelConfig keys) | 'resume' | 'out/RUN'
init_embedding = 'random'    # a scratch student's token table (and head): 'random' (train.py's initialisation)
                             # | 'teacher' (the teacher's, projected to the student's width: project_embeddings)
eval_interval = 250          # evaluate (and checkpoint) every N steps, and at the end
eval_iters = 50              # batches per split per evaluation
log_interval = 10
always_save_checkpoint = True
save_checkpoints = True
eval_only = False
# data
data_dir = ''                # pretraining data (prepare/ format); '' = the teacher's data_dir
task_dir = ''                # instruction data (sft_*.jsonl, prompts_val.jsonl); '' = pretraining data
batch_size = 32              # sequences per micro-batch (per GPU)
block_size = 0               # training window; 0 = the teacher's block_size (and not past the student's)
gradient_accumulation_steps = 1
# the student: these two and every ModelConfig field (n_layer, n_embd, attention, ...), as in train.py
vocab_size = 0               # the student's vocabulary (scratch): 0 = the tokenizer's, padded to x64
dropout = 0.0
# the loss of mode='logits'
temperature = 2.0            # T: both distributions are softmax(z / T)
alpha = 0.5                  # loss = alpha * T^2 * KL + (1 - alpha) * CE on the real next token
kl = 'forward'               # 'forward': KL(p_teacher || q_student) | 'reverse': KL(q_student || p_teacher)
top_k_logits = 0             # keep the teacher's k most likely ids (+ one bucket for the rest); 0 = all
# mode='sequence': the teacher's corpus
seq_data_dir = 'data/distill_seq'   # where the samples are written (with a copy of the real val split)
num_samples = 1000           # documents sampled from the teacher
sample_length = 0            # tokens per document at most (it ends earlier at EOT); 0 = teacher's block_size
sample_temperature = 1.0     # 0: greedy
sample_top_k = 0             # 0: off
gen_batch_size = 64          # documents sampled together
generate_only = False        # write the corpus and stop
# task_dir: the instruction case
eval_prompts = 64            # held-out prompts answered (greedy) at each evaluation
max_new_tokens = 300         # the longest of those answers (tokens)
# optimizer and schedule (as in train.py)
optimizer = 'adamw'          # 'adamw' | 'muon' | 'muonclip'
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
muon_momentum = 0.95
qk_clip_tau = 100.0
lr_schedule = 'cosine'       # 'cosine' | 'wsd' | 'constant'
warmup_iters = 100
max_iters = 5000
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
config = configure(globals(), model_config=ModelConfig)
check_loop_settings(config)
# -----------------------------------------------------------------------------
problems = [msg for bad, msg in [
    (mode not in ('logits', 'sequence'), f"mode='{mode}'; valid: logits, sequence"),
    (temperature <= 0, f'temperature={temperature} must be > 0'),
    (not 0 <= alpha <= 1, f'alpha={alpha} must be in [0, 1] (1: the distillation loss alone on the main head, '
                          f'whose MoE / MTP terms stay; 0: hard labels alone)'),
    (kl not in ('forward', 'reverse'), f"kl='{kl}'; valid: forward, reverse"),
    (top_k_logits < 0, f'top_k_logits={top_k_logits} must be >= 0 (0: the full vocabulary)'),
    (num_samples < 1, f'num_samples={num_samples} must be at least 1'),
    (init_embedding not in ('random', 'teacher'), f"init_embedding='{init_embedding}'; valid: random, teacher"),
    (init_embedding == 'teacher' and init_from not in ('scratch', 'resume'),     # (a resumed run's own: kept)
     f"init_embedding='teacher' initialises a scratch student; init_from='{init_from}' already has its weights"),
    (sample_temperature < 0, f'sample_temperature={sample_temperature} must be >= 0 (0: greedy)'),
    (sample_top_k < 0 or sample_length < 0, 'sample_top_k and sample_length must be >= 0 (0: off / auto)'),
    (mode == 'sequence' and bool(task_dir), "mode='sequence' samples documents for pretraining data; "
                                            "with task_dir use mode='logits'"),
] if bad]
if problems:
    sys.exit('error: ' + '; '.join(problems))
rt = init_runtime(device, dtype, seed)
cuda_graph = use_cuda_graph(cuda_graph, rt.device_type)


def describe(spec):
    try:
        return f"{spec['kind']} tokenizer with {tokenizer_from_spec(spec).vocab_size:,} ids"
    except Exception:                                  # noqa: BLE001 (a spec we cannot rebuild offline)
        return f"{spec.get('kind')} tokenizer"


def require_same_tokenizer(spec_a, name_a, spec_b, name_b):
    """Distillation compares distributions id by id: both sides must use one tokenizer (the chat
    template's extra tokens aside)."""
    if base_spec(spec_a) != base_spec(spec_b):
        a, b = describe(spec_a), describe(spec_b)
        sys.exit(f'error: {name_a} uses a {a} but {name_b} uses a {b}'
                 + (' (the same kind and size, different vocabularies)' if a == b else '')
                 + '; the teacher and the student must share one tokenizer')


# --- the teacher: frozen ------------------------------------------------------------------------
resume = load_checkpoint(out_dir) if init_from == 'resume' else None
if resume and teacher and resume.get('teacher') and os.path.realpath(teacher) != os.path.realpath(resume['teacher']):
    sys.exit(f"error: {out_dir} was distilled from {resume['teacher']}; resuming it from another teacher "
             f"({teacher}) would not continue that run: leave teacher= out (or start a new out_dir)")
teacher = teacher or (resume or {}).get('teacher', '')
if not teacher:
    sys.exit("error: no teacher: set teacher='out/RUN' (a trained checkpoint folder, e.g. out/tinystories_moe)")
teacher_ckpt = load_checkpoint(teacher)
if teacher_ckpt.get('model_class') == 'scalar':
    sys.exit(f'error: the teacher {teacher} is a reward / value model; distillation needs a language model')
load = load_chat_model if task_dir else load_model       # the chat template's tokens for instructions
teacher_model, teacher_tok, teacher_ckpt = load(teacher, 'cpu', teacher_ckpt)
teacher_model.eval().requires_grad_(False)
teacher_model.to(rt.device)
if rt.device_type != 'cpu' and rt.dtype != 'float32':   # weights in the compute dtype (bf16); RoPE
    teacher_model.to(getattr(torch, rt.dtype))            # frequencies, router biases stay float32

# --- data and tokenizer ---------------------------------------------------------------------------
data_dir = data_dir or teacher_ckpt.get('data_dir', '')
if task_dir:
    tok = teacher_tok                         # the teacher's tokenizer, with the chat template
    tok_spec = tok.spec()
else:
    if not data_dir:
        sys.exit(f"error: the teacher {teacher} names no data_dir; set data_dir='data/NAME'")
    data = TokenData(data_dir)
    tok_spec = load_tokenizer_spec(data.meta['tokenizer'], data_dir)
    require_same_tokenizer(teacher_ckpt['tokenizer'], f'the teacher {teacher}', tok_spec, f'the data in {data_dir}')
    tok = tokenizer_from_spec(tok_spec)
V = tok.vocab_size                            # logits are compared on the real vocabulary only
if top_k_logits > V:
    sys.exit(f'error: top_k_logits={top_k_logits} exceeds the vocabulary ({V} ids); use at most {V} (or 0: all)')

# --- the student ----------------------------------------------------------------------------------
@torch.no_grad()
def project_embeddings(student, teacher_model, V):
    """The student's token table (and head) from the teacher's, at the student's width d (the
    weight inheritance of DistilBERT and Minitron, for a narrower student). E stacks the teacher's
    rows of the real vocabulary: its token table, and under it its head where the two are not one
    matrix (2V x D). The thin SVD E = U S W^T gives the best rank-d approximation of E
    (Eckart-Young), and one projection onto its d strongest directions, W_d (D x d), serves both:
    the student's table is T W_d and its head H W_d, so that their inner products keep the teacher's
    as far as d dimensions allow, token with token (T T^T ~ T W_d W_d^T T^T) and also head row with
    table row (H T^T, the logits of the residual stream's direct path from a token to the next).
    Two separate SVDs kept the first kind and put table and head in unrelated bases. A student that
    ties the two gets T W_d, W_d from [T; H] (the teacher's head, if untied, shapes the directions
    too). The rows are rescaled to the RMS of the student's own initialisation, the scale its
    optimizer expects (one factor for table and head, so their products keep their proportions)."""
    t_emb = teacher_model.tok_emb.weight[:V].float()
    t_head = teacher_model.lm_head.weight[:V].float()
    tied_teacher = teacher_model.config.tie_word_embeddings
    E = t_emb if tied_teacher else torch.cat([t_emb, t_head], 0)           # (V or 2V, D)
    d = student.config.n_embd
    if d > E.shape[1]:
        sys.exit(f"error: init_embedding='teacher' projects the teacher's {E.shape[1]} columns to the "
                 f"student's n_embd={d}; the student must not be wider")
    _, S, Wt = torch.linalg.svd(E, full_matrices=False)
    W_d = Wt[:d].T                                                         # (D, d)
    targets = [(student.tok_emb.weight, t_emb @ W_d)]
    if not student.config.tie_word_embeddings:
        targets.append((student.lm_head.weight, (t_emb if tied_teacher else t_head) @ W_d))
    w0 = student.tok_emb.weight
    rms = w0[:V].float().pow(2).mean().sqrt() / targets[0][1].pow(2).mean().sqrt()
    for w, rows in targets:
        w[:V] = (rows * rms).to(w)
    kept = (S[:d].pow(2).sum() / S.pow(2).sum()).item()                  # share of ||E||^2 the d directions hold
    print(f"init_embedding='teacher': the student's {'table and head' if len(targets) == 2 else 'table'} "
          f"({V}, {d}) from the teacher's {tuple(E.shape)}, projected to {d} of {E.shape[1]} dimensions "
          f"({kept:.1%} of its squared norm)")


torch.manual_seed(seed)                       # train.py's initial weights, the same on every rank
if init_from == 'scratch':
    block_size = config['block_size'] = block_size or teacher_model.config.block_size
    vocab_size = config['vocab_size'] = vocab_size or padded_vocab_size(V)
    model = GPT(model_config_from(config, ModelConfig))
    source = None
    if init_embedding == 'teacher':
        project_embeddings(model, teacher_model, V)
else:
    source = out_dir if init_from == 'resume' else init_from
    model, student_tok, _ = load(source, 'cpu', resume, overrides={'dropout': dropout})
    require_same_tokenizer(student_tok.spec(), f'the student {source}', tok_spec,
                           f'the teacher {teacher}' if task_dir else f'the data in {data_dir}')
    block_size = block_size or min(model.config.block_size, teacher_model.config.block_size)
    # the saved config describes the student trained (the checkpoint's architecture, as train.py does)
    # (the settings this command gives, in its config files or --key=value, that the checkpoint's differ from)
    differ = {k: v for k, v in model.config.to_dict().items()
              if k not in ('block_size', 'dropout') and k in last_given and config[k] != v
              and not (k == 'vocab_size' and config[k] == 0)}          # 0: the tokenizer's
    if differ and rt.master:
        print(f'note: the student {source} keeps its own architecture: '
              + ', '.join(f'{k}={v!r} (not {config[k]!r})' for k, v in differ.items()))
    config.update({**model.config.to_dict(), 'block_size': block_size})
if model.config.vocab_size < V:
    sys.exit(f'error: vocab_size={model.config.vocab_size} is smaller than the vocabulary ({V} ids)')
if block_size > min(model.config.block_size, teacher_model.config.block_size):
    sys.exit(f'error: block_size={block_size} exceeds the block_size of the student '
             f'({model.config.block_size}) or of the teacher ({teacher_model.config.block_size})')
model.to(rt.device)
compile_ = compile if compile is not None else rt.device_type == 'cuda'
teacher_forward = torch.compile(teacher_model) if compile_ else teacher_model
distilling = mode == 'logits' and alpha > 0   # else the teacher is run at evaluations only
unused = [k for k in ('temperature', 'kl', 'top_k_logits') if k in last_given]
if not distilling and unused and rt.master:
    print(f"note: {'alpha=0' if mode == 'logits' else 'mode=sequence'}: the student learns the next token alone; "
          f"{', '.join(unused)} (the loss of mode='logits' with alpha > 0) do nothing here")
if rt.master:
    s_act, t_act = model.active_params(), teacher_model.active_params()
    print(f'teacher {teacher}: {teacher_model.num_params() / 1e6:.2f}M parameters, {t_act / 1e6:.2f}M active, '
          f'{next(teacher_model.parameters()).dtype}; student: {model.num_params() / 1e6:.2f}M parameters, '
          f'{s_act / 1e6:.2f}M active ({s_act / t_act:.1%} of the teacher); {describe(tok_spec)}')


# --- mode='sequence': the teacher's corpus ---------------------------------------------------------
@torch.no_grad()
def sample_documents(n_docs, length):
    """n_docs documents (token-id lists) from the teacher, each begun from EOT, sampled in batches of
    gen_batch_size through the KV cache; a document ends at the teacher's EOT or after `length` tokens."""
    g = torch.Generator(device=rt.device).manual_seed(seed)
    docs = []
    with progress(total=n_docs, desc='sampling the teacher', unit='doc', dynamic_ncols=True) as bar:
        for start in range(0, n_docs, gen_batch_size):
            n = min(gen_batch_size, n_docs - start)
            idx = torch.full((n, 1), tok.eot_id, dtype=torch.long, device=rt.device)
            with rt.autocast():
                new = list(generate_tokens(
                    teacher_model, idx, length, temperature=sample_temperature, top_k=sample_top_k or None,
                    stop_ids=[tok.eot_id], vocab_limit=V, generator=g))
            for row in torch.stack(new, 1).tolist():
                end = row.index(tok.eot_id) if tok.eot_id in row else len(row)
                docs.append(row[:end])
            bar.update(n)
    return docs


def write_teacher_corpus(folder):
    """seq_data_dir in the prepare/ format: train.bin holds the teacher's samples, token for token,
    each followed by EOT (written by data.write_token_dataset; bytes counted from the decoded
    text), val.bin is a copy of the real data's with its token and byte counts. Kept and reused
    when its settings match; a folder holding another corpus is an error, never overwritten."""
    length = sample_length or teacher_model.config.block_size
    settings = {'teacher': teacher, 'teacher_step': teacher_ckpt.get('step'), 'num_samples': num_samples,
                'sample_length': length, 'sample_temperature': sample_temperature,
                'sample_top_k': sample_top_k, 'seed': seed, 'val_from': data_dir}
    meta_path = os.path.join(folder, 'meta.json')
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f).get('distill')
        if old == settings:
            print(f'{folder} already holds this corpus; reusing it')
            return
        sys.exit(f'error: {folder} holds another data set (settings {old}, wanted {settings}); '
                 f'delete it or set seq_data_dir= to a new folder')
    docs = sample_documents(num_samples, length)
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(os.path.join(data_dir, 'val.bin'), os.path.join(folder, 'val.bin.tmp'))
    os.replace(os.path.join(folder, 'val.bin.tmp'), os.path.join(folder, 'val.bin'))
    val_counts = {f'val_{k}': data.meta[f'val_{k}'] for k in ('tokens', 'bytes', 'docs')}
    write_token_dataset(folder, {'train': docs}, tok, source=f'samples of {teacher}',
                        extra_meta={**val_counts, 'val_source': data_dir, 'distill': settings})


if mode == 'sequence':
    if rt.master:
        write_teacher_corpus(seq_data_dir)
    if rt.ddp:
        torch.distributed.barrier()
    if generate_only:
        print(f'wrote {seq_data_dir}; train a student on it with python distill.py ... --mode=sequence, '
              f'or python train.py --data_dir={seq_data_dir} ...')
        close_runtime(rt)
        sys.exit(0)
    train_data = TokenData(seq_data_dir)
    if train_data.meta['dtype'] != data.meta['dtype']:
        sys.exit(f'error: {seq_data_dir} and {data_dir} store tokens as different types')
else:
    train_data = data if not task_dir else None

# --- the instruction case: chat-formatted examples ------------------------------------------------
if task_dir:
    def read_task(name, required):
        return read_prepared(task_dir, name, required,
                             hint='run python prepare/tinystories_instruct.py (or set task_dir=)')
    train_ex, cut = encode_chat_examples(tok, read_task('sft_train.jsonl', ('prompt', 'response')), block_size,
                                         show_progress=rt.master)
    val_ex, _ = encode_chat_examples(tok, read_task('sft_val.jsonl', ('prompt', 'response')), block_size)
    # the story task's held-out prompts, where the folder has them (prepare/chat.py's has none)
    has_prompts = os.path.isfile(os.path.join(task_dir, 'prompts_val.jsonl'))
    prompts = read_task('prompts_val.jsonl', ('prompt', 'words'))[:eval_prompts] if eval_prompts and has_prompts else []
    if rt.master:
        print(f'{len(train_ex):,} training and {len(val_ex):,} validation examples ({cut} cut to block_size), '
              f'{len(prompts)} held-out prompts')


def train_batch(step, micro_step):
    """(x, y, segments) of this micro-step, a function of (seed, step, the micro-batch's global
    index) as in train.py; y is -1 where no loss falls (prompts in the instruction case), whose
    packed examples attend to themselves alone (segments, as in sft.py; None for token data)."""
    g = run.batch_generator(step, micro_step)
    if task_dir:
        rows, segments = pack_chat_examples(train_ex, range(len(train_ex)), batch_size, block_size, g)
        x, y = chat_batch(rows, tok.eot_id, block_size)
        return x.to(rt.device), y.to(rt.device), segments.to(rt.device)
    return *train_data.batch('train', batch_size, block_size, g, rt.device), None


def distillation_loss(model, x, y, segments=None):
    """(loss, the T^2 KL term or None): alpha T^2 KL + (1 - alpha) CE on the real next token, plus
    the student's MoE balance and MTP terms; KL(teacher || student) with kl='forward',
    KL(student || teacher) with 'reverse', over the top_k_logits ids; with alpha = 0 (or
    mode='sequence') train.py's loss alone, and the teacher rests. segments: packed examples kept
    apart, in the teacher's forward and the student's alike."""
    if not distilling:
        return model(x, y, return_logits=False, segments=segments)[1], None
    with torch.no_grad():                     # the teacher's logits, before the student's forward
        teacher_logits = teacher_forward(x, segments=segments)[0]
    logits, loss = model(x, y, segments=segments)   # CE on the real next token + the student's MoE / MTP terms
    ce = masked_cross_entropy(logits, y)      # that CE again, with its gradient, to re-weight it
    # T^2 KL to the teacher's softened (top-k) distribution, a few thousand positions at a time
    kd = chunked_distillation_kl(logits, teacher_logits, temperature, kl, y >= 0, V, top_k_logits)
    return loss + alpha * (kd - ce), kd.detach()   # (1 - alpha) CE + alpha T^2 KL + the MoE / MTP terms


# --- evaluation -----------------------------------------------------------------------------------
teacher_scores = {}                           # the teacher's task score, measured once


@torch.no_grad()
def held_out(model, batches):
    """Over (x, y) batches: the student's mean cross entropy per target token, its mean
    KL(p_teacher || q_student) at T = 1 over the real vocabulary, and the teacher's cross entropy.
    (val/kl is this forward KL whatever the run trains on, kl, temperature and top_k_logits alike, so
    that runs of different settings compare; train/kd_loss is the training objective's T^2 KL.)"""
    ce = kl_ = teacher_ce = 0.0
    n = 0
    for x, y in batches:
        with rt.autocast():
            logits = model(x)[0]
            teacher_logits = teacher_forward(x)[0]
        mask = y >= 0
        k = int(mask.sum())
        ce += masked_cross_entropy(logits, y).item() * k
        teacher_ce += masked_cross_entropy(teacher_logits, y).item() * k
        kl_ += chunked_distillation_kl(logits, teacher_logits, 1.0, 'forward', mask, V).item() * k
        n += k
    n = max(n, 1)
    return ce / n, kl_ / n, teacher_ce / n


def evaluate(model):
    if task_dir:
        batches = [tuple(t.to(rt.device) for t in chat_batch(val_ex[k:k + batch_size], tok.eot_id))
                   for k in range(0, min(len(val_ex), eval_iters * batch_size), batch_size)]
        ce, kl_val, teacher_ce = held_out(model, batches)
        metrics = {'val/loss': ce, 'val/kl': kl_val, 'val/teacher_loss': teacher_ce}
        if prompts:
            r = evaluate_task(model, tok, prompts, max_new_tokens, 0.0, autocast=rt.autocast, seed=seed,
                              cuda_graph=cuda_graph)
            if not teacher_scores:
                t = evaluate_task(teacher_model, tok, prompts, max_new_tokens, 0.0, autocast=rt.autocast, seed=seed,
                                  cuda_graph=cuda_graph)
                teacher_scores.update({'task/teacher_score_greedy': t['score']})
            metrics.update({'task/score_greedy': r['score'], 'task/all_words_greedy': r['all_words'],
                            **teacher_scores})
            print(f"  prompt: {r['example']['prompt']}\n  greedy answer: {r['example']['answer'][:300]!r}")
        return metrics
    out = {}
    # the same fixed batches as train.py's, of the train split and every held-out one (val, and e.g.
    # val_tinystories)
    for split, d in (('train', train_data), *((s, data) for s in data.val_splits)):
        batches = (d.batch(split, batch_size, block_size, eval_generator(k, split), rt.device)
                   for k in range(eval_iters))
        out[split] = held_out(model, batches)              # (CE, KL to the teacher, the teacher's CE)
    metrics = {}
    for split in data.val_splits:                # bits per byte = nats per token / ln 2 / bytes per token
        metrics[f'{split}/loss'] = out[split][0]
        metrics[f'{split}/bpb'] = out[split][0] / math.log(2) / data.bytes_per_token(split)
    _, kl_val, teacher_val = out['val']
    # the train split's too: a teacher much surer on the text it was trained on (its train loss far
    # below its val loss) teaches targets sharper than what generalises
    return {**metrics, 'val/ppl': math.exp(min(out['val'][0], 50)), 'val/kl': kl_val, 'val/teacher_loss': teacher_val,
            'train/eval_loss': out['train'][0], 'train/eval_kl': out['train'][1], 'train/teacher_loss': out['train'][2]}


flops_per_token = model.flops_per_token(block_size) + (    # + the teacher's forward (1/3 of training)
    teacher_model.flops_per_token(block_size, mtp=False) / 3 if distilling else 0)   # (its MTP modules rest)
# optimizer, FSDP / DDP, torch.compile, the log, and the resumed optimizer state, step and RNG
parent = (resume.get('parent') if resume is not None else source) or 'scratch'   # what the student started from
run = Run(config, rt, model, 'distill', tok_spec, flops_per_token, resume=resume,
          checkpoint_extra={'data_dir': data_dir, 'teacher': teacher, 'parent': parent,
                            'task_dir': task_dir, 'seq_data_dir': seq_data_dir if mode == 'sequence' else ''})
resume = None                                 # free the CPU copy

# --- the training loop ----------------------------------------------------------------------------
plots = (('train/lm_loss', 'val/loss', 'val/teacher_loss'), 'loss.png', 'loss (nats/token)')   # (lm: the CE alone)
tokens_per_step = batch_size * block_size * gradient_accumulation_steps      # per rank
step = run.step                               # 0, or where a resumed run stopped
while run.evaluate(step, evaluate, plots):    # every eval_interval steps: evaluate, plot, save
    lr = run.set_lr(step)
    loss, kd_mean = torch.zeros((), device=rt.device), None
    micro_batches = [train_batch(step, micro) for micro in range(gradient_accumulation_steps)]
    # a micro-batch's mean loss counts by its share of the step's scored tokens (all ranks'), which
    # varies with instruction data (task_dir): w_m = world_size * n_m / N, the mean of one large batch
    share = run.token_share_weights([(y >= 0).sum() for _, y, _ in micro_batches])
    for micro, (x, y, segments) in enumerate(micro_batches):
        with run.sync(micro):                 # DDP / FSDP reduce gradients on the last micro-step only
            with rt.autocast():
                micro_loss, kd = distillation_loss(run.model, x, y, segments)
                micro_loss = micro_loss * share[micro]
            run.backward(micro_loss)
        loss += micro_loss.detach()
        if kd is not None:                    # the KL's mean over the step's tokens, like the loss
            kd_mean = (0 if kd_mean is None else kd_mean) + kd * share[micro]
    out = run.optimizer_step()                # clip, step, zero grads, router biases, QK-Clip
    step += 1
    if not run.log(step, lr, loss, tokens_per_step, out, {} if kd_mean is None else {'kd_loss': kd_mean}):
        break                                 # (every log_interval steps; False: NaN/inf loss)
run.finish(plots)
close_runtime(rt)
