"""prepare/stories.py on the real shared story text (three books), and task.make_task_pos."""

import json
import lzma
import os
import random

import numpy as np
import pytest

from data import load_tokenizer_spec
from conftest import REPO, run_script, run_script_many, shared_file  # noqa: F401
from task import (ADJECTIVES, NOUNS, STOP_WORDS, VERBS, complete_ending, first_use, make_prompt,
                  make_task_pos, pos_forms, score, sentence_chunks, sentences, suffix_words, word_used, words_of)
from tokenizer import EOT, tokenizer_from_spec

LO, HI = 60, 300          # the script's default passage bounds


def shared_dir():
    books = shared_file('stories', 'gutenberg_children.txt.xz')
    for parts in (('stories', 'fairytales.txt'), ('tinystories', 'train_sample_2mb.txt'),
                  ('tinystories', 'valid_sample_800kb.txt'), ('gpt2.tiktoken',)):
        shared_file(*parts)
    return os.path.dirname(os.path.dirname(books))


@pytest.fixture(scope='module')
def stories(tmp_path_factory):
    """Three books (one held out), 20 fairy tales and 20 + 20 TinyStories stories."""
    src = shared_dir()
    root = tmp_path_factory.mktemp('stories')
    run_script('prepare/stories.py', f'--source_dir={src}', '--max_books=3', '--val_books=1',
               '--max_stories=20', f'--out_dir={root / "data"}', f'--task_dir={root / "inst"}',
               '--num_proc=2', cwd=root, timeout=300)
    out = str(root / 'data')
    meta = json.load(open(os.path.join(out, 'meta.json')))
    tok = tokenizer_from_spec(load_tokenizer_spec(meta['tokenizer'], out))
    docs = {}
    for split in ('train', 'val', 'val_tinystories'):
        ids = np.fromfile(os.path.join(out, f'{split}.bin'), dtype=meta['dtype'])
        assert len(ids) == meta[f'{split}_tokens'] > 0 and ids[-1] == tok.eot_id
        assert (ids == tok.eot_id).sum() == meta[f'{split}_docs']
        docs[split] = tok.decode(ids.tolist()).split(EOT)[:-1]
    books = []
    with lzma.open(os.path.join(src, 'stories', 'gutenberg_children.txt.xz'), 'rt', encoding='utf-8') as f:
        lines = []
        for line in f:
            if line.strip() == EOT:
                books.append(''.join(lines))
                lines = []
                if len(books) == 3:
                    break
            else:
                lines.append(line)
    return {'root': root, 'meta': meta, 'docs': docs, 'books': books, 'src': src}


def flat(text):
    """Text as the script writes it, for substring checks: straight quotes, one space."""
    for a, b in {'“': '"', '”': '"', '‘': "'", '’': "'", 'ʼ': "'"}.items():
        text = text.replace(a, b)
    return ' '.join(text.split())


def test_meta_has_every_split_and_the_held_out_book(stories):
    meta, docs = stories['meta'], stories['docs']
    assert meta['dataset'] == 'stories' and meta['books'] == 3
    for split in ('train', 'val', 'val_tinystories'):
        assert meta[f'{split}_tokens'] > 0 and meta[f'{split}_docs'] == len(docs[split])
    assert meta['val_tinystories_docs'] == 20
    from data import TokenData                                     # what train.py evaluates, each once
    assert TokenData(str(stories['root'] / 'data')).val_splits == ['val', 'val_tinystories']
    by_source = meta['train_docs_by_source']
    assert sum(by_source.values()) == meta['train_docs'] and by_source['tinystories'] == 20
    assert by_source['gutenberg'] > 100 and by_source['fairytales'] > 20
    (held,) = meta['val_books']
    assert held['title'] and 0 <= held['index'] < 3 and held['passages'] >= meta['val_docs']


def test_passages_hold_whole_paragraphs_within_bounds(stories):
    meta, docs = stories['meta'], stories['docs']
    n = meta['train_docs_by_source']['gutenberg'] + meta['train_docs_by_source']['fairytales']
    for d in docs['val'] + docs['train'][:n]:                  # book and fairy-tale passages
        assert LO <= len(d.split()) <= HI, d[:200]
        assert d == d.strip() and '\n\n' not in d
    assert not any('“' in d or '”' in d for d in docs['train'])   # straight quotes
    assert any(len(d.split()) < 150 for d in docs['val']) and any(len(d.split()) > 200 for d in docs['val'])


