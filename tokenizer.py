"""
One interface over five tokenizers:

    byte   the 256 UTF-8 byte values                          (lossless, vocab 257 with EOT)
    char   the characters of a corpus (nanoGPT's shakespeare_char)
    word   lower-cased words and single punctuation marks, the most frequent N of a corpus
    gpt2   GPT-2's BPE through tiktoken (50,257 ids)
    bpe    our own byte-level BPE trained on a corpus by train_bpe(); its merges are stored as
           tiktoken ranks, so encoding runs in tiktoken's fast core exactly like GPT-2's

    tok.encode(text) -> list[int]     plain text: the string '<|endoftext|>' is NOT special here
    tok.encode_special(text)          ... and here it is (each special token's name its id)
    tok.encode_batch(texts)
    tok.decode(ids) -> str            special ids decode to their names, e.g. '<|endoftext|>'
    tok.decode_bytes(ids) -> bytes    the same as bytes (a token may be part of a character)
    tok.vocab_size                    ids the tokenizer can produce (a model may pad beyond it)
    tok.eot_id                        the end-of-text id that separates documents
    tok.spec() -> dict                everything needed to rebuild it offline
    tokenizer_from_spec(spec)         ... and the rebuild
    build_tokenizer(kind, ...)        a new tokenizer of a kind, trained on texts where needed

Regular tokens take ids 0..n_base-1; special tokens (EOT first) follow them, so special
tokens added later (the chat template) never move an existing id.

The chat template (with_chat_tokens adds its three special tokens to any tokenizer):

    <|endoftext|><|user|>{prompt}<|end|><|assistant|>{response}<|end|>

tok.encode_chat(prompt, response) gives the ids and a mask that is True on the response and
its closing <|end|>, the tokens a fine-tuned model is trained to produce.
"""

import base64
import heapq
import re
import sys
from collections import Counter, defaultdict

import regex

from runlog import progress

EOT = '<|endoftext|>'
CHAT_TOKENS = {'user': '<|user|>', 'assistant': '<|assistant|>', 'end': '<|end|>'}


