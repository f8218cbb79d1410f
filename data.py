"""
Data: the token files every pretraining stage reads (data/<name>/{train,val}.bin + meta.json,
written by write_token_dataset for prepare/ and distill.py), batches drawn as a pure function of
(seed, step, micro-step) so a resume reads the same ones, documents from local files, JSONL
records, and the chat-template batches of the post-training stages.
"""

import functools
import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys

import numpy as np
import torch

from runlog import progress
from tokenizer import EOT, tokenizer_from_spec


# -----------------------------------------------------------------------------
# Token files: data/<name>/{train,val}.bin (uint16 or uint32) + meta.json


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


class TokenData:
    """Random contiguous windows from memory-mapped token files, as nanoGPT does.
    Batches are a pure function of the generator, so a run that seeds the generator from its
    step number reads the same batches after a resume."""

    def __init__(self, data_dir):
        meta_path = os.path.join(data_dir, 'meta.json')
        if not os.path.isfile(meta_path):
            sys.exit(f"error: no dataset at '{data_dir}' (missing meta.json); "
                     f"run a prepare/ script first, e.g. python prepare/tinystories.py")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.data_dir = data_dir
        self.dtype = np.dtype(self.meta['dtype'])
        self.lengths = {}
        splits = ['train', 'val'] + sorted(k[:-len('_tokens')] for k in self.meta       # val_<name>_tokens
                                           if k.endswith('_tokens') and k.startswith('val_') and k != 'val_tokens')
        for split in splits:
            p = os.path.join(data_dir, f'{split}.bin')
            if not os.path.isfile(p):
                sys.exit(f"error: '{p}' is missing; re-run the prepare script for this dataset")
            self.lengths[split] = os.path.getsize(p) // self.dtype.itemsize
        # the held-out splits: 'val' and any more a prepare script wrote (e.g. val_tinystories)
        self.val_splits = [s for s in splits if s != 'train']

    def tokens(self, split):
        # a fresh memmap per call: numpy's memmap keeps pages alive otherwise (nanoGPT's note)
        return np.memmap(os.path.join(self.data_dir, f'{split}.bin'), dtype=self.dtype, mode='r')

    def bytes_per_token(self, split):
        """UTF-8 bytes of text per token, for bits per byte = loss / ln 2 / bytes_per_token."""
        return self.meta[f'{split}_bytes'] / self.meta[f'{split}_tokens']

    def batch(self, split, batch_size, block_size, generator, device='cpu'):
        """x, y of shape (batch_size, block_size); y is x shifted left by one token."""
        n = self.lengths[split]
        if n <= block_size + 1:
            sys.exit(f"error: the {split} split has {n} tokens; a window of block_size + 1 = "
                     f"{block_size + 1} needs more; lower block_size or prepare more data")
        data = self.tokens(split)
        # starts 0 .. n - block_size - 2: the last possible start (n - block_size - 1) is never drawn,
        # kept so that every documented run's batches (and evaluation batches) stay the same
        ix = torch.randint(n - block_size - 1, (batch_size,), generator=generator).tolist()
        buf = np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64)
        xy = torch.from_numpy(buf)
        if str(device).startswith('cuda'):
            xy = xy.pin_memory().to(device, non_blocking=True)
        else:
            xy = xy.to(device)
        return xy[:, :-1], xy[:, 1:]


EVAL_SEED = 1337    # the evaluation batches' seed, whatever a run's own seed is


def eval_generator(k, split):
    """The generator of the k-th fixed evaluation batch of `split` (one stream for 'train', one
    for every held-out split): the same batches at every evaluation, in every script that reports
    a loss on them (train.py, distill.py, eval.py, quantize.py) and for every run's seed, so their
    numbers compare: two runs' val losses then differ by their models, not by the batches read."""
    return torch.Generator().manual_seed(EVAL_SEED + 7919 * k + (0 if split == 'train' else 1))