def test_the_held_out_book_gives_val_only(stories):
    meta, docs, books = stories['meta'], stories['docs'], stories['books']
    held = meta['val_books'][0]['index']
    held_text = flat(books[held])
    train_text = flat('\n'.join(docs['train']))
    others = [flat(b) for i, b in enumerate(books) if i != held]
    for d in docs['val']:
        for par in d.split('\n'):
            assert par in held_text, par[:200]                         # every val passage is from it ...
            if len(par.split()) >= 8:
                assert par not in train_text, par[:200]                # ... and in no training document
    n_book = meta['train_docs_by_source']['gutenberg']
    for d in docs['train'][:n_book]:
        pars = [p for p in d.split('\n') if len(p.split()) >= 8]
        assert all(any(p in o for o in others) for p in pars)           # train passages: other books
        assert not any(p in held_text for p in pars)


def test_task_files_from_the_same_text(stories):
    inst, docs = stories['root'] / 'inst', stories['docs']
    files = {}
    for name, fields in (('sft_train', {'prompt', 'response', 'words', 'features'}),
                         ('sft_val', {'prompt', 'response', 'words', 'features'}),
                         ('prompts_train', {'prompt', 'words', 'features', 'reference'}),
                         ('prompts_val', {'prompt', 'words', 'features', 'reference'})):
        rows = [json.loads(line) for line in open(inst / f'{name}.jsonl')]
        assert rows and all(set(r) == fields for r in rows), name
        files[name] = rows
    val_docs, train_docs = set(docs['val']), set(docs['train'])
    for name in ('prompts_val', 'sft_val', 'prompts_train', 'sft_train'):
        for r in files[name]:
            story = r.get('reference', r.get('response'))
            assert r['prompt'] == make_prompt(r['words'], r['features']) and len(r['words']) == 3
            assert [w in lst for w, lst in zip(r['words'], (VERBS, NOUNS, ADJECTIVES))] == [True] * 3  # list_words_only
            assert 40 <= len(story.split()) <= 200
            s = score(story, r['words'], r['features'])
            assert s['all_words'] and s['score'] == 1.0               # every reference meets the rule
            assert story in (val_docs if name.endswith('_val') else train_docs)   # no leak across
    stories_used = [r.get('reference', r.get('response')) for rows in files.values() for r in rows]
    assert len(stories_used) == len(set(stories_used))                  # no passage in two files
    held_out = {r['prompt'] for r in files['prompts_val'] + files['sft_val']}    # nor a held-out instruction
    assert not [r for r in files['sft_train'] + files['prompts_train'] if r['prompt'] in held_out]
    meta = json.load(open(inst / 'meta.json'))
    assert meta['prompts_val_records'] == len(files['prompts_val']) and meta['val_books']
    assert meta['train_left_out_for_a_held_out_prompt'] >= 0


def test_task_files_are_the_same_on_one_process_and_on_two(tmp_path):
    """The task is built on a pool of processes when there are more than 1,000 pieces; with a limit
    on the examples (n_sft_train) the pool stops early. The files equal one process's."""
    common = [f'--source_dir={shared_dir()}', '--max_books=4', '--val_books=1', '--max_stories=20',
              '--tokenizer=byte', '--task_cut=True', '--task_words_min=20', '--task_words_max=60',
              '--n_sft_train=700', f'--out_dir={tmp_path / "d"}']
    for n in (1, 2):
        run_script('prepare/stories.py', *common, f'--num_proc={n}', f'--task_dir={tmp_path / f"t{n}"}',
                   cwd=tmp_path, timeout=300)
    meta = json.load(open(tmp_path / 't2' / 'meta.json'))
    assert meta['sft_train_records'] >= 700
    for name in ('sft_train', 'sft_val', 'prompts_train', 'prompts_val'):
        assert (tmp_path / 't1' / f'{name}.jsonl').read_bytes() == (tmp_path / 't2' / f'{name}.jsonl').read_bytes()


