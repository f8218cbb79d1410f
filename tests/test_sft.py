"""The chat template, response-only masking, prepare/tinystories_instruct.py, sft.py and eval.py."""

import json
import os
import re
import shutil

import pytest
import torch

from checkpoint import load_chat_model, load_checkpoint
from data import chat_batch, encode_chat_examples, neighbours_in_length, pack_chat_examples, word_token_weights
from generate import generate_chat, use_cuda_graph
from conftest import STORIES, run_script, run_script_many, run_scripts, shared_file
from model import GPT, ModelConfig
from tokenizer import (CHAT_TOKENS, EOT, ByteTokenizer, CharTokenizer, gpt2_tokenizer, tokenizer_from_spec,
                       with_chat_tokens)

# --- the template ---------------------------------------------------------------------------

def test_template_tokens_keep_existing_ids():
    base = CharTokenizer.train(['hello world'])
    chat = with_chat_tokens(base)
    assert chat.encode('hello') == base.encode('hello') and chat.eot_id == base.eot_id
    assert [chat.special_tokens[t] for t in CHAT_TOKENS.values()] == [base.vocab_size + i for i in range(3)]
    again = tokenizer_from_spec(chat.spec())                        # stored in the spec
    assert again.chat == CHAT_TOKENS and again.special_tokens == chat.special_tokens
    assert with_chat_tokens(chat).special_tokens == chat.special_tokens   # idempotent


def test_template_round_trip():
    tok = with_chat_tokens(ByteTokenizer())
    ids, mask = tok.encode_chat('Write a story.', 'Once.')
    assert tok.decode(ids) == f"{EOT}<|user|>Write a story.<|end|><|assistant|>Once.<|end|>"
    assert [tok.decode([i]) for i, m in zip(ids, mask) if m] == list('Once.') + ['<|end|>']
    prompt_ids, prompt_mask = tok.encode_chat('Write a story.')
    assert ids[:len(prompt_ids)] == prompt_ids and not any(prompt_mask)
    assert prompt_ids[-1] == tok.chat_id('assistant') and tok.stop_ids() == [tok.chat_id('end'), tok.eot_id]


def test_gpt2_template_ids_fit_the_padded_vocabulary():
    tok = with_chat_tokens(gpt2_tokenizer(shared_file('gpt2.tiktoken')))
    assert [tok.special_tokens[t] for t in CHAT_TOKENS.values()] == [50257, 50258, 50259]
    assert tok.vocab_size == 50260 <= 50304


def test_masking_puts_no_loss_on_prompt_or_padding():
    tok = with_chat_tokens(ByteTokenizer())
    rows = [tok.encode_chat('Say hi.', 'Hi!'), tok.encode_chat('A much longer prompt here.', 'Ok.')]
    x, y = chat_batch(rows, tok.eot_id)
    for (ids, mask), yrow in zip(rows, y):
        n_prompt = mask.index(True)
        assert (yrow[:n_prompt - 1] == -1).all()                    # predicting prompt tokens: no loss
        assert yrow[n_prompt - 1:len(ids) - 1].tolist() == ids[n_prompt:]   # the response and <|end|>
        assert (yrow[len(ids) - 1:] == -1).all()                    # padding
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=64))
    _, loss = model(x, y)
    loss.backward()
    logits, _ = model(x)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 320), y.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, ref)
    # changing a prompt token's target changes nothing: it carries no loss
    x2 = x.clone()
    x2[0, 3] = (x2[0, 3] + 1) % 256
    assert model(x2[:, :4])[0][0, 2].sum() == model(x[:, :4])[0][0, 2].sum()


def test_a_padded_batch_takes_neighbours_in_length_without_wrapping():
    """neighbours_in_length: batch_size consecutive examples of the length-ordered pool, never the
    longest ones together with the shortest (the pool wraps only when smaller than the batch)."""
    examples = list(range(100, 110))                        # stand-ins for (ids, mask), in length order
    for seed in range(200):
        batch = neighbours_in_length(examples, range(10), 4, torch.Generator().manual_seed(seed))
        assert batch == list(range(batch[0], batch[0] + 4)) and batch[-1] <= 109, batch
    assert neighbours_in_length(examples, range(3), 5, torch.Generator()) in (
        [100, 101, 102, 100, 101], [101, 102, 100, 101, 102], [102, 100, 101, 102, 100])


def test_a_packed_row_trains_each_example_as_if_it_were_alone():
    """pack_chat_examples numbers each token's example (segments); with them the packed row's
    loss is that of its examples each in a row of its own (the last one cut where the row ends),
    weighted by their response tokens: no example sees another, positions start at each."""
    tok = with_chat_tokens(ByteTokenizer())
    examples, _ = encode_chat_examples(tok, [{'prompt': f'Tell story {i}.', 'response': 'Once, a fox' + '!' * i}
                                            for i in range(6)], 64)
    rows, segments = pack_chat_examples(examples, range(6), 2, 48, torch.Generator().manual_seed(0))
    x, y = chat_batch(rows, tok.eot_id, 48)
    assert segments.shape == x.shape and (segments[:, 0] == 0).all()
    starts = segments[:, 1:] != segments[:, :-1]
    assert (x[:, 1:][starts] == tok.eot_id).all()                 # a new number where an example begins
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=320, n_layer=2, n_head=2, n_embd=16, block_size=64, pos_emb='rope',
                            init_std=0.3))                    # large weights: context changes the loss
    total, count = 0.0, 0
    for b in range(2):
        for s in segments[b].unique():
            cols = (segments[b] == s).nonzero()[:, 0]
            xs, ys = x[b, cols][None], y[b, cols][None]
            if (ys >= 0).any():
                n = int((ys >= 0).sum())
                total, count = total + model(xs, ys)[1] * n, count + n
    torch.testing.assert_close(model(x, y, segments=segments)[1], total / count)
    assert not torch.isclose(model(x, y)[1], total / count)        # across the window: another loss


