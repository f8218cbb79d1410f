import json
import os

import numpy as np
import pytest

from data import load_tokenizer_spec, read_documents, token_dtype, TokenData, write_token_dataset
from conftest import run_script, run_script_many, shared_file
from tokenizer import EOT, ByteTokenizer, tokenizer_from_spec


def check_dataset(out, n_docs=None):
    """A prepared folder: files exist, counts agree, the tokenizer rebuilds and decodes."""
    meta = json.load(open(os.path.join(out, 'meta.json')))
    tok = tokenizer_from_spec(load_tokenizer_spec(meta['tokenizer'], out))
    for split in ('train', 'val'):
        ids = np.fromfile(os.path.join(out, f'{split}.bin'), dtype=meta['dtype'])
        assert len(ids) == meta[f'{split}_tokens'] > 0
        assert (ids == tok.eot_id).sum() == meta[f'{split}_docs']     # one EOT after each document
        assert ids[-1] == tok.eot_id
        text = tok.decode(ids.tolist())
        docs = [d for d in text.split(EOT) if d]
        if tok.kind != 'word':                                         # word is lossy by design
            assert sum(len(d.encode()) for d in docs) == meta[f'{split}_bytes']
    if n_docs is not None:
        assert meta['train_docs'] + meta['val_docs'] == n_docs
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]
    from data import TokenData                                         # each held-out split once
    assert TokenData(out).val_splits == ['val']
    return meta, tok


def test_tinystories_from_the_official_txt_with_gpt2(tmp_path):
    src = shared_file('tinystories', 'valid_sample.txt')
    rank_file = shared_file('gpt2.tiktoken')
    out = str(tmp_path / 'ts')
    run_script('prepare/tinystories.py', f'--source={src}', f'--tokenizer_file={rank_file}',
               f'--out_dir={out}', '--val_fraction=0.2', cwd=tmp_path)
    meta, tok = check_dataset(out, n_docs=24)
    assert meta['dtype'] == 'uint16' and meta['vocab_size'] == 50257 and meta['val_docs'] == 5
    assert meta['tokenizer']['ranks_file'] == 'gpt2.tiktoken'    # ranks kept beside the data
    assert tok.encode('Hello world') == [15496, 995]
    first = np.fromfile(os.path.join(out, 'train.bin'), dtype=np.uint16)[:3].tolist()
    assert tok.decode(first)                                       # real text decodes


@pytest.mark.parametrize('kind', ['byte', 'char', 'word', 'bpe'])
def test_tinystories_local_tokenizers(tmp_path, kind):
    src = shared_file('tinystories', 'valid_sample.txt')
    out = str(tmp_path / kind)
    learned = ['--vocab_size=300'] if kind in ('word', 'bpe') else []    # (refused for the others: no effect)
    run_script('prepare/tinystories.py', f'--source={src}', f'--tokenizer={kind}', *learned,
               f'--out_dir={out}', cwd=tmp_path)
    meta, tok = check_dataset(out, n_docs=24)
    assert meta['tokenizer']['kind'] == kind


def test_a_char_vocabulary_covers_the_characters_only_val_has(tmp_path):
    (tmp_path / 'train.txt').write_text('Once upon a time.\n<|endoftext|>\nThe end.\n')
    (tmp_path / 'val.txt').write_text('A café, 9 € — ok.\n<|endoftext|>\nZ!\n')
    run_script('prepare/tinystories.py', f'--source={tmp_path}', '--tokenizer=char', '--out_dir=out', cwd=tmp_path)
    meta = json.load(open(tmp_path / 'out' / 'meta.json'))
    assert meta['val_tokens'] > 0 and '€' in meta['tokenizer']['chars']
    assert meta['dataset'] == 'out'        # text of one's own: named by its folder, not 'tinystories'