def batch_generator(seed, step, index):
    """A torch.Generator that is a function of (seed, step, the micro-batch's index) alone, so a
    resumed run draws exactly the batches the uninterrupted run would have drawn. Training stages
    call Run.batch_generator (training.py), which passes the micro-batch's global index over all
    ranks, so ranks draw different batches by construction."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + index * 31)


def epoch_batch(n, batch_size, seed, number):
    """The item numbers of global micro-batch `number` (0, 1, 2, ... over the whole run) when n
    items are read in epochs, each a fresh permutation of them (seeded by (seed, epoch)): no item
    comes twice before every item has come once, and the batch is a function of its number alone,
    so a resumed run reads what the uninterrupted one would. (Drawing batch_size items at random
    at every step instead leaves 37% of the items unread after one epoch's worth of batches, and
    shows others two or three times: what a small model then fits is the repeats.)"""
    start = number * batch_size
    return [int(_permutation(n, seed, pos // n)[pos % n]) for pos in range(start, start + batch_size)]


@functools.lru_cache(maxsize=4)
def _permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + 17))


def read_documents(path, fields=('text', 'story')):
    """Documents from a local file or folder, as a dict {split: [str, ...]}.

    Formats: .txt (documents separated by lines that are exactly <|endoftext|>, as in the official
    TinyStories files; a file without such lines is one document), .jsonl / .json (objects with
    a 'text' or 'story' field) and .parquet (a 'text' column). In a folder, a file whose name has
    the word val, valid or validation goes to 'val', one with the word train to 'train' (a single
    file's split comes from its name the same way; words as split by anything not a letter:
    TinyStories-valid.txt, validation-00000.parquet, but not interval.txt); files with neither go to
    'all'. A folder's files are listed by split."""
    if not os.path.exists(path):
        sys.exit(f"error: source '{path}' does not exist")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(('.txt', '.jsonl', '.json', '.parquet')))
        if not files:
            sys.exit(f"error: source folder '{path}' has no .txt, .jsonl, .json or .parquet files")
    else:
        files = [path]
    splits, names = {}, {}
    for f in files:
        words = set(re.split('[^a-z]+', os.path.splitext(os.path.basename(f))[0].lower()))
        split = 'val' if words & {'val', 'valid', 'validation'} else 'train' if 'train' in words else 'all'
        try:
            splits.setdefault(split, []).extend(_read_file(f, fields))
        except UnicodeDecodeError as e:
            sys.exit(not_utf8(f, e))
        names.setdefault(split, []).append(os.path.basename(f))
    if os.path.isdir(path):
        print(f"{path}: " + '; '.join(f"{split}: {', '.join(n)}" for split, n in names.items()), file=sys.stderr)
    for split, docs in splits.items():
        if not docs:
            sys.exit(f"error: source '{path}' has no documents for the {split} split")
    return splits


def records_of_lines(lines):
    """Documents from rows that are the lines of a text file whose documents are separated by
    '<|endoftext|>' lines (how the Hugging Face hub serves TinyStoriesInstruct: 21.8M rows of
    about 2.4M records); rows with no such separator are documents already, and stay as they are."""
    if not any(line.strip() == '<|endoftext|>' for line in lines):
        return list(lines)
    docs, current = [], []
    for line in lines:
        if line.strip() == '<|endoftext|>':
            if any(x.strip() for x in current):
                docs.append('\n'.join(current))
            current = []
        else:
            current.append(line)
    if any(x.strip() for x in current):
        docs.append('\n'.join(current))
    return docs


def not_utf8(where, e, of=''):
    """The error for text that is not UTF-8 (e: the UnicodeDecodeError): where, and the byte it fails at."""
    return f'error: {where} is not UTF-8 text ({e.reason} at byte {e.start}{of}); save it as UTF-8'


def read_records(path):
    """[(where, record)] of a .jsonl file (a JSON value a line, blank lines skipped) or a .json file
    (a list of them); where names the file and its line or item, for error messages. A byte-order
    mark is allowed; text that is not UTF-8, or not JSON, exits naming its line."""
    if path.endswith('.json'):
        try:
            with open(path, encoding='utf-8-sig') as f:
                data = json.load(f)
        except UnicodeDecodeError as e:
            sys.exit(not_utf8(path, e))
        except json.JSONDecodeError as e:
            sys.exit(f'error: {path} is not JSON ({e.msg}, line {e.lineno})')
        if not isinstance(data, list):
            sys.exit(f'error: {path} must hold a JSON list of records (or use .jsonl: one record per line)')
        return [(f'{path} item {i + 1}', r) for i, r in enumerate(data)]
    records = []
    with open(path, 'rb') as f:                           # each line decoded alone: an error names its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode('utf-8-sig' if n == 1 else 'utf-8')
            except UnicodeDecodeError as e:
                sys.exit(not_utf8(f'{path} line {n}', e, ' of the line'))
            if line.strip():
                try:
                    records.append((f'{path} line {n}', json.loads(line)))
                except json.JSONDecodeError as e:
                    sys.exit(f'error: {path} line {n} is not JSON ({e.msg})')
    return records