def test_generate_chat_stops_at_end_of_turn_and_at_eot_which_is_no_ended_turn():
    tok = with_chat_tokens(ByteTokenizer())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=64)).eval()
    with torch.no_grad():                        # make <|end|> the certain next token after 3 steps
        model.lm_head.weight.zero_()
    out = generate_chat(model, tok, ['hi', 'a longer prompt'], max_new_tokens=5)
    assert all(len(o['ids']) == 5 and not o['ended'] for o in out)   # all-zero logits: token 0 forever
    with torch.no_grad():
        model.lm_head.weight[tok.chat_id('end')] = 0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.chat_id('end')] += 1.0              # positive on every hidden state?
    model.norm.weight.data.fill_(0)
    model.norm.bias.data.fill_(1.0)                                   # every hidden state = all ones
    out = generate_chat(model, tok, ['hi', 'a longer prompt'], max_new_tokens=5)
    assert all(o['ids'] == [] and o['ended'] and o['text'] == '' and o['stop'] == tok.chat_id('end') for o in out)
    with torch.no_grad():                                             # EOT instead: the answer stops,
        model.lm_head.weight.zero_()                                  # but no turn was ended
        model.lm_head.weight[tok.eot_id] += 1.0
    out = generate_chat(model, tok, ['hi'], max_new_tokens=5)
    assert out[0]['ids'] == [] and out[0]['stop'] == tok.eot_id and not out[0]['ended']


# --- data -----------------------------------------------------------------------------------

def read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return [json.loads(line) for line in f]


def test_prepare_instruct_from_plain_stories(tmp_path):
    src = tmp_path / 'stories.jsonl'
    src.write_text(''.join(json.dumps({'text': s + f' Story {i}.'}) + '\n' for i, s in enumerate(STORIES)))
    out = tmp_path / 'inst'
    run_script('prepare/tinystories_instruct.py', f'--source={src}', f'--out_dir={out}', '--n_prompts_val=3',
               '--n_prompts_train=4', '--val_fraction=0.25', cwd=tmp_path)
    files = {n: read(out, f'{n}.jsonl') for n in ('sft_train', 'sft_val', 'prompts_train', 'prompts_val')}
    assert [len(files[n]) for n in ('prompts_val', 'prompts_train')] == [3, 4]
    assert len(files['sft_train']) + len(files['sft_val']) + 7 == 24
    from task import score
    for r in files['sft_train']:
        assert set(r) == {'prompt', 'response', 'words', 'features'}
        assert score(r['response'], r['words'], r['features'])['score'] == 1.0
    sft_stories = {r['response'] for n in ('sft_train', 'sft_val') for r in files[n]}
    held_out = {r['reference'] for n in ('prompts_train', 'prompts_val') for r in files[n]}
    assert not sft_stories & held_out                                 # no overlap
    assert json.load(open(out / 'meta.json'))['sft_train_records'] == len(files['sft_train'])


def test_prepare_instruct_reads_the_instruct_format(tmp_path):
    src = tmp_path / 'TinyStoriesInstruct-valid.txt'
    recs = [f'Features: Dialogue\nWords: fox, key, door\nSummary: x\nStory: \n{STORIES[0]} ({i})\n<|endoftext|>'
            for i in range(8)]
    src.write_text('\n'.join(recs))
    out = tmp_path / 'inst'
    run_script('prepare/tinystories_instruct.py', f'--source={src}', f'--out_dir={out}', '--val_fraction=0.3',
               cwd=tmp_path)
    r = read(out, 'sft_train.jsonl')[0]
    assert r['words'] == ['fox', 'key', 'door'] and r['features'] == {'dialogue': True}
    assert r['prompt'] == 'Write a story that uses the words: fox, key, door. The story should have dialogue.'
    # records without a Words line (the set gives each a random subset of the instruction kinds):
    # the story alone is the answer, its words drawn from it, never the Summary's header lines
    recs = [f'Summary: a summary word zebra\nFeatures: Dialogue\nStory: \n{STORIES[0]} ({i})\n<|endoftext|>'
            for i in range(8)]
    src.write_text('\n'.join(recs))
    run_script('prepare/tinystories_instruct.py', f'--source={src}', f'--out_dir={tmp_path / "plain"}',
               '--val_fraction=0.3', cwd=tmp_path)
    for r in read(tmp_path / 'plain', 'sft_train.jsonl'):
        assert r['response'].startswith(STORIES[0][:30]) and 'Summary' not in r['response'], r['response'][:80]
        assert 'zebra' not in r['words'] and all(w.lower() in r['response'].lower() for w in r['words'])


def test_prepare_instruct_on_the_shared_sample(tmp_path):
    src = shared_file('tinystories', 'valid_sample.txt')
    run_script('prepare/tinystories_instruct.py', f'--source={src}', f'--out_dir={tmp_path}/i', cwd=tmp_path)
    assert len(read(tmp_path / 'i', 'prompts_val.jsonl')) >= 1


def test_prepare_instruct_offline_falls_back_to_the_shared_sample(tmp_path, monkeypatch):
    """No --source and no hub: the TinyStories sample under SHARED_DATA, said so, at once."""
    sample = shared_file('tinystories', 'train_sample_2mb.txt')
    monkeypatch.setenv('SHARED_DATA', os.path.dirname(os.path.dirname(sample)))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')                 # (as an unresolvable hub makes it)
    p = run_script('prepare/tinystories_instruct.py', f'--out_dir={tmp_path}/i', cwd=tmp_path)
    assert 'using the local TinyStories sample' in p.stderr
    assert 'prompts_val: 116 records (of 256 asked for' in p.stdout
    assert json.loads((tmp_path / 'i' / 'meta.json').read_text())['source'] == sample


# --- sft.py and eval.py ---------------------------------------------------------------------

SFT = ['--init_from=base', '--task_dir=inst', '--batch_size=4', '--block_size=256', '--eval_iters=2',
       '--eval_prompts=2', '--max_new_tokens=16', '--compile=False', '--device=cpu', '--peak_flops=1e12',
       '--learning_rate=3e-3', '--warmup_iters=2', '--log_interval=1', '--dropout=0.1']