def test_jsonl_parquet_and_folder_splits(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = tmp_path / 'src'
    folder.mkdir()
    with open(folder / 'stories-train.jsonl', 'w') as f:
        for i in range(6):
            f.write(json.dumps({'text': f'Story number {i}. The cat sat.'}) + '\n')
    pq.write_table(pa.table({'text': ['A val story.', 'Another one.']}), folder / 'stories-valid.parquet')
    splits = read_documents(str(folder))
    assert len(splits['train']) == 6 and len(splits['val']) == 2
    out = str(tmp_path / 'out')
    run_script('prepare/tinystories.py', f'--source={folder}', '--tokenizer=byte', f'--out_dir={out}',
               cwd=tmp_path)
    meta, _ = check_dataset(out)
    assert (meta['train_docs'], meta['val_docs']) == (6, 2)        # the folder's split is kept
    words = tmp_path / 'words'                                     # a split is a word of the name, not any part
    words.mkdir()
    for name in ('train.txt', 'survival.txt', 'TinyStories-valid.txt'):
        (words / name).write_text(f'A story in {name}.')
    assert {k: len(v) for k, v in read_documents(str(words)).items()} == {'train': 1, 'all': 1, 'val': 1}
    named = tmp_path / 'named'                                     # only the val file named: the rest is train
    named.mkdir()
    (named / 'mine.txt').write_text('One.\n<|endoftext|>\nTwo.\n<|endoftext|>\nThree.\n')
    (named / 'mine_val.txt').write_text('Held out.\n')
    run_script('prepare/tinystories.py', f'--source={named}', '--tokenizer=byte', f'--out_dir={tmp_path / "n"}',
               cwd=tmp_path)
    meta, _ = check_dataset(str(tmp_path / 'n'))
    assert (meta['train_docs'], meta['val_docs']) == (3, 1)
    # train and val files and one named for neither: that one joins train, and the val file stays
    # the held-out split (all three were pooled and split again: val stories in train)
    (named / 'mine_train.txt').write_text('Four.\n<|endoftext|>\nFive.\n')
    p = run_script('prepare/tinystories.py', f'--source={named}', '--tokenizer=byte', f'--out_dir={tmp_path / "m"}',
                   cwd=tmp_path)
    meta, _ = check_dataset(str(tmp_path / 'm'))
    assert (meta['train_docs'], meta['val_docs']) == (5, 1)
    assert '3 documents from files named for neither split join train' in p.stderr
    val = np.fromfile(tmp_path / 'm' / 'val.bin', dtype=meta['dtype'])
    assert bytes(t for t in val.tolist() if t < 256).decode().strip() == 'Held out.'


def test_one_plain_text_file_keeps_its_end_for_val(tmp_path):
    """A .txt with no <|endoftext|> lines is one document: its last part, from a line break, is the
    val split (it was an error: one document cannot be split)."""
    from data import split_off_val
    text = ''.join(f'Line {i} of my own text.\n' for i in range(100))
    (tmp_path / 'mine.txt').write_text(text)
    p = run_script('prepare/tinystories.py', f'--source={tmp_path / "mine.txt"}', '--tokenizer=byte',
                   f'--out_dir={tmp_path / "out"}', cwd=tmp_path)
    meta, _ = check_dataset(str(tmp_path / 'out'))
    assert (meta['train_docs'], meta['val_docs']) == (1, 1) and 'one document: its last' in p.stderr
    train, val = split_off_val([text], 0.1)
    assert train[0] + '\n' + val[0] == text and val[0].startswith('Line 90 ')


def test_bad_sources_give_clear_errors(tmp_path, monkeypatch):
    (tmp_path / 'not_json.jsonl').write_text('{"text": "ok"}\nnot json\n')
    (tmp_path / 'no_text.jsonl').write_text('{"title": "no text"}\n')
    (tmp_path / 'latin.txt').write_bytes('caf\xe9'.encode('latin-1'))
    (tmp_path / 'latin.jsonl').write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\xe9"}\n'.encode('latin-1'))
    cases = [(f'--source={tmp_path / "latin.jsonl"}', 'latin.jsonl line 2 is not UTF-8 text (invalid continuation'),
             (f'--source={tmp_path / "latin.txt"}', 'latin.txt is not UTF-8 text (unexpected end of data at byte 3)'),
             ('--source=./nowhere.txt', "source './nowhere.txt' does not exist"),
             (f'--source={tmp_path / "not_json.jsonl"}', 'line 2 is not JSON'),
             (f'--source={tmp_path / "no_text.jsonl"}', "has no string field 'text' or 'story'"),
             ('--tokenizer=spm', "tokenizer='spm'; valid: gpt2, bpe, byte, char, word"),
             # a mistyped local folder reads as a hub name: an error, not the local TinyStories sample
             ('--source=my_data/tinystorie', "if it is a local file or folder, it does not exist")]
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')            # the hub's answer at once (no network retries)
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    runs = run_script_many('prepare/tinystories.py', [[arg] for arg, _ in cases], cwd=tmp_path)
    for (arg, message), p in zip(cases, runs):
        assert p.returncode != 0 and message in p.stderr, (arg, p.stderr[-500:])
    rank_file, size = run_script_many('prepare/tinystories.py', [
        ['--tokenizer=bpe', '--tokenizer_file=gpt2.tiktoken'], ['--tokenizer=char', '--vocab_size=300']], cwd=tmp_path)
    assert "tokenizer_file is GPT-2's rank file, for tokenizer='gpt2' only (not 'bpe')" in rank_file.stderr
    assert "vocab_size is learned by the bpe and word tokenizers; tokenizer='char' has a fixed one" in size.stderr


def test_a_crash_leaves_no_dataset_behind(tmp_path):
    def docs():
        yield 'fine'
        raise KeyboardInterrupt                                    # the writer dies mid-split
    out = tmp_path / 'd'
    write_token_dataset(str(out), {'train': ['a', 'b'], 'val': ['c']}, ByteTokenizer(), 'x', num_proc=1)
    with pytest.raises(KeyboardInterrupt):
        write_token_dataset(str(out), {'train': docs(), 'val': ['c']}, ByteTokenizer(), 'x', num_proc=1)
    assert not (out / 'meta.json').exists()                        # the folder no longer loads
    with pytest.raises(SystemExit, match='missing meta.json'):
        TokenData(str(out))
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]


