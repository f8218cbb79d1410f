"""
Real story text -> data/stories/{train,val,val_tinystories}.bin + meta.json (pretraining), and the
post-training task built from the same text -> data/stories_instruct/*.jsonl

$ python prepare/stories.py                                  # everything in ../shared/data, GPT-2 BPE
$ python prepare/stories.py --max_books=40 --out_dir=data/stories_small --task_dir=data/stories_small_instruct
$ python prepare/stories.py --source_dir=/data/shared --task_dir=''      # another folder; no task data

Sources (under source_dir, each a setting; '' leaves one out):
  books_file        Project Gutenberg children's books, one book a document between <|endoftext|>
                    lines (.xz or plain); manifest_file names each book (title, author, words), in the
                    same order (checked: every book's word count must match)
  fairytales_file   fairy tales, <|endoftext|>-separated
  tinystories_file  TinyStories training stories, kept whole (they are short)
  tinystories_val_file  TinyStories validation stories -> the val_tinystories split

Splits (no book contributes to two): val_books whole books, chosen with a seeded RNG, are held out.
  train            passages of the other books + fairy-tale passages + the TinyStories stories
  val              passages of the held-out books, less any passage sharing a paragraph with train
                   or near-duplicating train text: val_overlap_max or more of its word 8-grams in
                   train (the same tale can be in two collections, in two translations or editions,
                   and publishers' catalogues repeat across books)
  val_tinystories  the TinyStories validation stories, whole
Every document is followed by the end-of-text token. Fairy tales (about 2,000 words each) are cut
into passages like the books, so that every document of the stream is a passage of the same kind
and they can serve the task too.

Passages. A book is cut into blocks at blank lines. A block of several lines is hard-wrapped prose
(its lines are joined with spaces) in a document whose lines are all short (< 2% over 90
characters) when nearly all its lines but the last are at least 40 characters long; in a document
with long lines, a block whose lines mostly end a sentence holds one paragraph a line (fairy-tale
files); any other block of several lines is verse, a list or a table of contents. A paragraph is
prose when at most 40% of its characters (spaces aside) are digits or symbols other than
.,;:!?'"()-, it has lower-case letters, it ends with . ! ? : ; or a dash (a closing quote or
bracket may follow), it is no heading ('Chapter IV.', 'Contents', 'The End') and no credit or
note ('[Sidenote: ...]', 'Transcriber's note'), and, where at least 8% of its characters are
capitals, at most 30% of its words are in capitals and (of 6 or more words, without a double
quote) at most half are capitalised.
Runs of consecutive prose paragraphs (anything else ends a run, so a passage never crosses a
chapter heading) are grouped into passages: each passage draws a target length uniformly from
passage_words_min..passage_words_max words and takes whole paragraphs until it reaches it (a
paragraph longer than passage_words_max is first cut at sentence ends); a short rest (under
passage_words_min words) joins the passage before it if that stays within bounds, else it is
dropped. Paragraphs in a
passage are joined by one newline, as in TinyStories; whitespace is normalised and page markers
([Pg 12], [12]) removed; with straight_quotes, curly quotes become straight ones. Every passage
holds passage_words_min..passage_words_max words (whitespace-separated).

The task (task_dir; the format of prepare/tinystories_instruct.py):
  sft_train.jsonl, sft_val.jsonl          {"prompt", "response", "words", "features"}
  prompts_train.jsonl, prompts_val.jsonl  {"prompt", "words", "features", "reference"}
from passages (and TinyStories stories) of task_words_min..task_words_max words (with task_cut, a
longer one is cut at sentence ends into pieces within task_words_max, task.sentence_chunks, each
piece a passage of its own): one verb, noun and
adjective of the passage (task.make_task_pos; with list_words_only, only passages that have a word
of each of task.py's lists of common story words, and with sft_list_words_only=False that holds
for the prompts and sft_val only: sft_train then also takes passages whose words are rarer, about
4x the examples; with words_in_order, listed in the order the passage first uses them) and
features it satisfies (task.choose_features); a
passage is used only if it scores 1.0 under the reward rule itself (task.score: all words, its
features, a complete last sentence, little repetition). The *_train files come from the training
books and fairy tales (sft_train also takes every TinyStories training story), the *_val files
from the held-out books only; no held-out passage is in a training file (with task_cut, pieces of
one training passage may be in sft_train and prompts_train). With task_in_train=N the first N
sft_train examples also join the pretraining data's train split, as "<instruction>\n<answer>".
"""