def val_losses(folder):
    rows = [json.loads(line) for line in open(os.path.join(folder, 'log.jsonl'))]
    return [r['val/loss'] for r in rows if 'val/loss' in r], rows


@pytest.mark.parametrize('kind', ['byte', 'gpt2'])
def test_word_weights_fall_on_the_tokens_of_each_required_words_first_use(kind):
    tok = with_chat_tokens(ByteTokenizer() if kind == 'byte' else gpt2_tokenizer(shared_file('gpt2.tiktoken')))
    response = 'The tired horse turned back. "Weary?" she asked, and the horses rested.'
    words = ['horse', 'turn', 'weary', 'river']             # 'turned' counts for turn; no river
    w = word_token_weights(tok, response, words, 5.0)
    ids = tok.encode(response)
    weighted = [i for i, x in enumerate(w) if x == 5.0]
    assert len(w) == len(ids) and set(w) == {1.0, 5.0}
    # the weighted tokens are exactly the words' first uses ('horses' comes later), with the space
    # before a word where the tokenizer makes it part of the word's token (GPT-2), else without
    assert tok.decode([ids[i] for i in weighted]) == (' horse turnedWeary' if kind == 'gpt2' else 'horseturnedWeary')
    # in a chat example: 0 on the prompt, the weights on the response, 1 on its closing <|end|>;
    # chat_batch's w lines up with y (the weight of the token each position predicts)
    row = {'prompt': 'Write a story that uses the words: horse, turn, weary.', 'response': response, 'words': words}
    (ids, mask), = encode_chat_examples(tok, [row], 1000, word_weight=5.0)[0]
    n_prompt = len(tok.encode_chat(row['prompt'])[0])
    assert mask == [0.0] * n_prompt + w + [1.0]
    x, y, wt = chat_batch([(ids, mask)], tok.eot_id, weights=True)
    assert [tok.decode([int(t)]) for t in y[0][wt[0] == 5.0]] == [tok.decode([ids[n_prompt + i]]) for i in weighted]
    assert ((wt[0] > 0) == (y[0] >= 0)).all()
    (_, plain), = encode_chat_examples(tok, [row], 1000)[0]  # weight 1: the boolean mask as before
    assert plain == tok.encode_chat(row['prompt'], response)[1]


def test_encoding_many_examples_shows_its_progress(capsys):
    """A progress bar over 10,000 records or more when asked (sft.py asks on rank 0), the same
    examples either way; none over fewer, or when not asked."""
    tok = with_chat_tokens(ByteTokenizer())
    rows = [{'prompt': 'Tell a story.', 'response': f'Once, a fox {i}.'} for i in range(10000)]
    shown = encode_chat_examples(tok, rows, 64, show_progress=True)
    assert 'encoding examples' in capsys.readouterr().err
    assert encode_chat_examples(tok, rows, 64) == shown and 'encoding examples' not in capsys.readouterr().err
    encode_chat_examples(tok, rows[:9999], 64, show_progress=True)
    assert 'encoding examples' not in capsys.readouterr().err


def test_encoding_in_worker_processes_gives_the_one_process_examples():
    """encode_chat_examples(num_proc=2): chunks encoded by two worker processes, each with the
    tokenizer rebuilt from its spec, come back in order: the same examples, weights and cut count
    as one process (the speedrun's SFT encodes its 299k examples this way)."""
    tok = with_chat_tokens(ByteTokenizer())
    rows = [{'prompt': f'Write a story that uses the words: fox, run{i % 7}.', 'words': ['fox', f'run{i % 7}'],
             'response': f'The fox ran {i} times.' + ' More.' * (i % 13)} for i in range(5000)]
    one = encode_chat_examples(tok, rows, 64, word_weight=3.0, num_proc=1)
    assert one[1] > 0 and any(3.0 in mask for _, mask in one[0])      # some cut, some words weighted
    assert encode_chat_examples(tok, rows, 64, word_weight=3.0, num_proc=2) == one


def test_sft_word_loss_weight_adds_the_weighted_words_loss(pipeline):
    """Step 1's loss (before any update, same batch) with the required words' tokens weighted 4x
    is the plain loss plus 3x their cross entropy / N: larger; a weight <= 0 is refused."""
    runs = run_script_many('sft.py', [['--out_dir=w1', *SFT, '--max_iters=1', '--eval_interval=1', '--log_interval=1'],
                                      ['--out_dir=w4', *SFT, '--max_iters=1', '--eval_interval=1', '--log_interval=1',
                                       '--word_loss_weight=4'],
                                      ['--out_dir=w0', *SFT, '--word_loss_weight=0'],
                                      ['--out_dir=rep3', *SFT, '--max_iters=1', '--eval_interval=1',
                                       '--prompt_like_repeat=3'],
                                      ['--out_dir=rep0', *SFT, '--prompt_like_repeat=0'],
                                      ['--out_dir=p1', *SFT, '--max_iters=1', '--eval_interval=1', '--log_interval=1',
                                       '--prompt_loss_weight=1'],
                                      ['--out_dir=pneg', *SFT, '--prompt_loss_weight=-1'],
                                      ['--out_dir=phalf', *SFT, '--max_iters=1', '--eval_interval=1', '--log_interval=1',
                                       '--prompt_loss_weight=0.5']], cwd=pipeline)
    assert runs[0].returncode == 0 and runs[1].returncode == 0, runs[1].stderr[-2000:]
    first = [next(r['train/loss'] for r in val_losses(pipeline / out)[1] if 'train/loss' in r)
             for out in ('w1', 'w4', 'p1', 'phalf')]
    assert first[1] > first[0] + 0.01, first
    # prompt_loss_weight=1: the first step's loss also counts the prompts' tokens; the validation
    # loss (the responses') is the same
    assert runs[5].returncode == 0 and abs(first[2] - first[0]) > 0.01, (first, runs[5].stderr[-1000:])
    assert val_losses(pipeline / 'p1')[0][0] == val_losses(pipeline / 'w1')[0][0]
    assert first[3] < first[2], first       # the prompts' tokens at half weight (the weighted loss's path)
    assert runs[6].returncode and 'prompt_loss_weight=-1.0 must be 0 (the response only) or positive' in runs[6].stderr
    assert runs[2].returncode and 'word_loss_weight=0.0 must be positive' in runs[2].stderr
    # prompt_like_repeat: the examples asking only for listed words (as held-out prompts do), 3 times
    n_train = [int(re.search(r'([\d,]+) training and', p.stdout).group(1).replace(',', '')) for p in (runs[0], runs[3])]
    like = int(re.search(r'([\d,]+) of the examples ask only for listed words', runs[3].stdout).group(1).replace(',', ''))
    assert like > 0 and n_train[1] == n_train[0] + 2 * like, (n_train, like)
    assert runs[4].returncode and 'prompt_like_repeat=0 must be at least 1' in runs[4].stderr