def test_parallel_tokenizing_matches_serial(tmp_path):
    docs = [f'document {i} ' * (i % 7 + 1) for i in range(50)]
    a = write_token_dataset(str(tmp_path / 'a'), {'train': docs, 'val': docs[:3]}, ByteTokenizer(),
                            'x', num_proc=1, chunk_docs=8)
    b = write_token_dataset(str(tmp_path / 'b'), {'train': docs, 'val': docs[:3]}, ByteTokenizer(),
                            'x', num_proc=2, chunk_docs=8)
    assert a == b
    assert (tmp_path / 'a' / 'train.bin').read_bytes() == (tmp_path / 'b' / 'train.bin').read_bytes()


def test_uint32_when_the_vocabulary_needs_it():
    assert token_dtype(50304) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_shakespeare_char(tmp_path):
    src = shared_file('shakespeare', 'input.txt')
    out = str(tmp_path / 'sc')
    run_script('prepare/shakespeare_char.py', f'--source={src}', f'--out_dir={out}', cwd=tmp_path)
    meta, tok = check_dataset(out)
    assert meta['vocab_size'] == 66 and meta['train_tokens'] + meta['val_tokens'] == 1115394 + 2
    (tmp_path / 'mine.jsonl').write_text('{"text": "x"}\n')
    (tmp_path / 'latin.txt').write_bytes('caf\xe9 '.encode('latin-1') * 500)
    missing, jsonl, latin = run_script_many('prepare/shakespeare_char.py', [
        ['--source=missing.txt'], ['--source=mine.jsonl'], ['--source=latin.txt']], cwd=tmp_path)
    assert "source 'missing.txt' does not exist" in missing.stderr
    assert ('reads one plain text file; for \'mine.jsonl\' use python prepare/tinystories.py --source=mine.jsonl '
            '--tokenizer=char') in jsonl.stderr                    # (it trained on the JSON syntax)
    assert 'latin.txt is not UTF-8 text' in latin.stderr and 'Traceback' not in latin.stderr


def test_usable_cpus_follows_the_affinity_mask_and_the_cgroup_quota(tmp_path):
    from data import usable_cpus
    cores = len(os.sched_getaffinity(0))
    assert usable_cpus(str(tmp_path / 'none')) == cores                    # no cgroup file: the mask
    (tmp_path / 'max').write_text('max 100000\n')
    assert usable_cpus(str(tmp_path / 'max')) == cores
    (tmp_path / 'quota').write_text('150000 100000\n')                     # 1.5 cores -> 2 processes
    assert usable_cpus(str(tmp_path / 'quota')) == min(cores, 2)
    (tmp_path / 'tiny').write_text('10000 100000\n')
    assert usable_cpus(str(tmp_path / 'tiny')) == 1


def test_settings_no_split_can_use_are_refused(tmp_path):
    """val_fraction=0 held out one document anyway, n_prompts_val=0 ended in 'too few stories', and
    a vocab_size that the char tokenizer cannot use was ignored."""
    from conftest import run_scripts
    src = tmp_path / 'stories.txt'
    src.write_text('\n<|endoftext|>\n'.join(f'Story {i}. The cat sat on the mat.' for i in range(20)))
    zero, one, prompts, char = run_scripts([
        ('prepare/tinystories.py', [f'--source={src}', '--tokenizer=byte', '--val_fraction=0']),
        ('prepare/tinystories_instruct.py', [f'--source={src}', '--val_fraction=1.0']),
        ('prepare/tinystories_instruct.py', [f'--source={src}', '--n_prompts_val=0']),
        # shakespeare_char.py ignored them (prepare/tinystories.py refused them already)
        ('prepare/shakespeare_char.py', [f'--source={src}', '--vocab_size=7'])], cwd=tmp_path)
    assert char.returncode and "vocab_size is learned by the bpe and word tokenizers; tokenizer='char'" in char.stderr
    for p, fraction in ((zero, 0.0), (one, 1.0)):
        assert p.returncode and f'val_fraction={fraction} must be between 0 and 1' in p.stderr, p.stderr[-300:]
    assert prompts.returncode and 'n_prompts_val=0 must be at least 1' in prompts.stderr, prompts.stderr[-300:]