def _read_file(path, fields):
    def field_of(obj, where):
        for k in fields:
            if isinstance(obj, dict) and isinstance(obj.get(k), str):
                return obj[k]
        sys.exit(f"error: {where} has no string field {' or '.join(map(repr, fields))}")

    if path.endswith('.txt'):                         # (utf-8-sig: a byte-order mark is no text)
        with open(path, encoding='utf-8-sig') as f:
            text = f.read()
        docs = re.split(r'^\s*<\|endoftext\|>\s*$', text, flags=re.MULTILINE)
    elif path.endswith(('.jsonl', '.json')):
        docs = [field_of(obj, where) for where, obj in read_records(path)]
    elif path.endswith('.parquet'):
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        col = next((k for k in fields if k in table.column_names), None)
        if col is None:
            sys.exit(f"error: {path} has no column {' or '.join(map(repr, fields))}")
        docs = table.column(col).to_pylist()
    else:
        sys.exit(f"error: '{path}' is not .txt, .jsonl, .json or .parquet")
    return [d.strip() for d in docs if d and d.strip()]


def split_off_val(docs, val_fraction, seed=0):
    """(train, val): a seeded random val_fraction of the documents (at least one) held out. One
    document (a plain text file with no <|endoftext|> lines) keeps its last val_fraction, from a
    line break, for val, as prepare/shakespeare_char.py does."""
    if len(docs) == 1 and isinstance(docs[0], str):
        cut = docs[0].rfind('\n', 0, int(len(docs[0]) * (1 - val_fraction)))
        if cut > 0 and docs[0][cut + 1:].strip():
            print(f'one document: its last {len(docs[0]) - cut - 1:,} characters (from a line break) are the val '
                  f'split; documents of their own are separated by lines holding {EOT}', file=sys.stderr)
            return [docs[0][:cut]], [docs[0][cut + 1:]]
    if len(docs) < 2:
        sys.exit(f'error: {len(docs)} document(s) cannot be split into train and val (separate documents by '
                 f'lines holding {EOT}, or give a folder of files)')
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    val_ix = set(order[:n_val].tolist())
    return ([d for i, d in enumerate(docs) if i not in val_ix],
            [d for i, d in enumerate(docs) if i in val_ix])


def train_and_val(splits, val_fraction, seed=0):
    """read_documents' {split: docs} as {'train', 'val'}. Files named for a split keep it, and files
    named for neither ('all') join the other split: train where a val file exists (with a train
    file too, saying so), val where only train files do. Where no file is named for a split, a
    seeded val_fraction of all the documents is held out (split_off_val)."""
    splits = dict(splits)
    if 'all' in splits and ('train' in splits or 'val' in splits):
        into = 'train' if 'val' in splits else 'val'
        if {'train', 'val'} <= set(splits):
            print(f"{len(splits['all']):,} documents from files named for neither split join train (the val "
                  f"files alone are held out)", file=sys.stderr)
        splits[into] = splits.get(into, []) + splits.pop('all')
    if set(splits) != {'train', 'val'}:
        every = [d for docs in splits.values() for d in docs]
        splits = dict(zip(('train', 'val'), split_off_val(every, val_fraction, seed)))
    return splits


_worker_tokenizer = None


def _init_worker(spec):
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_spec(spec)


def _encode_docs(docs):
    """Token ids of a chunk of documents, each followed by EOT, as one flat array. Documents that
    are already token ids (e.g. a teacher's samples) are kept as they are; their bytes are those of
    their decoded text."""
    tok = _worker_tokenizer
    if docs and not isinstance(docs[0], str):
        encoded = [list(d) for d in docs]
        n_bytes = sum(len(tok.decode(d).encode('utf-8')) for d in encoded)
    else:
        encoded = tok.encode_batch(docs)
        n_bytes = sum(len(d.encode('utf-8')) for d in docs)
    ids = [t for doc in encoded for t in (*doc, tok.eot_id)]
    return np.asarray(ids, dtype=np.int64), n_bytes, len(docs)