def test_words_from_the_first_sentences_of_cut_passages(tmp_path):
    """words_from_sentences=1: every required word is used in the answer's first sentence, and
    the features still hold for the whole answer; task_cut: passages longer than task_words_max
    are cut into pieces at sentence ends, so answers are short and still end a sentence;
    words_in_order: the prompt lists the words in the order the answer first uses them."""
    common = [f'--source_dir={shared_dir()}', '--max_books=2', '--val_books=1', '--max_stories=20',
              '--tokenizer=byte', '--words_from_sentences=1', '--num_proc=2', '--task_words_max=150',
              '--words_in_order=True']
    lengths = {}
    for cut in (False, True):
        t = tmp_path / f't{cut}'
        run_script('prepare/stories.py', *common, f'--task_cut={cut}', f'--out_dir={tmp_path / "d"}',
                   f'--task_dir={t}', cwd=tmp_path, timeout=300)
        rows = [json.loads(line) for name in ('sft_train', 'prompts_val') for line in open(t / f'{name}.jsonl')]
        lengths[cut] = [len(r.get('reference', r.get('response')).split()) for r in rows]
        print(f'task_cut={cut}: {len(rows)} examples')
        assert len(rows) > (20 if cut else 5)
        for r in rows:
            story = r.get('reference', r.get('response'))
            first = words_of(sentences(story)[0])
            assert all(word_used(w, first) for w in r['words']), (r['words'], sentences(story)[0])
            assert score(story, r['words'], r['features'])['score'] == 1.0
            assert complete_ending(story)
            uses = [first_use(w, words_of(story)) for w in r['words']]
            assert uses == sorted(uses), (r['words'], story[:200])   # words_in_order
    assert max(lengths[True]) <= 150 and max(lengths[False]) <= 150
    assert len(lengths[True]) > 2 * len(lengths[False])      # the cut passages are used, not skipped


def test_task_examples_in_the_pretraining_data(tmp_path):
    """task_in_train=N: N SFT examples (training books only) also join the train split as plain
    documents, the instruction, a newline and the answer; val is untouched."""
    common = [f'--source_dir={shared_dir()}', '--max_books=2', '--val_books=1', '--max_stories=20',
              '--tokenizer=byte', '--num_proc=2']
    for n in (0, 20):
        run_script('prepare/stories.py', *common, f'--task_in_train={n}', f'--out_dir={tmp_path / f"d{n}"}',
                   f'--task_dir={tmp_path / f"t{n}"}', cwd=tmp_path, timeout=300)
    meta0, meta = (json.load(open(tmp_path / f'd{n}' / 'meta.json')) for n in (0, 20))
    assert meta['train_docs_by_source']['task_examples'] == 20 and meta0['train_docs_by_source']['task_examples'] == 0
    assert meta['train_docs'] == meta0['train_docs'] + 20 and meta['val_tokens'] == meta0['val_tokens']
    assert json.load(open(tmp_path / 't20' / 'meta.json'))['task_in_train'] == 20
    sft = [json.loads(line) for line in open(tmp_path / 't20' / 'sft_train.jsonl')][:20]
    text = bytes(np.fromfile(tmp_path / 'd20' / 'train.bin', dtype=np.uint16)[-50_000:].clip(0, 255).astype(np.uint8)
                 ).decode('utf-8', 'replace')
    assert f"{sft[-1]['prompt']}\n{sft[-1]['response']}" in text           # the last one, whole
    p = run_script('prepare/stories.py', *common, '--task_in_train=5', '--task_dir=', f'--out_dir={tmp_path / "x"}',
                   cwd=tmp_path, check=False)
    assert p.returncode != 0 and 'task_in_train=5 adds task examples to the train split; set task_dir' in p.stderr


def test_first_use():
    text = words_of('The dogs barked; a happier cat jumped over the dog.')
    assert first_use('dog', text) == 1 and first_use('jump', text) == 6 and first_use('happy', text) == 4
    assert first_use('bird', text) == len(text)


