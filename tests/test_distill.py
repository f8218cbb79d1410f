"""distill.py and its losses (model.teacher_log_probs, model.distillation_kl): hand-computed values,
a student moving toward its teacher, the sequence-level corpus, exact resume, refusals."""

import json
import math
import os

import pytest
import torch

from checkpoint import load_checkpoint, load_model
from data import TokenData, write_token_dataset
from conftest import TEXT, TINY_MODEL, run_script, run_script_many
from model import GPT, ModelConfig, chunked_distillation_kl, distillation_kl, teacher_log_probs
from tokenizer import ByteTokenizer, CharTokenizer

# --- the losses -----------------------------------------------------------------------------


def kd(student, teacher, T=1.0, kind='forward', top_k=0, vocab=None, mask=None):
    return distillation_kl(student, teacher_log_probs(teacher, T, top_k, vocab), T, kind, mask, vocab)


@pytest.mark.parametrize('kind', ['forward', 'reverse'])
@pytest.mark.parametrize('top_k', [0, 3])
def test_the_chunked_kl_equals_the_whole_one_in_value_and_gradient(kind, top_k):
    # 2 x 7 = 14 positions in chunks of 4 (the last one short), a mask, a padded student vocabulary
    torch.manual_seed(0)
    teacher = torch.randn(2, 7, 10) * 2
    mask = torch.rand(2, 7) > 0.3
    grads = []
    for chunked in (False, True):
        student = (torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_()
        loss = (chunked_distillation_kl(student, teacher, 2.0, kind, mask, 10, top_k, chunk=4) if chunked
                else kd(student, teacher, 2.0, kind, top_k, 10, mask))
        loss.backward()
        grads.append((loss.detach(), student.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])
    assert grads[0][1][..., 10:].abs().max() == 0 and grads[0][1][~mask].abs().max() == 0


@pytest.mark.parametrize('kind', ['forward', 'reverse'])
@pytest.mark.parametrize('top_k', [0, 3, 10])
def test_kl_is_zero_when_the_student_is_the_teacher(kind, top_k):
    torch.manual_seed(0)
    z = torch.randn(2, 5, 10) * 3
    for T in (1.0, 0.5, 4.0):
        assert abs(kd(z, z, T, kind, top_k, vocab=10).item()) < 1e-6
    # a student whose vocabulary is padded past the tokenizer's: the padding is not compared
    padded = torch.cat([z, torch.randn(2, 5, 6) * 5], -1)
    teacher_padded = torch.cat([z, torch.randn(2, 5, 2)], -1)
    assert abs(kd(padded, teacher_padded, 2.0, kind, top_k, vocab=10).item()) < 1e-6
    # two models with the same weights
    model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16))
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert abs(kd(model(x)[0], model(x)[0], 2.0, kind, top_k, vocab=60).item()) < 1e-6


def test_temperature_scaling_by_hand():
    zt, zs, T = [1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 2.0, 1.0], 2.0

    def softmax(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]
    p, q = softmax(zt), softmax(zs)
    forward = T ** 2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    reverse = T ** 2 * sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    s = torch.tensor([zs], requires_grad=True)
    t = torch.tensor([zt])
    assert kd(s, t, T).item() == pytest.approx(forward, rel=1e-5)
    assert kd(s, t, T, 'reverse').item() == pytest.approx(reverse, rel=1e-5)
    kd(s, t, T).backward()                                   # d(T^2 KL(p||q))/dz_S = T (q - p)
    torch.testing.assert_close(s.grad[0], T * (torch.tensor(q) - torch.tensor(p)))
    # T = 1 is plain KL; a mask drops positions
    p1 = torch.softmax(t, -1)
    plain = (p1 * (p1.log() - torch.log_softmax(s.detach(), -1))).sum()
    assert kd(s, t, 1.0).item() == pytest.approx(plain.item(), rel=1e-5)
    both = torch.stack([s.detach()[0], torch.zeros(4)])[None]          # (1, 2, 4)
    assert kd(both, torch.stack([t[0], t[0]])[None], T, mask=torch.tensor([[True, False]])).item() == \
        pytest.approx(forward, rel=1e-5)