def prepare_command(data_dir, dataset):
    """The command that prepares data_dir, for an error message: prepare/<the folder's name>.py
    where that script exists (data/stories -> prepare/stories.py), else prepare/<dataset>.py."""
    name = os.path.basename(os.path.normpath(data_dir))
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare')
    script = next((s for s in (name, dataset) if os.path.isfile(os.path.join(here, s + '.py'))), 'tinystories')
    return f"python prepare/{script}.py --out_dir={data_dir}"


POST_TRAINING_DATA = ('tinystories_instruct', 'preferences', 'chat')    # prepare/ scripts of no pretraining data


def prepare_if_missing(dataset, data_dir, prepare, rt):
    """The token folder train.py reads: data_dir if given (it must hold a prepared dataset), else
    data/<dataset>, which prepare/<dataset>.py (or the `prepare` command: a script under prepare/
    and its flags) makes on first use, on rank 0 while the other ranks wait."""
    if data_dir and os.path.isfile(data_dir):
        sys.exit(f"error: data_dir='{data_dir}' is a file; data_dir is a folder of prepared tokens: make one with "
                 f"python prepare/tinystories.py --source={data_dir} --out_dir=data/NAME, then --data_dir=data/NAME")
    if not data_dir and os.path.isfile(os.path.join(dataset, 'meta.json')):
        sys.exit(f"error: dataset='{dataset}' is a name (the folder data/<dataset>); for the prepared folder "
                 f"{dataset} pass --data_dir={dataset}")
    if not data_dir and ('/' in dataset or os.sep in dataset or
                         dataset.endswith(('.txt', '.jsonl', '.json', '.parquet'))):
        sys.exit(f"error: dataset='{dataset}' is a name (the folder data/<dataset>); prepare a file or folder with "
                 f"python prepare/tinystories.py --source={dataset} --out_dir=data/NAME, then --dataset=NAME")
    if data_dir:
        if not os.path.exists(os.path.join(data_dir, 'meta.json')):
            sys.exit(f"error: no dataset at data_dir='{data_dir}' (no meta.json); prepare one there, e.g. "
                     f"{prepare_command(data_dir, dataset)}, or leave data_dir unset for data/{dataset}")
        if rt.master:                 # (a config file's dataset= would otherwise seem to be the data)
            print(f"data: {data_dir} (data_dir is given, so dataset='{dataset}' and prepare= are not read)")
        return data_dir
    data_dir = os.path.join('data', dataset)
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        script, *flags = (prepare or f'{dataset}.py').split()
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare')
        if not os.path.isfile(os.path.join(here, script)):
            made = sorted(f[:-3] for f in os.listdir(here) if f.endswith('.py') and f[:-3] not in POST_TRAINING_DATA)
            sys.exit(f"error: no dataset at {data_dir} and no prepare/{script} to make it; datasets prepared on first "
                     f"use: {', '.join(made)}; text of your own: python prepare/tinystories.py "
                     f"--source=FILE_OR_FOLDER --out_dir={data_dir} (GPT-2's tokenizer by default; for a small CPU "
                     f"model --tokenizer=bpe --vocab_size=4096)")
        command = [sys.executable, os.path.join(here, script), *flags, f'--out_dir={data_dir}']
        if rt.master:
            print(f"{data_dir} is missing; preparing it: {' '.join(command[1:])}", flush=True)
            rc = subprocess.call(command)
            if rc:
                sys.exit(f"error: {' '.join(command[1:])} failed (exit {rc}); prepare the data by hand, e.g. "
                         f"with --source=PATH to local files")
        if rt.ddp:
            torch.distributed.barrier()
    return data_dir