@pytest.mark.parametrize('batching', [['--packing=True'], ['--packing=True', '--packed_attention=window'],
                                      ['--packing=False', '--curriculum=True']])
def test_sft_lowers_the_response_loss(pipeline, batching):
    out = 'sft_' + '_'.join(b.split('=')[1] for b in batching)
    run_script('sft.py', f'--out_dir={out}', *SFT, '--max_iters=30', '--eval_interval=15', *batching, cwd=pipeline)
    losses, rows = val_losses(pipeline / out)
    assert losses[-1] < losses[0] - 0.1, losses
    assert {'task/score_greedy', 'task/all_words_sampled'} <= set(rows[0])
    ckpt = load_checkpoint(str(pipeline / out))
    assert ckpt['stage'] == 'sft' and ckpt['tokenizer']['chat'] == CHAT_TOKENS
    assert ckpt['parent'] == 'base' and ckpt['task_dir'] == 'inst'
    model, tok, _ = load_chat_model(str(pipeline / out))
    assert tok.vocab_size == 260 <= model.config.vocab_size == 320


def test_sft_prints_its_sample_answers_above_the_progress_bar(pipeline):
    """stdout and stderr in one file (as speedrun.sh's logs are): the sample answer sft.py prints
    at each evaluation starts a line of its own, never the progress bar's (a print() in any
    stage's loop goes above the bar, which is cleared first with a carriage return)."""
    import subprocess
    import sys
    from conftest import REPO
    with open(pipeline / 'sft_bar.log', 'w') as f:
        subprocess.run([sys.executable, os.path.join(REPO, 'sft.py'), '--out_dir=sft_bar', *SFT, '--max_iters=4',
                        '--eval_interval=2'], cwd=pipeline, stdout=f, stderr=subprocess.STDOUT,
                       env=dict(os.environ, PYTHONUNBUFFERED='1'), check=True, timeout=300)
    lines = [line.split('\r')[-1] for line in (pipeline / 'sft_bar.log').read_text().split('\n')]
    prompts = [line for line in lines if 'prompt: ' in line]
    assert len(prompts) == 3 and all(line.startswith('  prompt: ') for line in prompts), prompts
    assert any(line.startswith('sft: 100%') for line in lines)            # the bar, drawn last, on its own line


def test_sft_resume_continues_exactly(pipeline):
    run_script('sft.py', '--out_dir=a', *SFT, '--max_iters=8', '--lr_decay_iters=8', '--eval_interval=4', cwd=pipeline)
    run_script('sft.py', '--out_dir=b', *SFT, '--max_iters=4', '--lr_decay_iters=8', '--eval_interval=4', cwd=pipeline)
    run_script('sft.py', '--out_dir=b', *SFT, '--max_iters=8', '--lr_decay_iters=8', '--eval_interval=4',
               '--init_from=resume', cwd=pipeline)
    la = [r['train/loss'] for r in val_losses(pipeline / 'a')[1] if 'train/loss' in r]
    lb = [r['train/loss'] for r in val_losses(pipeline / 'b')[1] if 'train/loss' in r]
    assert la == lb and len(la) == 8