def test_high_temperature_is_logit_matching():
    # T^2 KL(p||q) -> sum_i (a_i - b_i)^2 / 2V, a and b the mean-centred logits (Hinton et al. 2015)
    torch.manual_seed(1)
    zt, zs = torch.randn(16), torch.randn(16)
    a, b = zt - zt.mean(), zs - zs.mean()
    limit = ((a - b) ** 2).sum().item() / (2 * 16)
    assert kd(zs[None], zt[None], 30.0).item() == pytest.approx(limit, rel=1e-2)   # float32: far higher T is noise
    assert kd(zs[None], zt[None], 30.0, "reverse").item() == pytest.approx(limit, rel=1e-2)
    assert kd(zs[None], zt[None], 1.0).item() > 1.1 * limit                   # not at T = 1


def test_top_k_keeps_a_bucket_for_the_rest():
    torch.manual_seed(2)
    zt, zs = torch.randn(3, 7, 12), torch.randn(3, 7, 12)
    for kind in ('forward', 'reverse'):              # k = V: the full loss
        torch.testing.assert_close(kd(zs, zt, 2.0, kind, top_k=12, vocab=12), kd(zs, zt, 2.0, kind))
    logp, ids = teacher_log_probs(zt, 2.0, 4, 12)
    assert logp.shape == (3, 7, 5) and ids.shape == (3, 7, 4)      # k ids + the rest: O(k), not O(V)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 7))
    # by hand at one position: teacher top-2 of [3, 1, 2, 0] at T = 1 are ids 0 and 2
    t, s = torch.tensor([[3.0, 1.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    p, q = torch.softmax(t, -1)[0].tolist(), torch.softmax(s, -1)[0].tolist()
    P, Q = [p[0], p[2], p[1] + p[3]], [q[0], q[2], q[1] + q[3]]
    assert kd(s, t, 1.0, top_k=2, vocab=4).item() == pytest.approx(
        sum(a * math.log(a / b) for a, b in zip(P, Q)), rel=1e-5)
    assert kd(s, t, 1.0, top_k=2, vocab=4).item() <= kd(s, t, 1.0).item()    # a lower bound
    # gradients stay finite with the bucket
    s.requires_grad_(True)
    for kind in ('forward', 'reverse'):
        kd(s, t, 2.0, kind, top_k=2, vocab=4).backward()
        assert torch.isfinite(s.grad).all()


# --- distill.py -------------------------------------------------------------------------------

TEACHER = ['--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu', '--bias=False']
STUDENT = ['--n_layer=1', '--n_head=2', '--n_embd=16', '--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu',
           '--bias=False', '--block_size=32', '--batch_size=4', '--eval_iters=4', '--log_interval=1',
           '--peak_flops=1e12', '--compile=False', '--device=cpu', '--learning_rate=3e-3', '--warmup_iters=2']


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A byte-level dataset and a tiny teacher trained on it, in one folder."""
    root = tmp_path_factory.mktemp('distill')
    docs = [TEXT[i:i + 300] for i in range(0, len(TEXT), 300)]
    write_token_dataset(str(root / 'data'), {'train': docs[:-4], 'val': docs[-4:]}, ByteTokenizer(), 'test',
                        num_proc=1)
    run_script('train.py', '--data_dir=data', '--out_dir=teacher', *TINY_MODEL, *TEACHER, '--max_iters=60',
               '--eval_interval=60', '--learning_rate=3e-3', '--warmup_iters=5', cwd=root)
    return root


def distill(root, out, *extra, check=True):
    return run_script('distill.py', '--teacher=teacher', f'--out_dir={out}', *STUDENT, *extra, cwd=root, check=check)


def log_rows(folder):
    return [json.loads(line) for line in open(os.path.join(folder, 'log.jsonl'))]


@pytest.mark.parametrize('loss', [['--kl=forward', '--temperature=1.0'],
                                  ['--kl=reverse', '--top_k_logits=8', '--temperature=2.0']])
def test_student_moves_toward_the_teacher(tiny, loss):
    out = 'student_' + loss[0][5:]
    p = distill(tiny, out, '--alpha=1.0', '--max_iters=30', '--eval_interval=15', *loss)
    assert '% of the teacher)' in p.stdout
    rows = [r for r in log_rows(tiny / out) if 'val/kl' in r]
    assert [r['step'] for r in rows] == [0, 15, 30]
    assert rows[-1]['val/kl'] < 0.7 * rows[0]['val/kl'], rows              # held-out KL to the teacher falls
    assert rows[-1]['val/loss'] < rows[0]['val/loss']
    assert all(r['val/teacher_loss'] == rows[0]['val/teacher_loss'] for r in rows)
    assert all(r['train/teacher_loss'] == rows[0]['train/teacher_loss'] and r['train/eval_kl'] >= 0 for r in rows)
    assert all('train/kd_loss' in r for r in log_rows(tiny / out) if 'train/loss' in r)
    ckpt = load_checkpoint(str(tiny / out))                  # a plain language-model checkpoint
    assert ckpt['stage'] == 'distill' and ckpt['data_dir'] == 'data' and ckpt['teacher'] == 'teacher'
    model, tok, _ = load_model(str(tiny / out))
    assert model.config.n_embd == 16 and tok.kind == 'byte'
    if loss[0] == '--kl=forward':
        p = run_script('eval.py', f'--out_dir={out}', '--n_prompts=0', '--eval_iters=2', '--device=cpu', cwd=tiny)
        assert p.stdout.strip().splitlines()[-1].startswith(f'| {out} | distill | 30 |')
        p = run_script('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=8', '--device=cpu',
                       cwd=tiny)


def test_student_embedding_from_the_teacher(tiny):
    """init_embedding='teacher': the student's tied table is the teacher's table projected onto its
    n_embd strongest directions (Gram matrix = the rank-16 truncation's, up to the rescaling), and
    the student it starts is closer to the teacher than a random one after the same steps."""
    runs = {}
    for init in ('random', 'teacher'):
        p = distill(tiny, f'emb_{init}', f'--init_embedding={init}', '--alpha=1.0', '--max_iters=20',
                    '--eval_interval=20', '--learning_rate=1e-3')
        runs[init] = [r for r in log_rows(tiny / f'emb_{init}') if 'val/kl' in r]
    assert "init_embedding='teacher': the student's table (257, 16) from the teacher's (257, 32)" in p.stdout
    assert runs['teacher'][-1]['val/kl'] < runs['random'][-1]['val/kl'], runs
    assert runs['teacher'][0]['val/loss'] != runs['random'][0]['val/loss']
    p = distill(tiny, 'emb_step0', '--init_embedding=teacher', '--max_iters=1', '--learning_rate=0', '--min_lr=0')
    student, _, _ = load_model(str(tiny / 'emb_step0'))
    teacher, _, _ = load_model(str(tiny / 'teacher'))
    E, S_ = teacher.tok_emb.weight[:257].double(), student.tok_emb.weight[:257].double()
    U, S, _ = torch.linalg.svd(E, full_matrices=False)
    gram_rank16 = (U[:, :16] * S[:16] ** 2) @ U[:, :16].T
    gram = S_ @ S_.T
    scale = (gram * gram_rank16).sum() / (gram_rank16 ** 2).sum()
    torch.testing.assert_close(gram, scale * gram_rank16, atol=1e-5 * gram.abs().max().item(), rtol=0)
    p = distill(tiny, 'bad', '--init_embedding=teacher', '--n_embd=64', '--max_iters=1', check=False)
    assert p.returncode != 0 and "the student must not be wider" in p.stderr
    # an untied teacher and student: one projection for table and head, so the student's head rows
    # meet its table rows as the teacher's do (H T^T, the direct path from a token to the next). Two
    # SVDs, one a matrix, put them in unrelated bases: a cosine of 0.17 with the teacher's at d = 16
    run_script('train.py', '--data_dir=data', '--out_dir=untied', *TINY_MODEL, *TEACHER, '--max_iters=30',
               '--eval_interval=30', '--learning_rate=3e-3', '--warmup_iters=5', '--tie_word_embeddings=False',
               cwd=tiny)
    p = run_script('distill.py', '--teacher=untied', '--out_dir=emb_untied', *STUDENT, '--tie_word_embeddings=False',
                   '--init_embedding=teacher', '--max_iters=1', '--learning_rate=0', '--min_lr=0', cwd=tiny)
    assert "the student's table and head (257, 16) from the teacher's (514, 32)" in p.stdout
    student, _, _ = load_model(str(tiny / 'emb_untied'))
    teacher, _, _ = load_model(str(tiny / 'untied'))
    ours = student.lm_head.weight[:257].double() @ student.tok_emb.weight[:257].double().T
    theirs = teacher.lm_head.weight[:257].double() @ teacher.tok_emb.weight[:257].double().T
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.5


def test_hard_labels_alone_are_train_py(tiny):
    """alpha = 0: the same initial weights, batches and losses as train.py with the same seed."""
    run_script('train.py', '--data_dir=data', '--out_dir=scratch', *STUDENT, '--max_iters=6', '--eval_interval=6',
               cwd=tiny)
    p = distill(tiny, 'alpha0', '--alpha=0.0', '--max_iters=6', '--eval_interval=6', '--temperature=3.0')
    a = [r['train/loss'] for r in log_rows(tiny / 'scratch') if 'train/loss' in r]
    b = [r['train/loss'] for r in log_rows(tiny / 'alpha0') if 'train/loss' in r]
    assert a == b and len(a) == 6
    assert 'note: alpha=0: the student learns the next token alone; temperature (the loss' in p.stdout   # said


def test_a_longer_student_checkpoint_trains_at_the_teachers_length(tiny):
    """init_from= a student whose block_size (64) exceeds the teacher's (32): block_size=0 takes the
    shorter of the two; the run's saved config is the student checkpoint's architecture."""
    run_script('train.py', '--data_dir=data', '--out_dir=long_student', *STUDENT, '--block_size=64', '--n_embd=24',
               '--max_iters=1', '--eval_interval=1', cwd=tiny)
    p = distill(tiny, 'from_long', '--init_from=long_student', '--block_size=0', '--max_iters=2', '--eval_interval=2')
    config = load_checkpoint(str(tiny / 'from_long'))['config']
    assert config['block_size'] == 32, p.stdout[-500:]
    # the saved config is the student's (n_embd 24), not the command line's keys (16), and it says so
    assert config['n_embd'] == 24 and 'keeps its own architecture' in p.stdout and 'n_embd=24 (not 16)' in p.stdout


def test_resume_continues_exactly(tiny):
    args = ['--alpha=0.5', '--temperature=2.0', '--top_k_logits=16', '--dropout=0.1', '--lr_decay_iters=8',
            '--eval_interval=4', '--gradient_accumulation_steps=2', '--init_embedding=teacher']   # (as Ctrl-C's
    # resume command repeats it: a start-only setting, kept by the resumed run)
    distill(tiny, 'straight', '--max_iters=8', *args)
    distill(tiny, 'split', '--max_iters=4', *args)
    distill(tiny, 'split', '--max_iters=8', '--init_from=resume', '--teacher=', *args)   # teacher from ckpt
    a = [(r['train/loss'], r['train/kd_loss']) for r in log_rows(tiny / 'straight') if 'train/loss' in r]
    b = [(r['train/loss'], r['train/kd_loss']) for r in log_rows(tiny / 'split') if 'train/loss' in r]
    assert a == b and len(a) == 8
    other = distill(tiny, 'split', '--max_iters=8', '--init_from=resume', '--teacher=straight', *args, check=False)
    assert other.returncode and 'split was distilled from teacher; resuming it from another teacher' in other.stderr
    pa, pb = load_checkpoint(str(tiny / 'straight'))['model'], load_checkpoint(str(tiny / 'split'))['model']
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert load_checkpoint(str(tiny / 'split'))['parent'] == 'scratch'     # what it started from, not itself


def test_sequence_mode_writes_a_dataset_that_train_py_trains_on(tiny):
    gen = ['--mode=sequence', '--seq_data_dir=seq', '--num_samples=10', '--sample_length=40', '--gen_batch_size=4']
    p = distill(tiny, 'seq_student', *gen, '--generate_only=True')
    assert 'sampling the teacher' in p.stderr
    data, real = TokenData(str(tiny / 'seq')), TokenData(str(tiny / 'data'))
    assert data.meta['train_docs'] == 10 and data.meta['distill']['teacher'] == 'teacher'
    train = data.tokens('train')
    assert (train == 256).sum() == 10 and train[-1] == 256                   # each document ends with EOT
    assert 10 <= data.meta['train_tokens'] <= 10 * 41 and data.meta['train_bytes'] > 0
    assert (tiny / 'seq' / 'val.bin').read_bytes() == (tiny / 'data' / 'val.bin').read_bytes()   # real val
    assert data.bytes_per_token('val') == real.bytes_per_token('val')
    run_script('train.py', '--data_dir=seq', '--out_dir=seq_train', *STUDENT, '--max_iters=3', '--eval_interval=3',
               cwd=tiny)
    p = distill(tiny, 'seq_student', *gen, '--max_iters=3', '--eval_interval=3')
    assert 'already holds this corpus; reusing it' in p.stdout
    ckpt = load_checkpoint(str(tiny / 'seq_student'))
    assert ckpt['stage'] == 'distill' and ckpt['data_dir'] == 'data' and ckpt['seq_data_dir'] == 'seq'
    assert ckpt['metrics']['val/loss'] == pytest.approx(
        load_checkpoint(str(tiny / 'seq_train'))['metrics']['val/loss'], rel=1e-5)   # train.py's run
    p = distill(tiny, 'seq_student', *gen, '--num_samples=11', check=False)     # never overwritten
    assert p.returncode != 0 and 'holds another data set' in p.stderr


def test_bad_input_is_refused(tiny):
    char = CharTokenizer.train([TEXT])
    write_token_dataset(str(tiny / 'char'), {'train': [TEXT[:-500]], 'val': [TEXT[-500:]]}, char, 'test', num_proc=1)
    run_script('train.py', '--data_dir=char', '--out_dir=char_model', *STUDENT, '--max_iters=1', cwd=tiny)
    cases = [
        (['--mode=online'], "mode='online'; valid: logits, sequence"),
        (['--temperature=0'], 'temperature=0.0 must be > 0'),
        (['--alpha=1.5'], 'alpha=1.5 must be in [0, 1]'),
        (['--kl=js'], "kl='js'; valid: forward, reverse"),
        (['--init_embedding=copy'], "init_embedding='copy'; valid: random, teacher"),
        (['--init_embedding=teacher', '--init_from=char_model'], "init_embedding='teacher' initialises a scratch"),
        (['--teacher='], "no teacher: set teacher='out/RUN'"),
        (['--teacher=nowhere'], "no checkpoint at 'nowhere'"),
        (['--top_k_logits=300'], 'top_k_logits=300 exceeds the vocabulary (257 ids)'),
        (['--data_dir=char'], 'the teacher teacher uses a byte tokenizer with 257 ids but the data in char '
                              'uses a char tokenizer with'),
        (['--init_from=char_model'], 'the student char_model uses a char tokenizer with 34 ids but the data in '
                                     'data uses a byte tokenizer with 257 ids'),
    ]
    runs = run_script_many('distill.py', [['--teacher=teacher', '--out_dir=bad', *STUDENT, *args, '--max_iters=1']
                                          for args, _ in cases], cwd=tiny)
    for (args, message), p in zip(cases, runs):
        assert p.returncode != 0 and message in p.stderr, (args, p.stderr[-500:])


def test_instruction_data_with_an_sft_teacher(pipeline):
    sft = ['--task_dir=inst', '--batch_size=4', '--block_size=256', '--eval_iters=2', '--eval_prompts=2',
           '--max_new_tokens=8', '--compile=False', '--device=cpu', '--peak_flops=1e12', '--log_interval=1']
    run_script('sft.py', '--init_from=base', '--out_dir=sft_teacher', *sft, '--max_iters=4', '--eval_interval=4',
               cwd=pipeline)
    run_script('distill.py', '--teacher=sft_teacher', '--out_dir=distill_sft', *sft, '--max_iters=6',
               '--eval_interval=6', '--n_layer=1', '--n_head=2', '--n_embd=16', '--pos_emb=rope',
               '--learning_rate=3e-3', '--warmup_iters=2', cwd=pipeline)
    rows = [r for r in log_rows(pipeline / 'distill_sft') if 'val/kl' in r]
    assert {'task/score_greedy', 'task/teacher_score_greedy', 'val/teacher_loss'} <= set(rows[-1])
    assert rows[-1]['val/kl'] < rows[0]['val/kl']
    ckpt = load_checkpoint(str(pipeline / 'distill_sft'))
    assert ckpt['tokenizer']['chat'] and ckpt['task_dir'] == 'inst' and ckpt['data_dir'] == 'data'
    assert ckpt['model_config']['vocab_size'] == 320                       # 257 + 3 chat tokens, padded
    p = run_script('eval.py', '--out_dir=distill_sft', '--task_dir=inst', '--n_prompts=2', '--max_new_tokens=8',
                   '--eval_iters=2', '--batch_size=2', '--device=cpu', cwd=pipeline)
    cells = p.stdout.strip().splitlines()[-1].split('|')
    assert cells[2].strip() == 'distill' and float(cells[5]) > 0 and 0 <= float(cells[6]) <= 1   # bpb, task score


def test_every_held_out_split_is_evaluated_as_train_py_does(tiny):
    """Loss and bits per byte of each held-out split (val, and e.g. the story corpus's val_tinystories)."""
    docs = [TEXT[i:i + 300] for i in range(0, len(TEXT), 300)]
    write_token_dataset(str(tiny / 'two_vals'), {'train': docs[:-4], 'val': docs[-4:-2], 'val_other': docs[-2:]},
                        ByteTokenizer(), 'test', num_proc=1)
    distill(tiny, 'student_two_vals', '--data_dir=two_vals', '--max_iters=2', '--eval_interval=2')
    row = [r for r in log_rows(tiny / 'student_two_vals') if 'val/loss' in r][-1]
    assert {'val/loss', 'val/bpb', 'val_other/loss', 'val_other/bpb', 'val/kl', 'val/teacher_loss'} <= set(row), row
    assert row['val_other/loss'] != row['val/loss']


def test_mfu_counts_the_teachers_forward_without_its_mtp_modules(tiny):
    """The teacher runs one forward without targets, so its MTP modules rest: the logged MFU counts
    the student's training (its own MTP module included) + a third of the teacher's main model."""
    run_script('train.py', '--data_dir=data', '--out_dir=mtp_teacher', *TINY_MODEL, *TEACHER, '--mtp_depth=1',
               '--max_iters=2', '--eval_interval=2', cwd=tiny)
    run_script('distill.py', '--teacher=mtp_teacher', '--out_dir=student_of_mtp', *STUDENT, '--mtp_depth=1',
               '--max_iters=2', '--eval_interval=2', cwd=tiny)
    row = next(r for r in log_rows(tiny / 'student_of_mtp') if 'mfu' in r)
    student = GPT(ModelConfig(**load_checkpoint(str(tiny / 'student_of_mtp'))['model_config']))
    teacher = GPT(ModelConfig(**load_checkpoint(str(tiny / 'mtp_teacher'))['model_config']))
    expected = student.flops_per_token(32) + teacher.flops_per_token(32, mtp=False) / 3
    assert row['mfu'] * 1e12 / row['tokens_per_sec'] == pytest.approx(expected, rel=1e-6)