def usable_cpus(cpu_max='/sys/fs/cgroup/cpu.max'):
    """The cores this process may use: os.cpu_count() is the host's, which on a container or a
    CI runner can be far more than the CPU affinity mask or the cgroup quota (cpu.max) allows."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    try:
        with open(cpu_max) as f:          # cgroup v2: "<quota> <period>" or "max ..."
            quota, period = f.read().split()[:2]
        if quota != 'max':
            n = min(n, max(1, -(-int(quota) // int(period))))     # ceil(quota / period)
    except (OSError, ValueError):
        pass
    return max(1, n)


def write_token_dataset(out_dir, splits, tokenizer, source, num_proc=None, extra_meta=None,
                        chunk_docs=1024):
    """Tokenize documents in parallel and write out_dir/{split}.bin plus meta.json.

    splits: {'train': iterable of str, 'val': ...}; every document is followed by the EOT token.
    A split may hold token-id lists instead of strings: they are written unchanged (distill.py).
    Each file is written under a temporary name and renamed when complete, so a crash never
    leaves a .bin that a later run would read. meta.json (written last) records the tokenizer
    spec (large parts such as BPE ranks go to a side file), vocab size, dtype, token and byte
    counts and the source."""
    meta_path = start_prepared(out_dir)     # the folder is invalid until the new meta.json lands
    dtype = token_dtype(tokenizer.vocab_size)
    spec = tokenizer.spec()
    meta = {'tokenizer': save_tokenizer_spec(spec, out_dir), 'vocab_size': tokenizer.vocab_size,
            'eot_id': tokenizer.eot_id, 'dtype': np.dtype(dtype).name, 'source': source}
    num_proc = num_proc or usable_cpus()
    for split, docs in splits.items():
        docs = list(docs)
        chunks = [docs[i:i + chunk_docs] for i in range(0, len(docs), chunk_docs)]
        path = os.path.join(out_dir, f'{split}.bin')
        tmp = path + '.tmp'
        n_tokens = n_bytes = n_docs = 0
        pool = None
        if num_proc > 1 and len(chunks) > 1:
            ctx = mp.get_context('spawn' if sys.platform == 'darwin' else 'fork')
            pool = ctx.Pool(min(num_proc, len(chunks)), initializer=_init_worker, initargs=(spec,))
            results = pool.imap(_encode_docs, chunks)
        else:
            _init_worker(spec)
            results = map(_encode_docs, chunks)
        try:
            with open(tmp, 'wb') as f, progress(total=len(docs), desc=f'tokenizing {split}',
                                                 unit='doc') as bar:
                for flat, nb, nd in results:
                    flat.astype(dtype).tofile(f)
                    n_tokens += len(flat)
                    n_bytes += nb
                    n_docs += nd
                    bar.update(nd)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        os.replace(tmp, path)
        meta[f'{split}_tokens'] = n_tokens
        meta[f'{split}_bytes'] = n_bytes
        meta[f'{split}_docs'] = n_docs
        print(f'{split}: {n_docs:,} documents, {n_tokens:,} tokens, {n_bytes:,} bytes -> {path}')
    meta.update(extra_meta or {})
    write_json(meta_path, meta)
    return meta


def save_tokenizer_spec(spec, out_dir):
    """A spec for meta.json: large binary fields (BPE ranks) go to a file beside it."""
    spec = dict(spec)
    if isinstance(spec.get('ranks'), bytes):
        name = f"{spec['kind']}.tiktoken"
        with open(os.path.join(out_dir, name + '.tmp'), 'wb') as f:
            f.write(spec.pop('ranks'))
        os.replace(os.path.join(out_dir, name + '.tmp'), os.path.join(out_dir, name))
        spec['ranks_file'] = name
    return spec


def load_tokenizer_spec(meta_spec, data_dir):
    """Inverse of save_tokenizer_spec: read side files back into the spec."""
    spec = dict(meta_spec)
    if 'ranks_file' in spec:
        with open(os.path.join(data_dir, spec.pop('ranks_file')), 'rb') as f:
            spec['ranks'] = f.read()
    return spec


# -----------------------------------------------------------------------------
# Local copies of public data, for machines without internet

LOCAL_DATA = os.environ.get('SHARED_DATA') or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data'))


def offline_if_unreachable(host='huggingface.co'):
    """Before the first `import datasets`: if the hub's host name does not resolve, tell the
    Hugging Face libraries they are offline, so a load fails at once (and the prepare scripts go to
    their local copies) instead of after about 25 s of retries. Returns whether it resolved."""
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        os.environ.setdefault('HF_HUB_OFFLINE', '1')
        os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
        return False


def local_copy(*parts):
    """The path of a local copy of a public data file under $SHARED_DATA (default: shared/data
    beside the checkout), or None: what the prepare scripts fall back to when a download fails."""
    path = os.path.join(LOCAL_DATA, *parts)
    return path if os.path.exists(path) else None


# -----------------------------------------------------------------------------
# Records and chat batches


def write_jsonl(path, rows):
    """One JSON record per line, written to a temporary name and renamed (a crash leaves no
    half-written file)."""
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + '\n')
    os.replace(path + '.tmp', path)


def write_json(path, obj):
    """obj as indented JSON, written to a temporary name and renamed (a crash leaves the old file)."""
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2)
    os.replace(path + '.tmp', path)


def read_jsonl(path, required=(), hint=''):
    """The records of a JSONL file; exits with a clear message if it is missing, a line is not
    JSON, or a record lacks one of the `required` fields."""
    if not os.path.isfile(path):
        sys.exit(f"error: '{path}' not found" + (f'; {hint}' if hint else ''))
    rows = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f'error: {path} line {n} is not JSON ({e.msg})')
            missing = [k for k in required if k not in r]
            if missing:
                sys.exit(f'error: {path} line {n} lacks {missing}')
            rows.append(r)
    return rows


def start_prepared(folder):
    """Make `folder` for a prepare script's files and remove its meta.json, which the script writes
    last: until it lands again, read_prepared refuses the folder. Returns the meta.json path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'meta.json')
    if os.path.exists(path):
        os.remove(path)
    return path