class Tokenizer:
    kind = None
    n_base = 0                       # number of regular (non-special) ids

    def __init__(self, special_tokens=None):
        self.special_tokens = dict(special_tokens or {EOT: self.n_base})
        self.special_names = {i: s for s, i in self.special_tokens.items()}
        self.chat = None                 # the chat template's token names, once added

    @property
    def eot_id(self):
        return self.special_tokens[EOT]

    @property
    def vocab_size(self):
        return max(self.n_base, max(self.special_tokens.values()) + 1)

    def encode(self, text):
        raise NotImplementedError

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def encode_special(self, text):
        """encode, with each special token's name in the text read as its id (the inverse of
        decode): what a server's /tokenize gives a client that names the end-of-text token."""
        names = '|'.join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True)))
        parts = re.split(f'({names})', text)              # text, name, text, name, ..., text
        return [i for k, part in enumerate(parts) if part
                for i in ([self.special_tokens[part]] if k % 2 else self.encode(part))]

    def _decode_base(self, ids):
        raise NotImplementedError

    def decode(self, ids):
        """Regular ids are decoded in runs; each special id becomes its name."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self.special_names:
                if run:
                    out.append(self._decode_base(run))
                    run = []
                out.append(self.special_names[i])
            elif 0 <= i < self.n_base:
                run.append(i)
            else:
                raise ValueError(f'token id {i} is outside this {self.kind} tokenizer '
                                 f'(vocab_size {self.vocab_size})')
        if run:
            out.append(self._decode_base(run))
        return ''.join(out)

    def decode_bytes(self, ids):
        """The bytes the ids stand for (a byte-level token may be part of a character, which
        decode shows as U+FFFD); each special id its name's."""
        return self.decode(ids).encode('utf-8')

    def spec(self):
        spec = {'kind': self.kind, 'special_tokens': dict(self.special_tokens), **self._spec()}
        if self.chat:
            spec['chat'] = dict(self.chat)
        return spec

    # --- the chat template ---------------------------------------------------------------
    def chat_id(self, role):
        if not self.chat:
            raise ValueError('this tokenizer has no chat template; use with_chat_tokens(tok)')
        return self.special_tokens[self.chat[role]]

    def encode_chat(self, prompt, response=None, ended=True, messages=None):
        """(ids, loss_mask) for EOT <|user|> prompt <|end|> <|assistant|> [response <|end|>].
        Without a response the ids end at <|assistant|>: a prompt for generation. The mask is
        True exactly on the response tokens and the closing <|end|> (left out when the response
        did not end, e.g. a sample cut at its length limit). messages: a whole conversation before
        the response instead ([{'role', 'content'}], ending with the user turn), as
        encode_messages writes it."""
        ids = self.encode_messages(messages) if messages else \
            [self.eot_id, self.chat_id('user')] + self.encode(prompt) + [self.chat_id('end'), self.chat_id('assistant')]
        mask = [False] * len(ids)
        if response is not None:
            r = self.encode(response) + ([self.chat_id('end')] if ended else [])
            ids, mask = ids + r, mask + [True] * len(r)
        return ids, mask

    def encode_messages(self, messages):
        """A conversation ([{'role': 'system' | 'user' | 'assistant', 'content': str}, ...], ending
        with a user turn) as a prompt for the next assistant turn, in the template of encode_chat:
        EOT <|user|> u1 <|end|> <|assistant|> a1 <|end|> <|user|> u2 <|end|> <|assistant|>. A system
        message has no turn of its own in the template: its text leads the first user turn."""
        system = ' '.join(m['content'] for m in messages if m['role'] == 'system')
        turns = [m for m in messages if m['role'] != 'system']
        if not turns or turns[-1]['role'] != 'user':
            raise ValueError('the conversation must end with a user message')
        ids = [self.eot_id]
        for m in turns:
            if m['role'] not in ('user', 'assistant'):
                raise ValueError(f"role {m['role']!r}; valid: system, user, assistant")
            text = m['content']
            if system and m['role'] == 'user':    # the first user turn, wherever it stands
                text, system = f"{system}\n\n{text}", ''
            ids += [self.chat_id(m['role'])] + self.encode(text) + [self.chat_id('end')]
        return ids + [self.chat_id('assistant')]

    def stop_ids(self):
        """Token ids that end a generated response: <|end|> (with a chat template) and EOT."""
        return ([self.chat_id('end')] if self.chat else []) + [self.eot_id]

    def _spec(self):
        return {}

    def __repr__(self):
        return f'<{self.kind} tokenizer, vocab_size {self.vocab_size}, eot {self.eot_id}>'


# -----------------------------------------------------------------------------

class ByteTokenizer(Tokenizer):
    """id = the UTF-8 byte value. Never fails, never loses anything; sequences are long."""
    kind = 'byte'
    n_base = 256

    def encode(self, text):
        return list(text.encode('utf-8'))

    def _decode_base(self, ids):
        return bytes(ids).decode('utf-8', errors='replace')

    def decode_bytes(self, ids):
        return b''.join(self.special_names[i].encode() if i in self.special_names else bytes([i])
                        for i in map(int, ids))