def test_sentence_chunks():
    text = 'One two. Three four five! Six "seven."\nEight nine ten eleven twelve thirteen. End'
    assert sentence_chunks(text, 5) == ['One two. Three four five!', 'Six "seven."']   # the 6-word one dropped
    first, second = 'One two. Three four five! Six "seven."', 'Eight nine ten eleven twelve thirteen.'
    assert sentence_chunks(text, 7) == [first, second]
    assert sentence_chunks(text, 100) == [first + '\n' + second]
    assert sentence_chunks('One two three. Four.', 2) == ['Four.']
    assert sentence_chunks('no sentence end', 10) == []


def test_a_near_duplicate_of_train_text_is_not_held_out(tmp_path):
    """Three made-up books that each hold their own edition of one paragraph (a word changed, as
    editions and scans differ): whichever book is held out, its passage with that paragraph shares
    most word 8-grams with train, though no paragraph exactly, and is dropped from val."""
    rng = random.Random(0)
    vocab = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(3, 8))) for _ in range(2000)]

    def paragraph(n=120):
        sentences = [' '.join(rng.choice(vocab) for _ in range(12)) for _ in range(n // 12)]
        return ' '.join(s.capitalize() + '.' for s in sentences)

    shared = paragraph(150).split()
    books = []
    for b in range(3):
        edition = list(shared)
        edition[70 + b] = 'changed'                                  # each book's own edition
        pars = [paragraph() for _ in range(3)] + [' '.join(edition)] + [paragraph() for _ in range(3)]
        books.append('\n\n'.join(pars) + '\n')
    (tmp_path / 'books.txt').write_text(f'\n{EOT}\n'.join(books) + f'\n{EOT}\n')
    run_script('prepare/stories.py', f'--source_dir={tmp_path}', '--books_file=books.txt', '--manifest_file=',
               '--fairytales_file=', '--tinystories_file=', '--tinystories_val_file=', '--tokenizer=byte',
               '--task_dir=', '--val_books=1', '--passage_words_min=100', '--passage_words_max=160',
               f'--out_dir={tmp_path / "data"}', cwd=tmp_path)
    meta = json.load(open(tmp_path / 'data' / 'meta.json'))
    assert meta['val_dropped_overlap'] == 0 and meta['val_dropped_near_duplicate'] == 1
    tok = tokenizer_from_spec(load_tokenizer_spec(meta['tokenizer'], str(tmp_path / 'data')))
    val = tok.decode(np.fromfile(tmp_path / 'data' / 'val.bin', dtype=meta['dtype']).tolist())
    assert ' '.join(shared[:8]) not in val and ' '.join(shared[100:108]) not in val
    assert val.count(EOT) == meta['val_docs'] >= 3                       # the book's other passages


def test_a_training_example_that_asks_a_held_out_instruction_is_left_out(tmp_path):
    """Three made-up books whose passages open alike: every other one with 'The happy dog played in
    the park.' (its words, from the first sentences, make the same instruction in every book), the
    rest with a sentence of the book's own. The training examples that ask a held-out example's very
    instruction are left out and counted; the others stay."""
    rng = random.Random(0)
    vocab = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(4, 8))) for _ in range(3000)]
    own = ['The small cat jumped on the bed.', 'The red bird walked to the tree.', 'The happy cat swam to the ball.']

    def paragraph(opening):
        return opening + ' ' + ' '.join(' '.join(rng.choice(vocab) for _ in range(10)).capitalize() + '.'
                                        for _ in range(7))
    books = ['\n\n'.join(paragraph('The happy dog played in the park.' if k % 2 else own[b]) for k in range(40)) + '\n'
             for b in range(3)]
    (tmp_path / 'books.txt').write_text(f'\n{EOT}\n'.join(books) + f'\n{EOT}\n')
    run_script('prepare/stories.py', f'--source_dir={tmp_path}', '--books_file=books.txt', '--manifest_file=',
               '--fairytales_file=', '--tinystories_file=', '--tinystories_val_file=', '--tokenizer=byte',
               '--val_books=1', '--words_from_sentences=2', '--passage_words_max=100', '--n_prompts_val=4',
               '--n_sft_val=8', '--n_prompts_train=8', f'--task_dir={tmp_path / "inst"}',
               f'--out_dir={tmp_path / "data"}', cwd=tmp_path)
    rows = {name: [json.loads(line) for line in open(tmp_path / 'inst' / f'{name}.jsonl')]
            for name in ('prompts_val', 'sft_val', 'prompts_train', 'sft_train')}
    held_out = {r['prompt'] for r in rows['prompts_val'] + rows['sft_val']}
    assert any('play, dog, happy' in p for p in held_out)
    assert rows['sft_train'] and not [r for r in rows['sft_train'] + rows['prompts_train'] if r['prompt'] in held_out]
    assert json.load(open(tmp_path / 'inst' / 'meta.json'))['train_left_out_for_a_held_out_prompt'] > 0
    # every passage opening alike: no SFT data would be left, which is said
    books = ['\n\n'.join(paragraph('The happy dog played in the park.') for k in range(40)) + '\n' for b in range(3)]
    (tmp_path / 'books.txt').write_text(f'\n{EOT}\n'.join(books) + f'\n{EOT}\n')
    p = run_script('prepare/stories.py', f'--source_dir={tmp_path}', '--books_file=books.txt', '--manifest_file=',
                   '--fairytales_file=', '--tinystories_file=', '--tinystories_val_file=', '--tokenizer=byte',
                   '--val_books=1', '--words_from_sentences=2', '--passage_words_max=100', '--n_prompts_val=4',
                   '--n_sft_val=8', '--n_prompts_train=8', f'--task_dir={tmp_path / "inst2"}',
                   f'--out_dir={tmp_path / "data2"}', cwd=tmp_path, check=False)
    assert p.returncode != 0 and 'asks what a held-out example asks' in p.stderr, p.stderr[-500:]