def read_prepared(folder, name, required=(), hint=''):
    """read_jsonl of a file in a folder a prepare script wrote (the task, the preference pairs).
    Those scripts remove the folder's meta.json first and write it last: a folder without one is
    half-written (an interrupted run, old files beside new ones) and is refused."""
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, 'meta.json')):
        sys.exit(f"error: '{folder}' has no meta.json: its preparation did not finish (its files may mix "
                 f"an interrupted run with an earlier one); prepare it again" + (f' ({hint})' if hint else ''))
    return read_jsonl(os.path.join(folder, name), required, hint)


def chat_batch(rows, pad_id, T=None, weights=False):
    """(x, y) for a list of (ids, mask) pairs, e.g. from tok.encode_chat: x the tokens, y the next
    token where the mask is on and -1 elsewhere (prompt, padding: no loss). Rows are right-padded
    with pad_id, or cut, to T tokens (default: the longest row minus one). weights=True: also w,
    each target's mask value as a float (0 where no loss; a mask of weights, as
    encode_chat_examples(word_weight=) makes, gives each target its loss weight)."""
    T = T or max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    w = torch.zeros((len(rows), T)) if weights else None
    for b, (ids, mask) in enumerate(rows):
        n = min(len(ids) - 1, T)
        x[b, :n] = torch.tensor(ids[:n])
        y[b, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:n + 1], mask[1:n + 1])])
        if weights:
            w[b, :n] = torch.tensor([float(m) for m in mask[1:n + 1]])
    return (x, y, w) if weights else (x, y)


def word_token_weights(tok, response, words, weight):
    """Per token of tok.encode(response): `weight` on the tokens of each required word's first use
    (task.word_spans), 1 elsewhere. A word's tokens are those between the encoding of the text
    before it (which must be a prefix of the whole encoding: with GPT-2's BPE the space before a
    word is part of the word's token, so the text before it is then taken without that space) and
    the encoding of the text through it. A word the tokenizer merges with what precedes it in
    some other way keeps weight 1."""
    from task import word_spans                       # (task.py imports the generation code)
    ids = tok.encode(response)
    out = [1.0] * len(ids)
    for span in word_spans(response, words):
        if span is None:
            continue
        start, end = span
        k1 = len(tok.encode(response[:end]))
        for before in (response[:start], response[:start - 1] if response[:start].endswith(' ') else None):
            prefix = tok.encode(before) if before is not None else None
            if prefix is not None and prefix == ids[:len(prefix)] and len(prefix) < k1 <= len(ids):
                out[len(prefix):k1] = [weight] * (k1 - len(prefix))
                break
    return out