import lzma
import os
import random
import re
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from config import configure  # noqa: E402
from data import (LOCAL_DATA, read_documents, start_prepared, usable_cpus, write_json, write_jsonl,  # noqa: E402
                  write_token_dataset)
from runlog import progress  # noqa: E402
from task import (choose_features, complete_ending, first_use, make_prompt, make_task_pos, score,  # noqa: E402
                  sentence_chunks, sentences, words_of)
from tokenizer import KINDS, build_tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
source_dir = LOCAL_DATA                # $SHARED_DATA, else ../shared/data beside the checkout
books_file = 'stories/gutenberg_children.txt.xz'     # under source_dir (or an absolute path)
manifest_file = 'stories/gutenberg_children_manifest.tsv'  # title / author / words per book ('': none)
fairytales_file = 'stories/fairytales.txt'           # '': leave the fairy tales out
tinystories_file = 'tinystories/train_sample_2mb.txt'       # '': leave TinyStories train out
tinystories_val_file = 'tinystories/valid_sample_800kb.txt'  # '': no val_tinystories split
out_dir = 'data/stories'
task_dir = 'data/stories_instruct'   # '': write no task data
tokenizer = 'gpt2'                   # 'gpt2' | 'bpe' | 'byte' | 'char' | 'word'
tokenizer_file = ''                  # gpt2: a tiktoken rank file ('': source_dir/gpt2.tiktoken if it
                                     # exists, else tiktoken's download)
vocab_size = 4096                    # bpe / word: vocabulary size, EOT included
tokenizer_train_docs = 200_000       # bpe / word: documents the vocabulary is learned from (char: all)
max_books = 0                        # use only the first N books (0: all)
val_books = 10                       # whole books held out for val (seeded choice)
val_overlap_max = 0.2                # a val passage with this share of its word 8-grams in train is dropped
max_stories = 0                      # use only the first N fairy tales and TinyStories (train and val) stories (0: all)
passage_words_min = 60               # passage length bounds, in words
passage_words_max = 300
straight_quotes = True               # “ ” ‘ ’ -> " " ' ' (as in TinyStories)
task_words_min = 40                  # task examples: passages and stories of this many words
task_words_max = 200
task_cut = False                     # a longer passage is cut at sentence ends into pieces of at most
                                     # task_words_max words, each a candidate example (False: skipped)
words_from_sentences = 0             # >0: the required words come from the passage's first N sentences
list_words_only = True               # required words only from task.py's lists of common story words
sft_list_words_only = True           # the same for the SFT training examples (False: any word of the
                                     # passage there, about 4x the examples; prompts and sft_val keep
                                     # list words, so the held-out task is unchanged)
words_in_order = False               # list the required words in the order the passage first uses them
                                     # (False: verb, noun, adjective, as TinyStories-Instruct)
n_prompts_val = 256                  # held-out prompts for evaluation (held-out books)
n_sft_val = 1000                     # SFT val examples (held-out books)
n_prompts_train = 2000               # prompts for RL (PPO, GRPO) and preference sampling
n_sft_train = 50_000                 # SFT examples from training books and fairy tales (0: all),
                                     # plus every TinyStories training story of the right length
task_in_train = 0                    # this many SFT examples also join the pretraining data (train split)
                                     # as plain documents "<instruction>\n<answer>", as TinyStories-Instruct
                                     # teaches its format in pretraining (0: none; needs task_dir)
seed = 1337
num_proc = 0                         # processes (0: every core)
# -----------------------------------------------------------------------------
configure(globals())
if tokenizer not in KINDS:
    sys.exit(f"error: tokenizer='{tokenizer}'; valid: {', '.join(KINDS)}")
if not 0 < passage_words_min <= passage_words_max:
    sys.exit(f'error: passage_words_min={passage_words_min} and passage_words_max={passage_words_max} '
             f'must satisfy 0 < min <= max')