def test_sft_evaluates_its_response_loss_uncompiled(pipeline):
    """With compile=True the training step is compiled but an evaluation's response loss runs the
    model as it is: its batches are as long as their longest example, and compiling a no-grad graph
    for them made an evaluation-only run on the CPU take 37.0 s instead of 5.6 s (the GPU card's
    first SFT evaluation took 71 s, its later ones 3 s). Dynamo's log says what it traced."""
    import subprocess
    import sys
    from conftest import REPO
    p = subprocess.run([sys.executable, os.path.join(REPO, 'sft.py'), '--init_from=base', '--out_dir=sft_eager_eval',
                        '--task_dir=inst', '--eval_only=True', '--eval_prompts=0', '--eval_iters=1', '--batch_size=2',
                        '--compile=True', '--device=cpu'], cwd=pipeline, env=dict(os.environ, TORCH_LOGS='dynamo'),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and 'step 0: val/loss ' in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert 'start tracing' not in p.stderr, p.stderr[-2000:]


def test_sft_needs_a_trained_model_and_its_data(pipeline):
    scratch, nowhere, attention, other = run_script_many('sft.py', [
        ['--init_from=scratch'], ['--init_from=base', '--task_dir=nowhere', '--device=cpu'],
        ['--init_from=base', '--packed_attention=document'],
        [*SFT, '--init_from=resume', '--out_dir=base', '--max_iters=1']], cwd=pipeline)
    assert other.returncode and 'init_from=resume continues a sft run, but base holds a pretrain' in other.stderr
    assert load_checkpoint(str(pipeline / 'base'))['stage'] == 'pretrain'      # (left as it was)
    assert scratch.returncode and "sft.py fine-tunes a trained model" in scratch.stderr
    assert attention.returncode and "packed_attention='document'; valid: example, window" in attention.stderr
    assert nowhere.returncode and "'nowhere/sft_train.jsonl' not found" in nowhere.stderr


def test_eval_table_and_compare(pipeline):
    run_script('sft.py', '--out_dir=sft_eval', *SFT, '--max_iters=5', '--eval_interval=5', cwd=pipeline)
    args = ['--task_dir=inst', '--n_prompts=3', '--max_new_tokens=16', '--eval_iters=2', '--batch_size=2',
            '--block_size=32', '--device=cpu']
    p = run_script('eval.py', '--compare=base,sft_eval', *args, cwd=pipeline)
    lines = p.stdout.strip().splitlines()
    assert lines[-4].startswith('| run | stage | step | val loss | val bits/byte | task score')
    assert lines[-2].startswith('| base | pretrain | 60 |') and lines[-1].startswith('| sft_eval | sft | 5 |')
    result = json.load(open(pipeline / 'sft_eval' / 'eval.json'))
    assert result['task/n_prompts'] == 3 and 0 <= result['task/score'] <= 1 and result['val/bpb'] > 0
    # without --task_dir: the held-out prompts of the task the model was fine-tuned on (its checkpoint's)
    run_script('eval.py', '--out_dir=sft_eval', *[a for a in args if not a.startswith('--task_dir')], cwd=pipeline)
    assert json.load(open(pipeline / 'sft_eval' / 'eval.json'))['task/samples'] == result['task/samples']
    # the training books' prompts: their own files beside eval.json, which stays the held-out one
    before = (pipeline / 'sft_eval' / 'eval.json').read_text()
    run_script('eval.py', '--out_dir=sft_eval', '--prompts_file=prompts_train.jsonl', *args, cwd=pipeline)
    train_eval = json.load(open(pipeline / 'sft_eval' / 'eval_prompts_train.json'))
    assert train_eval['task/n_prompts'] == 3 and (pipeline / 'sft_eval' / 'eval_answers_prompts_train.jsonl').exists()
    assert (pipeline / 'sft_eval' / 'eval.json').read_text() == before
    p = run_script('eval.py', '--out_dir=sft_eval', '--prompts_file=prompts_trian.jsonl', *args, cwd=pipeline,
                   check=False)
    assert p.returncode and "prompts_file='prompts_trian.jsonl' is not in inst" in p.stderr
    assert 'prompts_train.jsonl, prompts_val.jsonl' in p.stderr
    p = run_script('eval.py', '--compare=base,sft_eval', '--reuse=True', *args, cwd=pipeline)
    assert p.stdout.strip().splitlines()[-1] == lines[-1]             # cached eval.json reused
    # a folder without a checkpoint anywhere in the list: an error before any is evaluated
    p = run_script('eval.py', '--compare=sft_eval,no_such_run', *args, cwd=pipeline, check=False)
    assert p.returncode and "error: no checkpoint at 'no_such_run'" in p.stderr
    assert 'wrote' not in p.stdout and (pipeline / 'sft_eval' / 'eval.json').read_text() == before
    # with reuse, a folder of results alone (its checkpoint deleted) is read, not refused
    (pipeline / 'results_only').mkdir(exist_ok=True)
    shutil.copy(pipeline / 'sft_eval' / 'eval.json', pipeline / 'results_only' / 'eval.json')
    p = run_script('eval.py', '--compare=sft_eval,results_only', '--reuse=True', *args, cwd=pipeline)
    assert p.stdout.strip().splitlines()[-1].startswith('| sft_eval | sft | 5 |')
    # greedy with a presence penalty: its own file (reused by that name), eval.json untouched
    run_script('eval.py', '--out_dir=sft_eval', '--presence_penalty=2', *args, cwd=pipeline)
    penalised = json.load(open(pipeline / 'sft_eval' / 'eval_fp0_pp2.json'))
    assert penalised['presence_penalty'] == 2 and penalised['task/samples'] != result['task/samples']
    assert (pipeline / 'sft_eval' / 'eval.json').read_text() == before
    penalised['task/score'] = 0.987654                               # a mark: is this the file reused?
    (pipeline / 'sft_eval' / 'eval_fp0_pp2.json').write_text(json.dumps(penalised))
    p = run_script('eval.py', '--compare=sft_eval', '--presence_penalty=2', '--reuse=True', *args, cwd=pipeline)
    assert '0.988' in p.stdout.strip().splitlines()[-1]
    p = run_script('eval.py', '--compare=base,sft_eval', '--reference=base', *args, cwd=pipeline)
    rows = p.stdout.strip().splitlines()
    assert rows[-4].endswith('| KL to reference |') and rows[-2].endswith('| 0.00 |')   # base vs itself
    assert float(rows[-1].split('|')[-2]) > 0
    # sampled answers: their own file too (they overwrote eval.json, which compare and report.py read as greedy)
    before = (pipeline / 'sft_eval' / 'eval.json').read_text()      # (the compare above wrote it again)
    run_script('eval.py', '--out_dir=sft_eval', '--temperature=0.8', '--top_k=5', *args, cwd=pipeline)
    assert json.load(open(pipeline / 'sft_eval' / 'eval_t0.8_k5.json'))['top_k'] == 5
    assert (pipeline / 'sft_eval' / 'eval.json').read_text() == before
    # bad values, each by name, before any model loads
    refused = run_script_many('eval.py', [[*args, bad] for bad in ('--temperature=-1', '--eval_iters=-1',
                                                                   '--gen_batch_size=0', '--compare=,')]
                              + [[*args, '--compare=base', '--out_dir=sft_eval']], cwd=pipeline)
    for p, says in zip(refused, ('temperature=-1.0 must be >= 0', 'eval_iters=-1 must be >= 0',
                                 'gen_batch_size=0 must be at least 1', "compare=',' names no folder",
                                 'give --compare or --out_dir, not both')):
        assert p.returncode and says in p.stderr, (says, p.stderr[-300:])
    p = run_script('sample.py', '--out_dir=sft_eval', '--start=Write a story.', '--num_samples=1',
                   '--max_new_tokens=8', '--device=cpu', cwd=pipeline)    # the chat template by default
    assert p.stdout.startswith('[user] Write a story.\n[assistant] ')


def test_eval_continues_openings_of_the_models_own_held_out_text(pipeline, tmp_path):
    """eval.json's continuations start from the first words of the held-out documents of the
    model's pretraining data (from a point past the last one's start where there are fewer
    documents than continuations); from the story openings for a model of story data; from
    --openings where given."""
    args = ['--n_prompts=0', '--eval_iters=0', '--sample_tokens=4', '--device=cpu']
    shutil.copytree(pipeline / 'base', tmp_path / 'base')          # (its eval.json is other tests')

    def openings(*extra):
        run_script('eval.py', f"--out_dir={tmp_path / 'base'}", *args, *extra, cwd=pipeline)
        return json.load(open(tmp_path / 'base' / 'eval.json'))['continuations']

    got = openings('--n_samples=5')
    assert len(got) == 5
    for c, story in zip(got, STORIES[:4]):                  # the fixture's 4 held-out stories, 8 words each
        assert c.startswith(' '.join(story.split()[:8]))
    assert not got[4].startswith(' '.join(STORIES[0].split()[:8]))
    assert ' '.join(got[4].split()[:3]) in ' '.join(STORIES[:4])            # whole words from within them
    got = openings('--n_samples=2', '--openings=A red fox|The end')
    assert got[0].startswith('A red fox') and got[1].startswith('The end') and len(got) == 2
    # one held-out document of many lines (a play): the openings after it start at lines' starts
    from data import write_token_dataset
    from tokenizer import ByteTokenizer
    play = '\n\n'.join(f"{'ROMEO' if i % 2 else 'JULIET'}. Line {i} of the play, and more words after it"
                     for i in range(40))
    write_token_dataset(str(tmp_path / 'play'), {'train': STORIES, 'val': [play]}, ByteTokenizer(), 'play',
                        num_proc=1)
    got = openings('--n_samples=4', f"--data_dir={tmp_path / 'play'}")
    assert got[0].startswith('JULIET. Line 0 of the play, and more') and len(got) == 4
    assert all(c.split('.')[0] in ('ROMEO', 'JULIET') and c.split()[2].isdigit() for c in got[1:]), got
    story_data = tmp_path / 'stories'                      # the same data as a story set: the story openings
    shutil.copytree(pipeline / 'data', story_data)
    meta = json.loads((story_data / 'meta.json').read_text())
    (story_data / 'meta.json').write_text(json.dumps({**meta, 'dataset': 'stories'}))
    got = openings('--n_samples=3', f'--data_dir={story_data}')
    assert [c[:len(o)] for c, o in zip(got, ('Once upon a time', 'One day, a little girl named Lily', 'The old'))] \
        == ['Once upon a time', 'One day, a little girl named Lily', 'The old']


def test_a_window_of_prompt_tokens_only_has_zero_loss():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16))
    x = torch.randint(0, 64, (2, 8))
    _, loss = model(x, torch.full_like(x, -1))
    assert loss.item() == 0.0