class CharTokenizer(Tokenizer):
    """id = the index of the character in the sorted set of a corpus's characters."""
    kind = 'char'

    def __init__(self, chars, special_tokens=None):
        self.chars = ''.join(chars)
        if len(set(self.chars)) != len(self.chars):
            raise ValueError('char tokenizer: the character list has duplicates')
        self.n_base = len(self.chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        super().__init__(special_tokens)

    @classmethod
    def train(cls, texts):
        return cls(sorted(set(''.join(texts))))

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            missing = sorted(set(text) - set(self.stoi))
            raise ValueError(f'char tokenizer: characters {missing!r} are not in its vocabulary of '
                             f'{self.n_base} characters') from None

    def _decode_base(self, ids):
        return ''.join(self.chars[i] for i in ids)

    def _spec(self):
        return {'chars': self.chars}


class WordTokenizer(Tokenizer):
    """Lower-cased words (letters and digits of any script, with inner apostrophes: "don't") and
    single punctuation marks.
    Words outside the vocabulary become '<unk>' (id 0). Lossy by design: case and spacing are
    normalised, so the round trip that holds is encode(decode(ids)) == ids, and
    decode(encode(text)) == text for text already in normal form."""
    kind = 'word'
    UNK = '<unk>'
    pattern = re.compile(r"<unk>|[^\W_]+(?:'[^\W_]+)*|[^\w\s]|_")   # words (any script), marks
    _no_space_before = set(".,!?;:)]}%…”’")
    _no_space_after = set("([{$“‘")
    _quotes = set('"\'')

    def __init__(self, words, special_tokens=None):
        self.words = list(words)
        if self.words[:1] != [self.UNK]:
            raise ValueError(f"word tokenizer: the word list must start with '{self.UNK}'")
        self.n_base = len(self.words)
        self.stoi = {w: i for i, w in enumerate(self.words)}
        super().__init__(special_tokens)

    @classmethod
    def split(cls, text):
        return cls.pattern.findall(text.lower())

    @classmethod
    def train(cls, texts, vocab_size):
        """The vocab_size - 2 most frequent tokens (ties by alphabet), plus <unk> and EOT."""
        if vocab_size < 3:
            raise ValueError(f'word tokenizer: vocab_size={vocab_size} must be at least 3')
        counts = Counter()
        for t in texts:
            counts.update(cls.split(t))
        counts.pop(cls.UNK, None)                # '<unk>' in the text (WikiText has it) is id 0 already
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size - 2]
        return cls([cls.UNK] + [w for w, _ in top])

    def encode(self, text):
        return [self.stoi.get(w, 0) for w in self.split(text)]

    def _decode_base(self, ids):
        out, open_quote = [], {q: False for q in self._quotes}
        prev = None
        for i in ids:
            w = self.words[i]
            space = prev is not None and prev not in self._no_space_after
            if w in self._no_space_before:
                space = False
            if w in self._quotes:                  # straight quotes alternate open / close
                if open_quote[w]:
                    space = False
                open_quote[w] = not open_quote[w]
            if prev in self._quotes and open_quote[prev]:
                space = False                      # just after an opening quote
            out.append((' ' if space else '') + w)
            prev = w
        return ''.join(out)

    def _spec(self):
        return {'words': self.words}


# -----------------------------------------------------------------------------
# BPE through tiktoken