def test_bad_settings_give_clear_errors(tmp_path):
    src = shared_dir()
    cases = [([f'--source_dir={src}', '--max_books=3', '--val_books=3'], 'val_books=3 leaves no training book'),
             ([f'--source_dir={tmp_path}/nowhere'], f'{tmp_path}/nowhere'),
             ([f'--source_dir={src}', '--fairytales_file=stories/none.txt'], "fairytales_file='stories/none.txt'"),
             ([f'--source_dir={src}', '--passage_words_min=400'], 'passage_words_min=400')]
    runs = run_script_many('prepare/stories.py', [args for args, _ in cases], cwd=tmp_path)
    for (args, message), p in zip(cases, runs):
        assert p.returncode != 0 and message in p.stderr, (args, p.stderr[-500:])
    assert 'is not a folder' in runs[1].stderr


# -----------------------------------------------------------------------------
# The noun / verb / adjective heuristic

PASSAGE = ('Once upon a time, a small rabbit hopped across the garden. She was hungry and looked for '
           'carrots. "Where are they?" she asked. Then she noticed a tiny mouse, who smiled and shared '
           'his biggest berries with her. They were happier together. Rose ran home.')


def test_word_lists_are_disjoint_and_free_of_stop_words():
    assert not (NOUNS & VERBS or NOUNS & ADJECTIVES or VERBS & ADJECTIVES)
    assert not (NOUNS | VERBS | ADJECTIVES) & STOP_WORDS
    assert min(len(NOUNS), len(VERBS), len(ADJECTIVES)) >= 150


def test_regular_forms_only():
    assert pos_forms('hop', 'verb') == {'hop', 'hops', 'hopped', 'hopping'}
    assert pos_forms('hope', 'verb') == {'hope', 'hopes', 'hoped', 'hoping'}
    assert pos_forms('cry', 'verb') == {'cry', 'cries', 'cried', 'crying'}
    assert pos_forms('fox', 'noun') == {'fox', 'foxes'} and pos_forms('berry', 'noun') == {'berry', 'berries'}
    assert pos_forms('big', 'adjective') == {'big', 'bigger', 'biggest'}
    assert pos_forms('happy', 'adjective') == {'happy', 'happier', 'happiest'}