def test_prepare_instruct_paragraphs_keep_the_end_of_the_text_for_val(tmp_path):
    paras = [f'Speaker {i}:\nThe noble knight rode his horse across the river at dawn number {i}.'
             for i in range(40)]
    src = tmp_path / 'play.txt'
    src.write_text('\n\n'.join(paras))
    out = tmp_path / 'inst'
    run_script('prepare/tinystories_instruct.py', f'--source={src}', f'--out_dir={out}', '--paragraphs=True',
               '--val_fraction=0.25', '--n_prompts_val=3', '--n_prompts_train=3', cwd=tmp_path)
    val = read(out, 'sft_val.jsonl') + [dict(r, response=r['reference']) for r in read(out, 'prompts_val.jsonl')]
    train = read(out, 'sft_train.jsonl') + [dict(r, response=r['reference']) for r in read(out, 'prompts_train.jsonl')]
    number = lambda r: int(r['response'].split(':')[0].split()[1])          # noqa: E731
    assert min(map(number, val)) > max(map(number, train))                  # val = the last paragraphs
    assert len(val) + len(train) == 40


def test_cuda_graph_defaults_to_cuda_only_and_refuses_other_values(tmp_path):
    """cuda_graph=None (the default of every stage that answers prompts) decodes through the
    captured step on CUDA only; True / False are kept; anything else stops the script with one line
    naming the valid values, before any model is loaded (sft, dpo, reward and distill once ended in
    a traceback), and a bare word already on the command line."""
    assert use_cuda_graph(None, 'cuda') is True and use_cuda_graph(None, 'cpu') is False
    assert use_cuda_graph(True, 'cpu') is True and use_cuda_graph(False, 'cuda') is False
    with pytest.raises(SystemExit, match="error: cuda_graph='maybe'; valid: None"):
        use_cuda_graph('maybe', 'cuda')
    scripts = ('sft.py', 'dpo.py', 'reward.py', 'ppo.py', 'grpo.py', 'distill.py', 'eval.py')
    for value, error in (('1', 'error: cuda_graph=1; valid: None (on for CUDA), True, False'),
                         ('maybe', 'error: --cuda_graph=maybe is not a Python literal')):
        runs = run_scripts([(s, [f'--cuda_graph={value}', '--device=cpu']) for s in scripts], cwd=tmp_path)
        for script, p in zip(scripts, runs):
            assert p.returncode != 0 and error in p.stderr and 'Traceback' not in p.stderr, (script, p.stderr[-500:])


CHATS = [   # one record in each format prepare/chat.py reads
    {'prompt': 'Say hello to Tom.', 'response': 'Hello, Tom!'},
    {'prompt': 'Say hi.', 'completion': 'Hi!', 'system': 'Be brief.'},
    {'instruction': 'Greet Lily.', 'input': 'Be kind.', 'output': 'Hi Lily, nice to see you.'},
    {'instruction': 'Greet Ben.', 'output': 'Hello Ben.'},
    {'messages': [{'role': 'system', 'content': 'You are friendly.'}, {'role': 'user', 'content': 'Who is Sue?'},
                  {'role': 'assistant', 'content': 'Sue is my friend.'}, {'role': 'user', 'content': 'And?'},
                  {'role': 'assistant', 'content': [{'type': 'text', 'text': 'She likes to play.'}]}]},
    {'conversations': [{'from': 'human', 'value': 'Tell me about Max.'}, {'from': 'gpt', 'value': 'Max has a ball.'}]},
]