if not 0 < task_words_min <= task_words_max:
    sys.exit(f'error: task_words_min={task_words_min} and task_words_max={task_words_max} must '
             f'satisfy 0 < min <= max')
for _k in ('max_books', 'max_stories', 'n_prompts_val', 'n_sft_val', 'n_prompts_train', 'n_sft_train',
           'num_proc'):
    if globals()[_k] < 0:
        sys.exit(f'error: {_k}={globals()[_k]} must be >= 0')
if task_in_train and not task_dir:
    sys.exit(f'error: task_in_train={task_in_train} adds task examples to the train split; set task_dir')
if val_books < 1:
    sys.exit(f'error: val_books={val_books} must be at least 1 (the val split is whole held-out books)')
if not os.path.isdir(source_dir):
    sys.exit(f"error: source_dir='{source_dir}' is not a folder (the shared data folder with "
             f"{books_file}; set --source_dir or SHARED_DATA)")


def source_path(name, key):
    """The path of a source file under source_dir, or exit naming the setting and the file."""
    if not name:
        return ''
    path = name if os.path.isabs(name) else os.path.join(source_dir, name)
    if not os.path.exists(path):
        sys.exit(f"error: {key}='{name}': {path} does not exist (source_dir='{source_dir}'; "
                 f"--{key}='' leaves it out)")
    return path


books_path = source_path(books_file, 'books_file')
if not books_path:
    sys.exit("error: books_file='' but the books are the corpus; name the file")
manifest_path = source_path(manifest_file, 'manifest_file')
fairytales_path = source_path(fairytales_file, 'fairytales_file')
tinystories_path = source_path(tinystories_file, 'tinystories_file')
tinystories_val_path = source_path(tinystories_val_file, 'tinystories_val_file')
if not tokenizer_file and tokenizer == 'gpt2' and os.path.exists(os.path.join(source_dir, 'gpt2.tiktoken')):
    tokenizer_file = os.path.join(source_dir, 'gpt2.tiktoken')
num_proc = num_proc or usable_cpus()

# -----------------------------------------------------------------------------
# Reading

SEPARATOR = '<|endoftext|>'


def read_books(path, limit=0):
    """The books of a <|endoftext|>-separated file (.xz or plain), streamed, the first `limit`."""
    opener = lzma.open if path.endswith('.xz') else open
    n, lines = 0, []
    with opener(path, 'rt', encoding='utf-8') as f:
        for line in f:
            if line.strip() == SEPARATOR:
                if any(x.strip() for x in lines):
                    yield ''.join(lines)
                    n += 1
                    if n == limit:
                        return
                lines = []
            else:
                lines.append(line)
    if any(x.strip() for x in lines):
        yield ''.join(lines)


def read_stories(path, limit=0):
    """The stories of an <|endoftext|>-separated text file (data.read_documents), the first `limit`."""
    docs = [d for split in read_documents(path).values() for d in split]
    return docs[:limit] if limit else docs


def read_manifest(path):
    """Rows of the manifest TSV (split on '\\n' only: a few titles hold a stray carriage return)."""
    if not path:
        return []
    lines = open(path, encoding='utf-8', newline='').read().split('\n')
    header = lines[0].rstrip('\r').split('\t')
    rows = [dict(zip(header, line.rstrip('\r').split('\t'))) for line in lines[1:] if line.strip()]
    for r in rows:
        r['title'] = ' '.join(r.get('title', '').split())
        r['author'] = ' '.join(r.get('author', '').split())
    return rows


# -----------------------------------------------------------------------------
# Passages (the rule is in the module docstring)

BLOCK = re.compile(r'\n[ \t\xa0\r]*\n')
END = re.compile(r'[.!?:;\-—–…]["\'”’)\]]*$')
HEADING = re.compile(r"^(chapter|book|part|section|canto|act|scene|stave|volume|vol\.|contents|preface|"
                     r"introduction|appendix|index|footnotes?|illustrations?|finis|the end\W*$)\b", re.I)
CREDIT = re.compile(r"^(\[|transcriber|produced by|end of (the )?(project|ebook)|copyright|isbn|"
                    r"printed by|\*)", re.I)