def encode_chat_examples(tok, rows, block_size, word_weight=1.0, show_progress=False, num_proc=None):
    """(ids, mask) of each {'prompt', 'response'} record (with 'messages': the conversation before
    the response) with the chat template (tok.encode_chat), cut to block_size + 1 tokens; and how
    many records were cut. word_weight != 1: the mask of a
    record with 'words' holds loss weights instead of booleans: word_weight on the tokens of each
    required word's first use in the response (word_token_weights), 1 on the rest of the response
    and on its closing <|end|>, 0 on the prompt. 20,000 records or more are encoded in chunks by
    num_proc worker processes (default: the usable cores, at most 16; the speedrun's 299k with word
    weights take about a minute in one process), in order, so the result is the one process's.
    show_progress: a progress bar over 10,000 records or more."""
    num_proc = num_proc or (min(16, usable_cpus()) if len(rows) >= 20000 else 1)
    chunks = [rows[i:i + 2000] for i in range(0, len(rows), 2000)]
    pool = None
    if num_proc > 1 and len(chunks) > 1:     # each worker rebuilds the tokenizer from its spec
        ctx = mp.get_context('spawn' if sys.platform == 'darwin' else 'fork')
        pool = ctx.Pool(min(num_proc, len(chunks)), initializer=_init_worker, initargs=(tok.spec(),))
        results = pool.imap(_encode_chat_chunk, [(c, block_size, word_weight) for c in chunks])
    else:
        results = (_encode_chat_rows(tok, c, block_size, word_weight) for c in chunks)
    out, cut = [], 0
    try:
        with progress(total=len(rows), desc='encoding examples', unit='example',
                      disable=not show_progress or len(rows) < 10000) as bar:
            for encoded, n_cut in results:
                out += encoded
                cut += n_cut
                bar.update(len(encoded))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return out, cut


def _encode_chat_chunk(args):
    """encode_chat_examples's work on one chunk, in a worker process (_init_worker's tokenizer)."""
    rows, block_size, word_weight = args
    return _encode_chat_rows(_worker_tokenizer, rows, block_size, word_weight)


def _encode_chat_rows(tok, rows, block_size, word_weight):
    out, cut = [], 0
    for r in rows:
        ids, mask = tok.encode_chat(r['prompt'], r['response'], messages=r.get('messages'))
        if word_weight != 1 and r.get('words'):
            n_prompt = mask.index(True)
            weights = word_token_weights(tok, r['response'], r['words'], word_weight)
            mask = [0.0] * n_prompt + weights + [1.0] * (len(ids) - n_prompt - len(weights))
        cut += len(ids) > block_size + 1
        out.append((ids[:block_size + 1], mask[:block_size + 1]))
    return out, cut


def neighbours_in_length(examples, pool, batch_size, generator):
    """batch_size examples that follow each other in `pool` (indices into `examples`, shortest
    first), from a random start, for a padded batch of similar lengths (sft.py packing=False). The
    run never wraps from the longest examples to the shortest, unless the pool holds fewer than
    batch_size."""
    start = int(torch.randint(max(1, len(pool) - batch_size + 1), (1,), generator=generator))
    return [examples[pool[(start + k) % len(pool)]] for k in range(batch_size)]


def pack_chat_examples(examples, pool, batch_size, block_size, generator):
    """batch_size rows of block_size + 1 tokens for chat_batch: each row is random examples
    (ids, mask), drawn from `pool` (indices into `examples`), concatenated until it is full, with
    their masks kept, so a window holds several examples and no padding (sft.py, distill.py).
    Returns (rows, segments): segments (batch_size, block_size) numbers the example of each input
    token (chat_batch's x), for GPT.forward(segments=) to keep the examples apart."""
    rows, segments = [], torch.empty((batch_size, block_size), dtype=torch.long)
    for b in range(batch_size):
        ids, mask, seg = [], [], []
        while len(ids) < block_size + 1:
            e_ids, e_mask = examples[pool[int(torch.randint(len(pool), (1,), generator=generator))]]
            ids, mask, seg = ids + e_ids, mask + e_mask, seg + [len(seg) and seg[-1] + 1] * len(e_ids)
        rows.append((ids[:block_size + 1], mask[:block_size + 1]))
        segments[b] = torch.tensor(seg[:block_size])
    return rows, segments