def test_one_noun_verb_and_adjective_of_the_passage():
    seen = {'verb': set(), 'noun': set(), 'adjective': set()}
    for i in range(40):
        t = make_task_pos(PASSAGE, random.Random(i))
        verb, noun, adj = t['words']
        assert t['pos'] == ['verb', 'noun', 'adjective'] and t['how'] == ['list'] * 3
        assert verb in VERBS and noun in NOUNS and adj in ADJECTIVES
        assert score(PASSAGE, t['words'], t['features'])['all_words']
        for pos, w in zip(t['pos'], t['words']):
            seen[pos].add(w)
    assert seen['verb'] == {'hop', 'ask', 'notice', 'smile', 'share'}   # 'ran': irregular, not matched
    assert seen['noun'] == {'rabbit', 'garden', 'carrot', 'mouse', 'berry'}   # 'Rose': capitalised only
    assert seen['adjective'] == {'small', 'hungry', 'tiny', 'happy'}    # 'biggest' of 'big': a stop word
    assert word_used('run', words_of(PASSAGE))     # the rule accepts 'ran'; a task is made from regular forms only


def test_fallbacks_when_a_part_of_speech_is_missing():
    text = 'The darkness was mysterious and marvellous. Nobody remembered the weather.'
    t = make_task_pos(text, random.Random(0))
    assert t['how'] == ['list', 'suffix', 'suffix'] and t['words'][0] == 'remember'
    assert t['words'][1] == 'darkness' and t['words'][2] in ('marvellous', 'mysterious')
    assert suffix_words(text, 'adjective') == ['marvellous', 'mysterious']
    t = make_task_pos('Grumbling merchants argued loudly about flour prices.', random.Random(0))
    assert t['how'] == ['content', 'content', 'content'] and len(set(t['words'])) == 3
    assert score('Grumbling merchants argued loudly about flour prices.', t['words'])['all_words']
    assert make_task_pos('A cat.', random.Random(0)) is None


def test_sft_examples_with_any_words_leave_the_prompts_as_they_were(tmp_path):
    """sft_list_words_only=False: SFT training examples may require words outside task.py's lists
    (more examples); every prompt, held-out or for RL, and sft_val still use list words only, and
    the held-out files are byte for byte the same as without it."""
    common = [f'--source_dir={shared_dir()}', '--max_books=3', '--val_books=1', '--max_stories=20',
              '--tokenizer=byte', '--num_proc=2', '--task_cut=True', '--task_words_min=30', '--task_words_max=120',
              '--words_from_sentences=2', '--n_prompts_train=30', '--n_sft_train=0']
    for only in (True, False):
        run_script('prepare/stories.py', *common, f'--sft_list_words_only={only}', f'--out_dir={tmp_path / "d"}',
                   f'--task_dir={tmp_path / f"t{only}"}', cwd=tmp_path, timeout=300)
    rows = {name: [json.loads(line) for line in open(tmp_path / 'tFalse' / f'{name}.jsonl')]
            for name in ('sft_train', 'sft_val', 'prompts_train', 'prompts_val')}
    listed = lambda r: [w in lst for w, lst in zip(r['words'], (VERBS, NOUNS, ADJECTIVES))] == [True] * 3  # noqa: E731
    for name in ('sft_val', 'prompts_train', 'prompts_val'):
        assert rows[name] and all(listed(r) for r in rows[name]), name
    assert len(rows['prompts_train']) == 30
    n_before = json.load(open(tmp_path / 'tTrue' / 'meta.json'))['sft_train_records']
    meta = json.load(open(tmp_path / 'tFalse' / 'meta.json'))
    not_listed = [r for r in rows['sft_train'] if not listed(r)]
    assert meta['sft_train_not_list_words'] == len(not_listed) > 0
    assert len(rows['sft_train']) > 2 * n_before
    for r in rows['sft_train']:
        assert score(r['response'], r['words'], r['features'])['score'] == 1.0
    for name in ('sft_val', 'prompts_val'):
        before, after = ((tmp_path / t / f'{name}.jsonl').read_bytes() for t in ('tTrue', 'tFalse'))
        assert before == after, name
    used = [r.get('reference', r.get('response')) for rs in rows.values() for r in rs]
    assert len(used) == len(set(used))                                # no passage in two files