MARKERS = re.compile(r'\[(?:Pg|pg|Page|page|p\.)\s*[\dIVXLCivxlc]+\]|\[\d+\]|\{\d+\}')
QUOTES = {'“': '"', '”': '"', '‘': "'", '’': "'", 'ʼ': "'", '„': '"'}


def straighten(text):
    for a, b in QUOTES.items():
        text = text.replace(a, b)
    return text


OTHER = re.compile(r'[^\w\s.,;:!?\'"()-]|[\d_]')         # digits and symbols
UPPER = re.compile('[A-Z]')
CAPS_WORD = re.compile(r'\b[A-Z][A-Z]+\b')             # a word in capitals (2+ letters)
TITLED = re.compile(r'(?:^|\s)[^\w\s]*[A-Z]')          # a word that starts with a capital


def is_prose(p):
    """A paragraph of running text (see the module docstring)."""
    chars = len(p) - p.count(' ')
    if len(OTHER.findall(p)) > 0.4 * chars or not re.search('[a-z]', p):
        return False
    if not END.search(p) or CREDIT.match(p):
        return False
    n = len(p.split())
    if HEADING.match(p) and n < 12:
        return False
    if len(UPPER.findall(p)) < 0.08 * chars:               # ordinary prose (fast path)
        return True
    if len(CAPS_WORD.findall(p)) > 0.3 * n:
        return False
    return not (n >= 6 and '"' not in p and len(TITLED.findall(p)) > 0.5 * n)


def paragraphs(text):
    """A document -> a list of paragraphs (str) and None where non-prose breaks the text."""
    text = MARKERS.sub('', text.replace('\r', ''))
    if straight_quotes:
        text = straighten(text)
    all_lines = [x for x in text.split('\n') if x.strip()]
    wrapped = sum(len(x.strip()) > 90 for x in all_lines) < 0.02 * max(1, len(all_lines))
    out = []
    for block in BLOCK.split(text):
        lines = [' '.join(x.split()) for x in block.split('\n')]
        lines = [x for x in lines if x]
        if not lines:
            continue
        if len(lines) > 1:
            body = lines[:-1]
            long_share = sum(len(x) >= 40 for x in body) / len(body)
            ends_share = sum(bool(END.search(x)) for x in lines) / len(lines)
            if wrapped and long_share >= 0.8:
                lines = [' '.join(lines)]                  # hard-wrapped prose
            elif not wrapped and ends_share >= 0.5:
                pass                                       # one paragraph a line
            elif not wrapped and long_share >= 0.8 and ends_share < 0.3:
                lines = [' '.join(lines)]                  # a wrapped block among long lines
            else:
                out.append(None)                           # verse, a list, a table of contents
                continue
        for p in lines:
            out.append(p if is_prose(p) else None)
    return out