def test_prepare_chat_reads_the_common_formats_and_sft_trains_on_them(pipeline, tmp_path):
    """prepare/chat.py: prompt/response (and completion, with a system message), Alpaca (with and
    without input), OpenAI messages (one example per assistant turn, the turns before it as its
    prompt, content parts joined) and ShareGPT -> sft_train / sft_val; sft.py trains on them with the
    conversation in the chat template, lowers the response loss, and reports no task score (the
    story task's required words mean nothing here) but prints a held-out answer."""
    from tokenizer import ByteTokenizer, with_chat_tokens
    src = tmp_path / 'mine.jsonl'
    src.write_text(''.join(json.dumps(r) + '\n' for r in CHATS * 4))
    p = run_script('prepare/chat.py', f'--source={src}', f'--out_dir={tmp_path / "task"}', '--val_fraction=0.25',
                   cwd=pipeline)
    assert ('24 records (4 prompt/response, 4 prompt/completion, 8 alpaca, 4 openai, 4 sharegpt) -> '
            in p.stdout.replace('\n', ' ')), p.stdout
    rows = [json.loads(line) for name in ('sft_train.jsonl', 'sft_val.jsonl')
            for line in (tmp_path / 'task' / name).read_text().splitlines()]
    assert len(rows) == 28 and not (tmp_path / 'task' / 'prompts_val.jsonl').exists()   # 24 + one more per chat
    pairs = {(r['prompt'], r['response']): r.get('messages') for r in rows}
    assert pairs[('Say hello to Tom.', 'Hello, Tom!')] is None
    assert pairs[('Say hi.', 'Hi!')] == [{'role': 'system', 'content': 'Be brief.'},
                                         {'role': 'user', 'content': 'Say hi.'}]
    assert ('Greet Lily.\n\nBe kind.', 'Hi Lily, nice to see you.') in pairs and ('Greet Ben.', 'Hello Ben.') in pairs
    assert pairs[('Who is Sue?', 'Sue is my friend.')] == CHATS[4]['messages'][:2]
    assert pairs[('And?', 'She likes to play.')] == CHATS[4]['messages'][:4]
    assert ('Tell me about Max.', 'Max has a ball.') in pairs
    # the template of a conversation: its turns, then the response and <|end|>, the loss on those alone
    tok = with_chat_tokens(ByteTokenizer())
    ids, mask = tok.encode_chat('And?', 'She likes to play.', messages=CHATS[4]['messages'][:4])
    prompt = tok.encode_messages(CHATS[4]['messages'][:4])
    assert ids == prompt + tok.encode('She likes to play.') + [tok.chat_id('end')]
    assert mask == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
    out = run_script('sft.py', '--out_dir=sft_mine', *SFT, f'--task_dir={tmp_path / "task"}', '--max_iters=20',
                     '--eval_interval=10', cwd=pipeline)
    losses, log = val_losses(pipeline / 'sft_mine')
    assert losses[-1] < losses[0] - 0.5 and not any(k.startswith('task/') for r in log for k in r), losses
    assert 'has no prompts_val.jsonl' in out.stdout and out.stdout.count('  greedy answer: ') == 3
    quiet, distilled = run_scripts([      # eval_prompts=0 answers nothing; distill.py reads the folder too
        ('sft.py', ['--out_dir=sft_mine_quiet', *SFT, f'--task_dir={tmp_path / "task"}', '--max_iters=1',
                    '--eval_prompts=0']),
        ('distill.py', ['--teacher=sft_mine', '--out_dir=distill_mine', *SFT[1:], f'--task_dir={tmp_path / "task"}',
                        '--max_iters=2', '--eval_interval=2', '--n_layer=1', '--n_head=2', '--n_embd=16',
                        '--pos_emb=rope'])], cwd=pipeline)
    assert quiet.returncode == 0 and 'greedy answer' not in quiet.stdout, quiet.stderr[-500:]
    assert distilled.returncode == 0, distilled.stderr[-1000:]


def test_prepare_chat_reads_openai_weights_and_developer_turns_and_keeps_val_apart(tmp_path):
    """An OpenAI assistant turn with weight 0 is context, not an example (it was trained on); a
    developer turn is a system one; an Alpaca input of spaces is none; a val_source sharing
    examples with the source is refused (its val loss would be the training loss)."""
    from conftest import run_scripts
    src = tmp_path / 'chats.jsonl'
    src.write_text(json.dumps({'messages': [
        {'role': 'developer', 'content': 'Be kind.'}, {'role': 'user', 'content': 'u1'},
        {'role': 'assistant', 'content': 'bad', 'weight': 0}, {'role': 'user', 'content': 'u2'},
        {'role': 'assistant', 'content': 'good', 'weight': 1}]}) + '\n'
        + json.dumps({'instruction': 'Greet Ben.', 'input': '  ', 'output': 'Hello Ben.'}) + '\n')
    val = tmp_path / 'val.jsonl'
    val.write_text(json.dumps({'prompt': 'Say hi.', 'response': 'Hi!'}) + '\n')
    ok, same = run_scripts([
        ('prepare/chat.py', [f'--source={src}', f'--val_source={val}', '--out_dir=task']),
        ('prepare/chat.py', [f'--source={src}', f'--val_source={src}', '--out_dir=same'])], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-500:]
    rows = [json.loads(line) for line in (tmp_path / 'task' / 'sft_train.jsonl').read_text().splitlines()]
    assert [(r['prompt'], r['response']) for r in rows] == [('u2', 'good'), ('Greet Ben.', 'Hello Ben.')]
    assert rows[0]['messages'] == [{'role': 'system', 'content': 'Be kind.'}, {'role': 'user', 'content': 'u1'},
                                   {'role': 'assistant', 'content': 'bad'}, {'role': 'user', 'content': 'u2'}]
    meta = json.loads((tmp_path / 'task' / 'meta.json').read_text())
    assert meta['formats'] == {'openai': 1, 'alpaca': 1} and meta['val_formats'] == {'prompt/response': 1}
    assert same.returncode and 'error: 2 of the 2 examples of val_source=' in same.stderr, same.stderr[-500:]