# GPT-4's pre-tokenizer pattern (cl100k): contractions, letter runs, 1-3 digit numbers,
# punctuation runs, newlines, other whitespace. Our own BPE learns merges within these pieces.
BPE_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def ranks_to_bytes(ranks):
    """{token bytes: rank} -> tiktoken's rank-file format: 'base64(token) rank' per line."""
    return b''.join(base64.b64encode(t) + b' %d\n' % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def ranks_from_bytes(blob):
    ranks = {}
    for n, line in enumerate(blob.splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:         # (binascii.Error is one): a JSON vocab, a merges.txt, ...
                raise ValueError(f"not a tiktoken rank file (line {n}: {line[:60]!r}); each line is "
                                 f"'base64(token) rank', as in gpt2.tiktoken") from None
    return ranks


class BPETokenizer(Tokenizer):
    """Byte-level BPE run by tiktoken: GPT-2's ranks, or ranks trained by train_bpe()."""

    def __init__(self, kind, ranks_blob, pat_str, special_tokens=None):
        import tiktoken
        self.kind, self.ranks_blob, self.pat_str = kind, ranks_blob, pat_str
        ranks = ranks_from_bytes(ranks_blob)
        self.n_base = len(ranks)
        super().__init__(special_tokens)
        self.enc = tiktoken.Encoding(name=f'{kind}-{self.n_base}', pat_str=pat_str,
                                     mergeable_ranks=ranks, special_tokens=self.special_tokens)

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(list(texts))

    def checked(self, ids):
        """ids as ints, or ValueError naming the first one outside the vocabulary."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not (0 <= i < self.n_base or i in self.special_names)]
        if bad:
            raise ValueError(f'token id {bad[0]} is outside this {self.kind} tokenizer '
                             f'(vocab_size {self.vocab_size})')
        return ids

    def decode(self, ids):
        return self.enc.decode(self.checked(ids), errors='replace')

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(self.checked(ids))

    def _spec(self):
        return {'ranks': self.ranks_blob, 'pat_str': self.pat_str}


def gpt2_tokenizer(tokenizer_file=None, fallback_file=None):
    """GPT-2's BPE. With `tokenizer_file` (a tiktoken rank file such as gpt2.tiktoken) nothing is
    downloaded; otherwise tiktoken fetches the encoding once and we keep its ranks in the spec.
    fallback_file: a local rank file to read, saying so, when tiktoken's download fails."""
    from tiktoken_ext.openai_public import r50k_pat_str     # GPT-2's pre-tokenizer pattern
    if not tokenizer_file and fallback_file:
        import tiktoken
        try:
            tiktoken.get_encoding('gpt2')
        except Exception as e:
            print(f"tiktoken could not fetch the GPT-2 encoding ({type(e).__name__}); reading the local "
                  f"rank file {fallback_file} instead", file=sys.stderr)
            tokenizer_file = fallback_file
    if tokenizer_file:
        try:
            with open(tokenizer_file, 'rb') as f:
                blob = f.read()
        except OSError as e:
            raise ValueError(f"tokenizer_file='{tokenizer_file}': {e.strerror}") from None
    else:
        import tiktoken
        try:
            enc = tiktoken.get_encoding('gpt2')
        except Exception as e:
            raise RuntimeError(f'could not load the GPT-2 encoding from tiktoken ({type(e).__name__}: '
                               f'{e}); offline, pass tokenizer_file=PATH to a gpt2.tiktoken rank '
                               f'file') from None
        blob = ranks_to_bytes(enc._mergeable_ranks)
    try:
        tok = BPETokenizer('gpt2', blob, r50k_pat_str, {EOT: 50256})
    except ValueError as e:
        raise ValueError(f"tokenizer_file='{tokenizer_file}': {e}") from None
    if tok.n_base != 50256:
        raise ValueError(f'{tokenizer_file}: {tok.n_base} ranks, but GPT-2 has 50,256')
    return tok


def train_bpe(texts, vocab_size, pat_str=BPE_PATTERN, verbose=True):
    """Byte-level BPE training (Sennrich et al. 2016, on bytes as in GPT-2).

    1. Split the text into pieces with the pre-tokenizer pattern and count each distinct piece.
    2. Start from the 256 single bytes; count every adjacent pair of ids, weighted by piece count.
    3. Repeatedly merge the most frequent pair (ties: the smallest ids) into a new token, until
       the vocabulary (plus EOT) has `vocab_size` ids.
    The rank of a token is the order in which it was made, which is what tiktoken needs: it
    encodes by repeatedly merging the adjacent pair whose concatenation has the lowest rank.
    Returns {token bytes: rank}."""
    n_target = vocab_size - 1                                # one id is left for EOT
    if n_target < 256:
        raise ValueError(f'bpe: vocab_size={vocab_size} must be at least 257 (256 bytes + EOT)')
    pat = regex.compile(pat_str)
    piece_counts = Counter()
    for t in texts:
        piece_counts.update(pat.findall(t))
    words = [list(p.encode('utf-8')) for p in piece_counts]
    freqs = list(piece_counts.values())
    vocab = [bytes([i]) for i in range(256)]                 # id -> bytes
    ranks = {b: i for i, b in enumerate(vocab)}              # bytes -> id (= rank)
    pair_counts = defaultdict(int)                           # (a, b) -> weighted count
    where = defaultdict(set)                                 # (a, b) -> pieces that contain it
    for wi, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_counts[p] += freqs[wi]
            where[p].add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]         # max-heap by count, lazy deletion
    heapq.heapify(heap)
    bar = progress(total=n_target - 256, desc='training BPE', unit='merge', disable=not verbose)
    while len(vocab) < n_target and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or -neg <= 0:
            continue                                         # stale heap entry
        a, b = pair
        new_bytes = vocab[a] + vocab[b]
        if new_bytes in ranks:                               # made before by another merge path
            new_id = ranks[new_bytes]
        else:
            new_id = len(vocab)
            vocab.append(new_bytes)
            ranks[new_bytes] = new_id
            bar.update(1)
        changed = set()
        for wi in where.pop(pair):
            w, f = words[wi], freqs[wi]
            for p in zip(w, w[1:]):                          # take the piece's pairs out ...
                pair_counts[p] -= f
                changed.add(p)
            merged, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            words[wi] = merged
            for p in zip(merged, merged[1:]):                # ... and the merged piece's back in
                pair_counts[p] += f
                where[p].add(wi)
                changed.add(p)
        pair_counts.pop(pair, None)
        for p in changed:
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            elif p in pair_counts:
                del pair_counts[p]
    bar.close()
    if len(vocab) < n_target and verbose:
        print(f'train_bpe: the corpus ran out of pairs to merge at {len(vocab) + 1} ids '
              f'(asked for {vocab_size})')
    return ranks


def bpe_tokenizer(ranks, pat_str=BPE_PATTERN):
    return BPETokenizer('bpe', ranks_to_bytes(ranks), pat_str, {EOT: len(ranks)})


# -----------------------------------------------------------------------------

KINDS = ('gpt2', 'bpe', 'byte', 'char', 'word')


def tokenizer_settings_problem(kind, tokenizer_file, vocab_size_given):
    """What is wrong with a prepare script's tokenizer settings ('' if nothing): an unknown kind, or
    a setting that would do nothing for it, which is refused rather than ignored."""
    if kind not in KINDS:
        return f"tokenizer='{kind}'; valid: {', '.join(KINDS)}"
    if tokenizer_file and kind != 'gpt2':
        return f"tokenizer_file is GPT-2's rank file, for tokenizer='gpt2' only (not '{kind}')"
    if vocab_size_given and kind not in ('bpe', 'word'):
        return f"vocab_size is learned by the bpe and word tokenizers; tokenizer='{kind}' has a fixed one"
    return ''


def build_tokenizer(kind, texts=None, vocab_size=None, tokenizer_file=None, fallback_file=None):
    """A new tokenizer of `kind`; char, word and bpe are learned from `texts` (gpt2: see
    gpt2_tokenizer for the two files)."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer='{kind}'; valid: {', '.join(KINDS)}")
    if kind == 'gpt2':
        return gpt2_tokenizer(tokenizer_file, fallback_file)
    if kind == 'byte':
        return ByteTokenizer()
    if texts is None:
        raise ValueError(f'the {kind} tokenizer is learned from a corpus: pass texts')
    if kind == 'char':
        return CharTokenizer.train(texts)
    if kind == 'word':
        return WordTokenizer.train(texts, vocab_size or 8192)
    return bpe_tokenizer(train_bpe(texts, vocab_size or 4096))


def with_chat_tokens(tok):
    """The same tokenizer plus the chat template's special tokens <|user|>, <|assistant|>, <|end|>,
    given the next free ids after every existing one (for GPT-2 BPE: 50257-50259, inside the
    model's vocabulary padded to 50304), so existing ids and checkpoints stay valid."""
    spec = tok.spec()
    specials = dict(spec['special_tokens'])
    nxt = max(tok.vocab_size, max(specials.values()) + 1)
    for name in CHAT_TOKENS.values():
        if name not in specials:
            specials[name] = nxt
            nxt += 1
    return tokenizer_from_spec({**spec, 'special_tokens': specials, 'chat': dict(CHAT_TOKENS)})


def base_spec(spec):
    """A tokenizer spec without the chat template (its 'chat' field and its special tokens): what
    must agree between a pretrained model, its data and the models fine-tuned from it."""
    chat_names = set(CHAT_TOKENS.values())
    out = {k: v for k, v in spec.items() if k != 'chat'}
    out['special_tokens'] = {k: v for k, v in spec.get('special_tokens', {}).items() if k not in chat_names}
    return out


def tokenizer_from_spec(spec):
    """Rebuild a tokenizer from spec() output (from meta.json or a checkpoint), offline."""
    tok = _from_spec(spec)
    tok.chat = dict(spec['chat']) if spec.get('chat') else None
    return tok


def _from_spec(spec):
    kind, special = spec.get('kind'), spec.get('special_tokens')
    if kind == 'byte':
        return ByteTokenizer(special)
    if kind == 'char':
        return CharTokenizer(spec['chars'], special)
    if kind == 'word':
        return WordTokenizer(spec['words'], special)
    if kind in ('gpt2', 'bpe'):
        if 'ranks' not in spec:
            if kind == 'gpt2':
                tok = gpt2_tokenizer()
                return BPETokenizer('gpt2', tok.ranks_blob, tok.pat_str, special)
            raise ValueError('bpe tokenizer spec has no ranks')
        return BPETokenizer(kind, spec['ranks'], spec['pat_str'], special)
    raise ValueError(f"unknown tokenizer kind {kind!r} in spec; valid: {', '.join(KINDS)}")