def pieces_of(p, max_words):
    """A paragraph, or its sentences grouped into about equal pieces of at most max_words words
    (a single longer sentence stays one piece, and is dropped later)."""
    n = len(p.split())
    if n <= max_words:
        return [p]
    sents = sentences(p)
    k = -(-n // max_words)
    goal = n / k
    out, cur, cw = [], [], 0
    for s in sents:
        w = len(s.split())
        if cur and (cw + w > max_words or cw >= goal):
            out.append(' '.join(cur))
            cur, cw = [], 0
        cur.append(s)
        cw += w
    if cur:
        out.append(' '.join(cur))
    return out


def passages_of(text, rng):
    """A document -> (passages, words kept, words seen in prose paragraphs)."""
    lo, hi = passage_words_min, passage_words_max
    out, seen = [], 0
    runs, run = [], []
    for p in paragraphs(text) + [None]:
        if p is None:
            if run:
                runs.append(run)
            run = []
        else:
            run.append(p)
    for run in runs:
        first = len(out)                                   # passages of this run start here
        cur, cw, target = [], 0, rng.randint(lo, hi)

        def flush():
            nonlocal cur, cw, target
            if cw >= lo:
                out.append(('\n'.join(cur), cw))
            elif len(out) > first and out[-1][1] + cw <= hi:   # a short rest joins the one before
                out[-1] = (out[-1][0] + '\n' + '\n'.join(cur), out[-1][1] + cw)
            cur, cw, target = [], 0, rng.randint(lo, hi)

        for p in run:
            for piece in pieces_of(p, hi):
                w = len(piece.split())
                seen += w
                if w > hi:                                 # one endless sentence
                    if cur:
                        flush()
                    continue
                if cur and cw + w > hi:
                    flush()
                cur.append(piece)
                cw += w
                if cw >= target:
                    flush()
        if cur:
            flush()
    return [t for t, _ in out], sum(w for _, w in out), seen


def shingles(text, n=8):
    """Hashes (uint64) of the text's word n-grams, words being its runs of letters, lower-cased:
    a near-duplicate (a typo, other punctuation, another edition) shares most of them. Each
    word's hash is combined as h = h * 1,000,003 + w over the n words (wrapping at 2^64)."""
    w = np.array([hash(x) for x in re.findall(r'[a-z]+', text.lower())], dtype=np.int64).view(np.uint64)
    if len(w) < n:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(len(w) - n + 1, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(1_000_003) + w[k:len(w) - n + 1 + k]
    return h


def book_job(args):
    """(index, text) -> (index, passages, words kept, prose words, all words, the passages' word
    8-gram hashes); seeded per book."""
    i, text = args
    rng = random.Random(seed * 1_000_003 + i)
    ps, kept, seen = passages_of(text, rng)
    return i, ps, kept, seen, len(text.split()), shingles('\n'.join(ps))


def key_of(paragraph):
    """A paragraph's identity for the overlap check: its letters, lower-cased."""
    return hash(' '.join(re.findall(r'[a-z]+', paragraph.lower())))


# -----------------------------------------------------------------------------
# 1. Books -> passages

t0 = time.time()
manifest = read_manifest(manifest_path)
n_books = min(max_books, len(manifest)) if max_books and manifest else max_books or len(manifest) or 0
books = read_books(books_path, n_books)
results = {}
with progress(total=n_books or None, desc='books -> passages', unit='book') as bar:
    if num_proc > 1 and sys.platform != 'darwin':      # fork: the workers share these settings
        import multiprocessing as mp
        pool = mp.get_context('fork').Pool(num_proc)
        jobs = pool.imap(book_job, enumerate(books), chunksize=1)
    else:
        pool, jobs = None, map(book_job, enumerate(books))
    try:
        for i, ps, kept, seen, n_words, hashes in jobs:
            results[i] = (ps, kept, seen, n_words, hashes)
            bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
n_books = len(results)
if manifest:
    if max_books == 0 and n_books != len(manifest):
        sys.exit(f'error: {books_file} holds {n_books} books but {manifest_file} lists {len(manifest)}')
    for i in range(n_books):
        if int(manifest[i]['words']) != results[i][3]:
            sys.exit(f"error: book {i} of {books_file} has {results[i][3]:,} words but line {i + 2} of "
                     f"{manifest_file} ('{manifest[i]['title']}') says {manifest[i]['words']}: the "
                     f"manifest is not in the order of the books; --manifest_file='' goes without it")
titles = [f"{manifest[i]['title']} ({manifest[i]['author']})" if manifest else f'book {i}'
          for i in range(n_books)]
if val_books >= n_books:
    sys.exit(f'error: val_books={val_books} leaves no training book: only {n_books} books '
             f'(max_books={max_books})')
held = sorted(random.Random(seed).sample(range(n_books), val_books))
held_set = set(held)
book_passages = {i: results[i][0] for i in range(n_books)}
t_books = time.time() - t0
print(f'{n_books} books in {t_books:.0f}s: {sum(len(p) for p in book_passages.values()):,} passages, '
      f'{sum(r[1] for r in results.values()):,} of {sum(r[3] for r in results.values()):,} words kept '
      f'({sum(r[2] for r in results.values()):,} in prose paragraphs)')

# -----------------------------------------------------------------------------
# 2. Fairy tales, TinyStories

fairy_passages = []
if fairytales_path:
    for j, tale in enumerate(read_stories(fairytales_path, max_stories)):
        fairy_passages += passages_of(tale, random.Random(seed * 1_000_003 + 10 ** 7 + j))[0]
tiny_train = read_stories(tinystories_path, max_stories) if tinystories_path else []
tiny_val = read_stories(tinystories_val_path, max_stories) if tinystories_val_path else []
if straight_quotes:
    tiny_train = [straighten(s) for s in tiny_train]
    tiny_val = [straighten(s) for s in tiny_val]

train_book_passages = [p for i in range(n_books) if i not in held_set for p in book_passages[i]]
train_keys = {key_of(par) for p in train_book_passages + fairy_passages for par in p.split('\n')
              if len(par.split()) >= 8}
train_shingles = np.unique(np.concatenate(     # sorted: a val passage's are looked up by bisection
    [results[i][4] for i in range(n_books) if i not in held_set] +
    [shingles('\n'.join(fairy_passages)), np.empty(0, dtype=np.uint64)]))


def share_in_train(passage):
    """The share of the passage's word 8-grams that occur in the train books or fairy tales."""
    h = shingles(passage)
    if not len(h) or not len(train_shingles):
        return 0.0
    at = np.minimum(np.searchsorted(train_shingles, h), len(train_shingles) - 1)
    return float((train_shingles[at] == h).mean())


val_passages, dropped_overlap, dropped_near = [], 0, 0
for i in held:
    for p in book_passages[i]:
        if any(len(par.split()) >= 8 and key_of(par) in train_keys for par in p.split('\n')):
            dropped_overlap += 1
        elif share_in_train(p) >= val_overlap_max:
            dropped_near += 1
        else:
            val_passages.append(p)
if not val_passages:
    sys.exit(f'error: the held-out books {[titles[i] for i in held]} gave no val passage')
train_docs = train_book_passages + fairy_passages + tiny_train
print(f'held out {len(held)} books ({len(val_passages):,} passages; {dropped_overlap} dropped for sharing '
      f'a paragraph with train, {dropped_near} for near-duplicating train text): ' + '; '.join(titles[i] for i in held))


def words(docs):
    return sum(len(d.split()) for d in docs)


print(f'train: {len(train_book_passages):,} book passages ({words(train_book_passages):,} words) + '
      f'{len(fairy_passages):,} fairy-tale passages ({words(fairy_passages):,} words) + '
      f'{len(tiny_train):,} TinyStories ({words(tiny_train):,} words)')

# -----------------------------------------------------------------------------
# 3. The task

def task_example(job):
    """(seed index, passage, list words only) -> (task example or None, why it was skipped or
    None, the parts of speech whose word is not from the lists, as 'verb_suffix'...)."""
    index, doc, list_only = job
    if not task_words_min <= len(doc.split()) <= task_words_max:
        return None, 'length', []
    rng = random.Random(seed * 1_000_003 + index)
    head = ' '.join(sentences(doc)[:words_from_sentences]) if words_from_sentences else doc
    t = make_task_pos(head, rng)                # the words from the head, the features from the whole
    if t is None:
        return None, 'no_task', []
    if words_from_sentences:
        t['features'] = choose_features(doc, rng)
    if words_in_order:                          # the answer then copies the next listed word each time
        used = words_of(doc)
        order = sorted(range(len(t['words'])), key=lambda k: first_use(t['words'][k], used))
        t.update({key: [t[key][k] for k in order] for key in ('words', 'pos', 'how')})
    if list_only and any(how != 'list' for how in t['how']):
        return None, 'not_list_words', []       # a rare word the passage happens to have
    if score(doc, t['words'], t['features'])['score'] < 1.0 or not complete_ending(doc):
        return None, 'reference_below_1', []
    row = {'prompt': make_prompt(t['words'], t['features']), 'response': doc, 'words': t['words'],
           'features': t['features']}
    return row, None, [f'{pos}_{how}' for pos, how in zip(t['pos'], t['how']) if how != 'list']


def to_examples(docs, offset, limit, list_only=list_words_only):
    """Documents (with task_cut, their pieces) -> task examples, in order, until `limit` (0: all),
    on num_proc processes; (examples, documents skipped by reason, words not from the lists, for
    each example whether all its words are from the lists)."""
    out, listed, why = [], [], {'length': 0, 'no_task': 0, 'not_list_words': 0, 'reference_below_1': 0}
    fallbacks = {f'{pos}_{how}': 0 for pos in ('verb', 'noun', 'adjective') for how in ('suffix', 'content')}
    pieces = [p for doc in docs for p in (sentence_chunks(doc, task_words_max)
                                          if task_cut and len(doc.split()) > task_words_max else [doc])]
    pool = None
    if num_proc > 1 and sys.platform != 'darwin' and len(pieces) > 1000:
        import multiprocessing as mp
        pool = mp.get_context('fork').Pool(num_proc)
    # in batches, each finished before the next starts: at the limit no work is in flight, so the
    # pool closes normally (terminating a pool whose workers are still sending results can hang)
    batch = 4096
    try:
        for start in range(0, len(pieces), batch):
            jobs = [(offset + j, pieces[j], list_only) for j in range(start, min(start + batch, len(pieces)))]
            for row, reason, fell_back in (pool.map(task_example, jobs, chunksize=64) if pool
                                           else map(task_example, jobs)):
                if limit and len(out) >= limit:
                    break
                if row is None:
                    why[reason] += 1
                    continue
                for key in fell_back:
                    fallbacks[key] += 1
                out.append(row)
                listed.append(not fell_back)
            if limit and len(out) >= limit:
                break
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return out, why, fallbacks, listed


if task_dir:
    t2 = time.time()
    def distinct(passages):
        """The passages less the repeats (the same text in two books or collections): a passage
        gives one example, in one file."""
        seen, out = set(), []
        for p in passages:
            if (k := key_of(p)) not in seen:
                seen.add(k)
                out.append(p)
        return out

    pool_train = distinct(train_book_passages + fairy_passages)
    pool_val = distinct(val_passages)
    random.Random(seed).shuffle(pool_train)
    random.Random(seed + 1).shuffle(pool_val)
    sft_list_only = list_words_only and sft_list_words_only
    val, why_val, fb_val, _ = to_examples(pool_val, 10 ** 9, n_prompts_val + n_sft_val)
    train, why_train, fb_train, listed = to_examples(pool_train, 0, n_prompts_train + n_sft_train if n_sft_train else 0,
                                                     sft_list_only)
    tiny, why_tiny, fb_tiny, tiny_listed = to_examples(tiny_train, 2 * 10 ** 9, 0, sft_list_only)
    # the training prompts (RL, preference pairs) are made like the held-out ones: list words only
    # when list_words_only; the other examples are SFT data
    can_prompt = [i for i in range(len(train)) if listed[i] or not list_words_only]
    n_val = min(n_prompts_val, len(val) // 2)       # each split keeps at least half for SFT
    n_train = min(n_prompts_train, len(can_prompt) // 2)
    if n_val < 1 or len(train) + len(tiny) - n_train < 1:
        sys.exit(f'error: {len(train) + len(tiny)} train and {len(val)} val task examples are too few to '
                 f'split into SFT data and held-out prompts (task_words_min={task_words_min}, '
                 f'task_words_max={task_words_max})')

    def as_prompt(r):
        return {'prompt': r['prompt'], 'words': r['words'], 'features': r['features'],
                'reference': r['response']}

    as_prompts = set(can_prompt[:n_train])
    sft_train = [r for i, r in enumerate(train) if i not in as_prompts] + tiny
    random.Random(seed + 2).shuffle(sft_train)
    prompts_train = [as_prompt(train[i]) for i in can_prompt[:n_train]]
    # the word lists are small, so a training passage can draw a held-out example's very instruction
    # (another passage its answer): such training examples are left out, so that the held-out
    # prompts are held out to the letter
    held_out = {r['prompt'] for r in val}
    same_prompt = sum(r['prompt'] in held_out for r in sft_train + prompts_train)
    sft_train = [r for r in sft_train if r['prompt'] not in held_out]
    prompts_train = [r for r in prompts_train if r['prompt'] not in held_out]
    if not sft_train:
        sys.exit(f'error: each of the {same_prompt} training examples asks what a held-out example asks, to the '
                 f'letter: no SFT data is left (more books, or words_from_sentences=0 for words from whole passages)')
    files = {'prompts_val': [as_prompt(r) for r in val[:n_val]], 'sft_val': val[n_val:],
             'prompts_train': prompts_train, 'sft_train': sft_train}
    meta_path = start_prepared(task_dir)          # the folder is invalid until meta.json lands
    for name, rows in files.items():
        write_jsonl(os.path.join(task_dir, f'{name}.jsonl'), rows)
        print(f'{name}: {len(rows):,} records')
    task_meta = {'source': os.path.abspath(books_path), 'dataset': 'stories', 'seed': seed,
                 **{f'{k}_records': len(v) for k, v in files.items()},
                 'sft_train_tinystories': len(tiny), 'sft_list_words_only': sft_list_only,
                 'sft_train_not_list_words': len(train) - sum(listed) + len(tiny) - sum(tiny_listed),
                 'task_words': [task_words_min, task_words_max],
                 'task_cut': task_cut, 'words_from_sentences': words_from_sentences,
                 'words_in_order': words_in_order, 'task_in_train': min(task_in_train, len(sft_train)),
                 'train_left_out_for_a_held_out_prompt': same_prompt,
                 'val_books': [titles[i] for i in held],
                 'skipped': {'val': why_val, 'train': why_train, 'tinystories': why_tiny},
                 'words_not_from_lists': {'val': fb_val, 'train': fb_train, 'tinystories': fb_tiny},
                 'instruct_format': False}
    write_json(meta_path, task_meta)
    print(f'task data in {time.time() - t2:.0f}s -> {task_dir}; example prompt: {files["prompts_val"][0]["prompt"]}')


# -----------------------------------------------------------------------------
# 4. Tokens (after the task: with task_in_train, some SFT examples join the train split)

t1 = time.time()
# char: every character of every split (a character set says nothing of the held-out text, and a
# character the vocabulary lacked could not be encoded); the others learn from train only
tok = build_tokenizer(tokenizer, texts=train_docs + val_passages + (tiny_val or []) if tokenizer == 'char'
                      else train_docs[:tokenizer_train_docs], vocab_size=vocab_size,
                      tokenizer_file=tokenizer_file or None)
print(f'tokenizer: {tok}')
task_docs = [f"{r['prompt']}\n{r['response']}" for r in sft_train[:task_in_train]] if task_in_train else []
if task_docs:                          # the instruction, a newline, the answer: pretraining sees the format
    print(f'train: + {len(task_docs):,} SFT examples as documents ({words(task_docs):,} words)')
splits = {'train': train_docs + task_docs, 'val': val_passages}
if tiny_val:
    splits['val_tinystories'] = tiny_val
meta = write_token_dataset(
    out_dir, splits, tok, source=os.path.abspath(books_path), num_proc=num_proc,
    extra_meta={'dataset': 'stories',
                'sources': {k: os.path.abspath(v) for k, v in
                            (('books', books_path), ('manifest', manifest_path), ('fairytales', fairytales_path),
                             ('tinystories', tinystories_path), ('tinystories_val', tinystories_val_path)) if v},
                'books': n_books, 'val_books': [{'index': i, 'title': titles[i],
                                                 'passages': len(book_passages[i])} for i in held],
                'train_docs_by_source': {'gutenberg': len(train_book_passages),
                                         'fairytales': len(fairy_passages), 'tinystories': len(tiny_train),
                                         'task_examples': len(task_docs)},
                'train_words_by_source': {'gutenberg': words(train_book_passages),
                                          'fairytales': words(fairy_passages), 'tinystories': words(tiny_train),
                                          'task_examples': words(task_docs)},
                'val_words': words(val_passages), 'val_dropped_overlap': dropped_overlap, 'val_dropped_near_duplicate': dropped_near,
                'passage_words': [passage_words_min, passage_words_max], 'straight_quotes': straight_quotes,
                'seed': seed, 'max_books': max_books, 'max_stories': max_stories})
t_tokens = time.time() - t1
print(f'tokenized in {t_tokens:.0f}s')


# -----------------------------------------------------------------------------
print('summary:')
print(f'  books: {n_books} ({n_books - len(held)} train, {len(held)} val); passages '
      f'{passage_words_min}..{passage_words_max} words')
for split in splits:
    print(f"  {split:16s} {meta[f'{split}_docs']:>9,} docs {words(splits[split]):>12,} words "
          f"{meta[f'{split}_tokens']:>12,} tokens")
print(f'  total {time.time() - t0:.0f}s (books {t_books:.0f}s, tokens {t_tokens:.0f}s)')