def test_prepare_chat_and_sft_refuse_what_would_train_nothing_or_the_wrong_thing(pipeline, tmp_path):
    """Each bad input gets its own error: a record of no known format (the formats listed), an empty
    response, an assistant turn that answers no user turn, a file that is not UTF-8, one record (no
    val split); sft.py: a response that is not text, and a block_size the prompts fill (nothing
    would be trained: the val loss read 0)."""
    def source(name, text):
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        return f'--source={tmp_path / name}'
    unknown, empty, orphan, latin, single = run_script_many('prepare/chat.py', [
        [source('a.jsonl', '{"question": "q", "reply": "r"}\n{"question": "q", "reply": "r"}\n')],
        [source('b.jsonl', '{"prompt": "Hi", "response": "Hello"}\n{"prompt": "Hi", "response": " "}\n')],
        [source('c.jsonl', json.dumps({'messages': [{'role': 'assistant', 'content': 'Hi'}]}) + '\n')],
        [source('d.jsonl', '{"prompt": "caf\xe9", "response": "ok"}\n'.encode('latin-1'))],
        [source('e.json', '[{"prompt": "Hi", "response": "Hello"}]')]], cwd=tmp_path)
    assert "a.jsonl line 1 has fields ['question', 'reply'], none of the formats: prompt/response:" in unknown.stderr
    assert 'b.jsonl line 2: response must be a non-empty string' in empty.stderr
    assert 'c.jsonl line 1: the assistant turn 0 does not answer a user turn' in orphan.stderr
    assert 'd.jsonl line 1 is not UTF-8 text' in latin.stderr and 'save it as UTF-8' in latin.stderr
    assert 'e.json holds one record: it cannot be split into train and val' in single.stderr
    two = source('f.jsonl', '{"prompt": "Hi", "response": "Hello"}\n' * 2)
    (tmp_path / 'data' / 'mine').mkdir(parents=True)
    (tmp_path / 'data' / 'mine' / 'train.bin').write_bytes(b'')          # a pretraining dataset's folder
    (tmp_path / 'f_chat').mkdir()
    (tmp_path / 'f_chat' / 'prompts_val.jsonl').write_text('{"prompt": "old", "words": []}\n')   # an earlier run's
    pretraining, most = run_script_many('prepare/chat.py', [
        [two, '--out_dir=data/mine'], [two, '--val_fraction=0.9', f'--out_dir={tmp_path / "f_chat"}']], cwd=tmp_path)
    assert 'data/mine holds other prepared data' in pretraining.stderr
    assert '-> 1 training and 1 validation examples' in most.stdout                # not 0 training examples
    assert sorted(os.listdir(tmp_path / 'f_chat')) == ['meta.json', 'sft_train.jsonl', 'sft_val.jsonl']
    task = tmp_path / 'task'
    task.mkdir()
    (task / 'meta.json').write_text('{}')
    (task / 'sft_val.jsonl').write_text(json.dumps({'prompt': 'Hi ' * 200, 'response': 'Hello'}) + '\n')
    (task / 'sft_train.jsonl').write_text(json.dumps({'prompt': 'Hi', 'response': 42}) + '\n')
    number, = run_script_many('sft.py', [[*SFT, f'--task_dir={task}', '--max_iters=1']], cwd=pipeline)
    assert "sft_train.jsonl record 1: prompt and response must be text" in number.stderr
    (task / 'sft_train.jsonl').write_text('\n')
    nothing, = run_script_many('sft.py', [[*SFT, f'--task_dir={task}', '--max_iters=1']], cwd=pipeline)
    assert 'sft_train.jsonl holds no examples' in nothing.stderr      # (it failed after step 0 with a RuntimeError)
    (task / 'sft_train.jsonl').write_text(json.dumps({'prompt': 'Hi ' * 200, 'response': 'Hello'}) + '\n')
    full, = run_script_many('sft.py', [[*SFT, f'--task_dir={task}', '--max_iters=1', '--block_size=64']], cwd=pipeline)
    assert ('no training example has a response token within block_size + 1 = 65 tokens: the prompts fill the '
            'window') in full.stderr


def test_accumulated_micro_batches_weigh_every_response_token_alike():
    """Micro-batches with 3 and 40 response tokens: weighted by their share of the step's tokens
    (Run.token_share_weights, as sft.py weighs them), their accumulated gradient is the gradient
    of one batch's mean over all 43 tokens; 1 / gradient_accumulation_steps each is not."""
    from types import SimpleNamespace
    from model import masked_cross_entropy
    from training import Run
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=48, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 50, (2, 48))
    y = torch.randint(0, 50, (2, 48))
    y[0, :45] = -1                                            # the first row scores 3 tokens, the second 40
    y[1, :8] = -1
    run = SimpleNamespace(rt=SimpleNamespace(device='cpu', ddp=False, world_size=1))

    def grads(weights):
        model.zero_grad()
        for m, w in enumerate(weights):
            (masked_cross_entropy(model(x[m:m + 1])[0], y[m:m + 1]) * w).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    share = Run.token_share_weights(run, [int((y[m] >= 0).sum()) for m in range(2)])
    assert share.tolist() == pytest.approx([3 / 43, 40 / 43])
    model.zero_grad()
    masked_cross_entropy(model(x)[0], y).backward()           # the one large batch
    one_batch = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads(share), one_batch, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(grads([0.5, 0.5]), one_batch, atol=1e-4)
