"""
Serving many requests at once: continuous batching over a paged KV cache.

    engine = Engine(model, n_blocks=256, tokens_per_block=16)        # cuda_graph=True: see below
    a = engine.add(prompt_ids, max_new_tokens=64)              # any time, also while others run
    for request, token, finished in engine.step(): ...          # one step of every running request
    engine.run()                                                # steps until every request is done

Continuous batching (Orca, Yu et al. 2022): at every step the requests that are waiting are
admitted as far as the cache has room, finished ones leave, and every running request adds its
next tokens: a chunk of at most prefill_chunk prompt tokens while its prompt is being read
(chunked prefill), then one token per step. Run eagerly, a step is at most two forward passes:
one over the rows reading a prompt chunk (left-padded to the longest chunk) and one over the rows
feeding one token, so that a decoding row is never padded to a chunk's width: in one pass, one new
128-token prompt beside 63 decoding rows is 64 x 128 positions (when the engine ran so, its steps
at 64 streams on an H200 averaged about 4.0 ms against static batching's 2.6: docs/performance.md).
(Rows that score their prompt, add(prompt_logprobs=k), run in a third pass of their own, eagerly:
they need every position's logits. They are outside what follows: their chunks share a budget of
their own, prefill_chunk tokens a step among them, and their scores are read back at once, a wait
for the device.)

Prompt tokens as rows (prompt_rows, the default in fixed shapes: below). Every token a step
feeds is a row of its own in one one-column pass: a decoding request's token, and each token of a
prompt chunk, at its own slot with its request's block table. The pass writes every row's new
entry into the pool before any row gathers its keys, so a chunk's token sees the ones before it:
attention as if the chunk were read in one row. (Not for dynamic NTK RoPE, whose angles follow a
row's longest new position: there the chunks keep passes of their own.) Why: on a GPU a small
model's pass is hundreds of small kernels whose time hardly depends on their size, so a prompt
chunk in a pass of its own costs a good part of the decode pass beside it, and in a closed loop
many steps read a new prompt (a request leaves, the next arrives alone); as rows it rides in the
pass that runs anyway. The price: each prompt-token row gathers all of its request's keys, where
a chunk's row gathers them once, and prefill_chunk bounds a step's prompt tokens in all (first
come, first served), not each prompt's, so a burst of new prompts is read over more steps. On an
H100, 64 streams of the default MoE, prefill_chunk 256: 19% more tokens/s with long-tailed output
lengths and 13% with uniform ones (2.24x and 1.42x static batching); the first token's p99, set by
the opening burst, 68-79 ms against 15 (docs/performance.md; experiments/serve_prompt_rows.sh).

The paged cache (vLLM, Kwon et al. 2023): one pool of fixed-size blocks per layer, and per request
a block table (its blocks, in order); a request holds blocks for its prompt plus max_new_tokens,
taken when it is admitted (so a running request never runs out) and given back when it finishes.
For MLA (DeepSeek-V2/V3) the pool holds what the absorbed attention reads, the compressed latent
and the shared RoPE key: kv_lora_rank + qk_rope_head_dim numbers per token and layer; for MHA/GQA
the keys and values. Attention reads a step's rows gathered from their blocks into (B, L) tensors:
the storage is paged, the attention itself is model.py's (PyTorch's scaled_dot_product_attention).

Prefix sharing (automatic prefix caching, as in vLLM): requests whose prompts begin alike (a system
prompt, a chat template's preamble) share the blocks of that prefix instead of computing and
storing them again. Only full blocks of prompt tokens are shared; a block is named by a hash of
(the previous block's hash, its token ids), so one name means one whole prefix, always at the same
positions from 0 (the same RoPE). The pool keeps a table name -> block and a reference count per
block. At admission a request walks its prompt block by block, takes every block already in the
table and prefills only the rest; when a request finishes its blocks' counts drop, and a named
block nobody holds stays cached (evictable, least recently used first) until a later request
reuses it or the pool needs a free block. A request only ever writes past what it reused, so a
shared block is never written: its partial last block and its generated tokens are its own.

Steps as CUDA graphs (cuda_graph=True). A small model's step is hundreds of small kernels, and
launching them from Python costs more than their work: for the default MoE model on an H200, about
30 tokens/s for one stream eagerly against about 470 when generate.py replays the same one-token
step as a CUDA graph (docs/performance.md). A graph replays fixed kernels on fixed memory, but an
engine step changes shape every time (B rows, T columns, L keys). So every step runs in fixed
shapes (StaticPagedCache): the rows padded to a bucket of 1, 2, 4, 8, ... or max_rows (max_batch,
plus prefill_chunk with prompt_rows), the columns to 1 (every row feeds one token: always with
prompt_rows) or, with prompt_rows=False, to a bucket of 8, 32, 128, ... (x4) or prefill_chunk (some
row reads a prompt chunk: each row left-padded as an eager step left-pads to its longest row),
every block table ceil(model block_size / tokens_per_block) blocks wide, so its keys
are always the same L slots (the empty ones masked), and the step's inputs (per row its tokens,
length, new-token count and block table, per column the block and offset its entries go to)
copied into one tensor made once per (rows, columns) bucket. Padding rows and padding columns
write to a scratch block that no request ever holds. On CUDA each bucket's step is captured once,
at its first use (generate.capture_graph; capture_graphs() captures the one-column buckets up front),
and replayed after; elsewhere the same static steps run eagerly (what the CPU tests check).
Sampling stays outside the graph, as in an eager step. With compile_step=True each static step is
first fused by torch.compile (its automatic dynamic shapes: a bucket its compiled code does not
cover compiles again; generate.py's compile_step does the same for its one-token step): the step's
many small elementwise and index kernels become fewer, larger ones.

Overlap (overlap=True; SGLang's overlap scheduler, vLLM's asynchronous scheduling). A step's tokens
are sampled on the device, and a decoding row's input at the next step is read there (feed -1 - i:
entry i of the last step's tokens), so nothing in a step waits for the device. With overlap the
host reads a step's tokens back only after it has queued the next step: it builds step n + 1's
inputs (pinned buffers, copied without waiting) while the device runs step n, and then waits for
step n's tokens alone. The price of reading one step late: a request that sampled its stop token
is fed once more (that token is dropped), its blocks and its batch row come back a step later, and
each token reaches its caller a step later. A request ending at max_new_tokens is known on the host
and never fed past its end.

The price is compute: attention over all L slots whatever the rows' lengths, and with
prompt_rows=False the prompt-chunk pass's rows padded to its column bucket (the decoding rows are
in their own one-column pass). The column buckets grow x4, so that a chunk is padded at most 4x
while the graphs stay few (rows buckets x column buckets) and short chunks (a prompt's last, a
short prompt) run in a small bucket. Run eagerly on a GPU, where each pass costs its launches, a
step with both kinds of rows costs about two decode steps; with graphs (what the scripts turn on
on CUDA) and prompt_rows the whole step is one replay. generate.py's static cache makes the same
trade, and its graph is still several times faster than eager decoding at batch 64 on a GPU; on a
CPU, where launches are cheap, the static steps are slower than eager ones (the scripts turn
cuda_graph on for CUDA only).

With greedy decoding a request's tokens are those of generate.generate_tokens run on it alone
(tests/test_engine.py): the padding and the other rows are masked out of its attention.
"""

import hashlib
import itertools
import numbers
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from generate import (DecodeGraphs, capture_graph, chosen_and_top_logprobs, graph_capturable, pad_prompts, penalize,
                      sample_next)
from model import attention_mask, rope_scaling_type


@dataclass
class Request:
    prompt: list                      # token ids
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = None
    top_p: float = None
    stop_ids: tuple = ()
    generator: torch.Generator = None
    id: int = 0
    frequency_penalty: float = 0.0    # OpenAI's penalties on repeated tokens (generate.penalize)
    presence_penalty: float = 0.0
    counts: torch.Tensor = None       # with a penalty: (V,) uses of each token in its output, on the device
    logprobs: int = None              # k: record each new token's log-probability and the k most likely
    token_logprobs: list = field(default_factory=list)   # then, per output token: (logprob, [(id, logprob)] * k)
    prompt_logprobs: int = None       # k: also score the prompt's own tokens as its prefill reads them
    prompt_scores: list = field(default_factory=list)    # then, for prompt[1:]: (logprob, [(id, logprob)] * k)
    blocks: list = field(default_factory=list)   # its block table
    length: int = 0                   # tokens in the cache
    pending: list = field(default_factory=list)  # the prompt's tokens still to read
    output: list = field(default_factory=list)   # generated tokens
    done: bool = False
    hashes: list = field(default_factory=list)   # names of its prompt's full blocks (prefix sharing)
    n_named: int = 0                  # its leading blocks already reused or registered in the table
    src: int = 0                      # its entry of the last step's sampled tokens (on the device)
    in_flight: int = 0                # tokens sampled for it whose value the host has not read yet
    table_row: torch.Tensor = None    # its block table padded to the static steps' width, on the host
                                      # (made once: a request's blocks do not change while it runs)


class PagedCache:
    """The model-facing side of the paged pool for one step (the interface of generate.KVCache):
    begin(T) gives the positions and the mask of the step's (B, T) left-padded new tokens,
    update(layer, name, x, dim) writes the real new entries into their blocks and returns every
    row's entries gathered to (B, L), end() advances each request's length."""

    def __init__(self, pool, rows, n_new, device):
        self.pool, self.rows, self.n_new, self.device = pool, rows, n_new, device

    def begin(self, T):
        bs, dev = self.pool.tokens_per_block, self.device
        # everything about the rows is known on the host: build it there and copy each tensor once
        # (no per-row copies, no device-to-host reads in the step)
        lengths = [r.length for r in self.rows]
        L = max(s + n for s, n in zip(lengths, self.n_new))
        table = torch.tensor(self.tables(self.rows, max(len(r.blocks) for r in self.rows)), device=dev)
        # row b's i-th new token (column T - k + i of the step) goes to its slot s0 + i: pool row
        # block x tokens_per_block + offset (see update)
        write = [(r.blocks[(s0 + i) // bs] * bs + (s0 + i) % bs, b, T - k + i)
                 for b, (r, s0, k) in enumerate(zip(self.rows, lengths, self.n_new)) for i in range(k)]
        self.write = tuple(torch.tensor(col, device=dev) for col in zip(*write))
        return self.plan(torch.tensor(lengths, device=dev), torch.tensor(self.n_new, device=dev), T, L, table)

    def tables(self, rows, width):
        """The rows' block tables as lists `width` long: past its own blocks a row points at the
        scratch block (its keys there are masked out)."""
        return [r.blocks + [self.pool.scratch] * (width - len(r.blocks)) for r in rows]

    def plan(self, start, n, T, L, table):
        """The step from device tensors alone (so the static step below shares it): start (B,)
        tokens each row has cached, n (B,) its new ones, the last n of the T columns (the ones
        before are left padding), table (B, W) its blocks, L <= W tokens_per_block keys in view.
        Returns (positions, mask) for the layers; keeps in self.read where the keys come from."""
        B, bs, dev = start.size(0), self.pool.tokens_per_block, start.device
        cols = torch.arange(T, device=dev)
        real = cols[None, :] >= T - n[:, None]                                   # (B, T), left-padded
        q_pos = start[:, None] + cols[None, :] - (T - n[:, None])                # (B, T); < start on padding
        slots = torch.arange(L, device=dev)
        k_pos = slots[None, :].expand(B, L).masked_fill(slots >= (start + n)[:, None], -1)   # (B, L); -1: empty
        c = self.pool.config
        allowed = attention_mask(q_pos.masked_fill(~real, -1), k_pos, c.sliding_window, c.n_sink_tokens)
        allowed[:, :, 0] |= ~real                     # a padding query sees one key, not none (no NaN)
        # key s of a row is at (its block s // bs, offset s % bs): pool row block x bs + offset (update)
        self.read = table[:, slots // bs] * bs + slots % bs                     # (B, L)
        return q_pos.clamp(min=0), (allowed[:, None], False)

    def update(self, layer, name, x, dim):
        """Write the step's new entries x (T along dim) into their slots, return every row's L
        entries. The pool (blocks, tokens_per_block, ...) is read and written as rows, slot o of
        block k being row k x tokens_per_block + o: one flat index each way (indexing with a
        (block, offset) pair of index tensors took PyTorch's elementwise index kernel, 16 us a
        gather on an H100: docs/performance.md)."""
        x = x.movedim(dim, 1)                                                    # (B, T, ...)
        rows = self.pool.tensor(layer, name, x).flatten(0, 1)                    # (blocks x bs, ...)
        dest, b, t = self.write
        new = x.flatten(0, 1) if b is None else x[b, t]        # the new entries in dest's order
        rows.index_copy_(0, dest, new.to(rows.dtype))
        return rows[self.read].to(x.dtype).movedim(1, dim)                      # (B, L, ...) -> x's layout

    def end(self):
        for r, n in zip(self.rows, self.n_new):
            r.length += n


class StaticPagedCache(PagedCache):
    """A step of up to Bb rows, each feeding up to Tb tokens, in shapes that never change, so that
    it can be a CUDA graph: Bb rows (the step's, then padding) of Tb columns (each row left-padded,
    as the eager step left-pads to its longest row), block tables `width` blocks wide (enough for
    the model's block_size), so L = width x tokens_per_block keys, the empty ones masked. Tb = 1 is a
    step in which every row feeds one token (a decoding request's, or with prompt_rows one of a
    prompt's: fill's starts); Tb > 1 a step in which some row reads a prompt chunk. What changes from step to
    step lives in one device tensor made once and filled in place by fill(rows, feed) (built on the
    host, one copy): begin() and update() run the same kernels on the same memory at every step,
    and a graph captured once replays them. A padding row has length 0, no new tokens and every
    block of its table is the pool's scratch block; every padding column (of any row) writes its
    entries to the scratch block, never into a block a request holds. A padding query sees one
    key (plan(): no NaN), and its output is never read."""

    def __init__(self, pool, Bb, Tb, width, device):
        super().__init__(pool, [], [], device)
        self.Bb, self.Tb, self.width, self.L = Bb, Tb, width, width * pool.tokens_per_block
        # per row: its Tb tokens (left-padded), its length (tokens cached; for a prompt-token row of
        # token_rows, that token's own slot), its n new tokens, its block table, then per column the
        # block and the offset its entries go to (every column is written, the padding ones to the
        # scratch block, so update() needs no mask; begin() makes them one flat write index):
        # (Bb, Tb + 2 + width + 2 Tb), and views of its columns
        self.inputs = torch.zeros(Bb, 3 * Tb + 2 + width, dtype=torch.long, device=device)
        self.tokens, self.length, self.n, self.table, self.block, self.offset = self.columns(self.inputs)
        # where fill() builds them on the host: pinned on CUDA, so that the copy does not wait for
        # the device; two, used in turns, so that a copy still pending is never overwritten (the
        # engine reads every step's tokens back, waiting for that step, before the one after next;
        # a capture's padding-only fill takes a turn too, safely: torch.cuda.graph waits for the
        # device before it captures)
        pinned = torch.device(device).type == 'cuda'
        self.staging = [torch.zeros(self.inputs.shape, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.turn = 0
        self.graph = self.logits = self.signature = None               # its CUDA graph, once captured

    def columns(self, inputs):
        """Views of an inputs-shaped tensor: tokens (Bb, Tb), length (Bb,), n (Bb,), table
        (Bb, width), block (Bb, Tb), offset (Bb, Tb)."""
        Tb, W = self.Tb, self.width
        return (inputs[:, :Tb], inputs[:, Tb], inputs[:, Tb + 1], inputs[:, Tb + 2:Tb + 2 + W],
                inputs[:, Tb + 2 + W:2 * Tb + 2 + W], inputs[:, 2 * Tb + 2 + W:])

    def fill(self, rows, feed=(), last=None, starts=None):
        """Make the next step that of `rows`, row b feeding the tokens feed[b] (at most Tb) from
        slot starts[b] on (default rows[b].length; a request may be several rows of a one-column
        step, each feeding one of its prompt tokens from its own slot: Engine.token_rows), a token
        -1 - i standing for entry i of `last`, the tokens the step before sampled, on the device;
        with rows = [] every row is padding (what warm-up and capture steps run: they write only the
        scratch block). Built on the host with a few vectorised ops (a per-element Python list of
        Bb x 3 Tb numbers would cost milliseconds at Bb = 64, Tb = 256), then copied to the device
        at once."""
        bs, s, Tb, B = self.pool.tokens_per_block, self.pool.scratch, self.Tb, len(rows)
        host = self.staging[self.turn].zero_()
        self.turn ^= 1
        tokens, length, n, table, block, offset = self.columns(host)
        table.fill_(s)
        if rows:
            if Tb == 1:                                    # a decode pass: one token a row
                tokens[:B, 0] = torch.tensor([f[0] for f in feed])
            else:    # row b's tokens in its last len(feed[b]) columns (left padding: token 0 before them)
                at = [(b, Tb - len(f) + i) for b, f in enumerate(feed) for i in range(len(f))]
                tokens[tuple(torch.tensor(at).T)] = torch.tensor([t for f in feed for t in f])
            length[:B] = torch.tensor([r.length for r in rows] if starts is None else starts)
            n[:B] = torch.tensor([len(f) for f in feed])
            for r in rows:
                if r.table_row is None:
                    r.table_row = torch.tensor(self.tables([r], self.width)[0])
            table[:B] = torch.stack([r.table_row for r in rows])
        # column t of row b holds new token t - (Tb - n) (when >= 0), at slot length + t - (Tb - n)
        slot = length[:, None] + torch.arange(Tb)[None, :] - (Tb - n[:, None])      # (Bb, Tb)
        real = slot >= length[:, None]
        block.copy_(torch.where(real, table.gather(1, slot.clamp(min=0) // bs), s))
        offset.copy_(torch.where(real, slot % bs, 0))
        self.inputs.copy_(host, non_blocking=True)
        if any(f[-1] < 0 for f in feed):
            take_sampled(self.tokens[:, -1], last)
        self.rows, self.n_new = rows, [len(f) for f in feed]          # for end()

    def begin(self, T):
        assert T == self.Tb
        # every column written, row b's column t from x's entry b x Tb + t (update: b, t None)
        self.write = ((self.block * self.pool.tokens_per_block + self.offset).flatten(), None, None)
        return self.plan(self.length, self.n, T, self.L, self.table)


def take_sampled(column, last):
    """A step's last input column, on the device: an entry -1 - i (a decoding row, whose input is
    the token sampled for entry i of the step before) becomes last[i], in place; the others stay."""
    column.copy_(torch.where(column < 0, last[(-1 - column).clamp(min=0)], column))


def cache_numbers_per_token(config):
    """Numbers the cache holds per token, over all layers: MLA n_layer (kv_lora_rank +
    qk_rope_head_dim), the compressed latent and the shared RoPE key; MHA/GQA n_layer 2 Hkv D."""
    if config.attention == 'mla':
        return config.n_layer * (config.kv_lora_rank + config.qk_rope_head_dim)
    return config.n_layer * 2 * config.kv_heads * config.qk_head_dim


def block_hashes(tokens, tokens_per_block):
    """The names of the full blocks of `tokens`: block i's is a hash of (block i-1's name, its
    tokens_per_block token ids), so it stands for the whole prefix tokens[:(i + 1) tokens_per_block].
    A cryptographic hash (blake2b, 128 bits): two different prefixes never share a name in practice,
    which sharing needs to be exact."""
    names, prev = [], b''
    for i in range(len(tokens) // tokens_per_block):
        chunk = tokens[i * tokens_per_block:(i + 1) * tokens_per_block]
        prev = hashlib.blake2b(prev + b'|' + ','.join(map(str, chunk)).encode(), digest_size=16).digest()
        names.append(prev)
    return names


class BlockPool:
    """n_blocks blocks of tokens_per_block tokens for every (layer, name) the model caches; the pools
    are made at the first write, in the dtype and device of what is written. Each pool has one
    block more, the scratch block (number n_blocks), which take() never hands out: the padding of
    a block table points there, and the padding rows of a static decode step write there.

    Every block is in one of three states: free (holds nothing of use), held (ref[b] > 0 requests
    have it in their block table), or cached (nobody holds it, but it holds a full prefix block
    named in `cached`, so a later request may reuse it; evicted, least recently released first,
    when take() finds no free block)."""

    def __init__(self, config, n_blocks, tokens_per_block):
        self.config, self.n_blocks, self.tokens_per_block = config, n_blocks, tokens_per_block
        self.scratch = n_blocks                    # the extra block, outside every count below
        self.free = list(range(n_blocks - 1, -1, -1))
        self.tensors = {}
        self.ref = [0] * n_blocks                  # requests holding each block
        self.cached = {}                           # name -> block holding that full prefix block
        self.name = {}                             # block -> its name, for the blocks in `cached`
        self.evictable = OrderedDict()             # cached blocks nobody holds, least recently used first

    def tensor(self, layer, name, x):
        key = (layer, name)
        if key not in self.tensors:
            self.tensors[key] = torch.zeros(self.n_blocks + 1, self.tokens_per_block, *x.shape[2:], dtype=x.dtype,
                                            device=x.device)                # + the scratch block
        return self.tensors[key]

    def available(self):
        """Blocks take() can hand out: the free ones and the cached ones nobody holds."""
        return len(self.free) + len(self.evictable)

    def take(self, n):
        """n blocks for one request to write: free ones first, then the least recently used cached
        ones, whose names leave the table (their content is about to be overwritten)."""
        blocks = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:
                b, _ = self.evictable.popitem(last=False)
                del self.cached[self.name.pop(b)]
            self.ref[b] = 1
            blocks.append(b)
        return blocks

    def lookup(self, names):
        """The blocks holding the longest prefix of `names` that the table knows (walked from the
        first block: a block is only of use after all the blocks before it)."""
        blocks = []
        for h in names:
            if h not in self.cached:
                break
            blocks.append(self.cached[h])
        return blocks

    def share(self, blocks):
        """One more request holds these (cached) blocks; ones nobody held stop being evictable."""
        for b in blocks:
            self.ref[b] += 1
            self.evictable.pop(b, None)

    def register(self, block, h):
        """`block` now holds the full prompt block named h (computed, and never written again):
        later requests may reuse it. If another block already holds that prefix (two requests
        computed it at once, or a fully cached prompt recomputed its last block), keep that one;
        this block stays its request's own and is freed with it."""
        if h not in self.cached:
            self.cached[h], self.name[block] = block, h

    def forget(self):
        """Drop every name (e.g. the model's weights changed, so what the blocks hold is stale):
        cached blocks nobody holds become free; held ones are freed with their requests."""
        self.free.extend(reversed(self.evictable))
        self.evictable.clear()
        self.cached.clear()
        self.name.clear()

    def give_back(self, blocks):
        """A request lets go of its blocks. One nobody holds any more becomes free, or, if it holds
        a named prefix block, cached and evictable. Released last block first, so that a prefix's
        tail is evicted before its head (a tail is of no use without its head)."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.name:
                    self.evictable[b] = None           # most recently used end
                else:
                    self.free.append(b)

    def numbers_per_token(self):
        """Numbers cached per token, over all layers (e.g. n_layer (kv_lora_rank + qk_rope_head_dim)
        for MLA): the pools' sizes per block slot."""
        return sum(t[0, 0].numel() for t in self.tensors.values())


def static_forward(model, cache):
    """A fixed-shape step's pass: (Bb, 1, V) logits of each row's last column (StaticPagedCache)."""
    return model(cache.tokens, cache=cache, last_only=True)[0]


class Engine:

    def __init__(self, model, n_blocks=256, tokens_per_block=16, max_batch=64, prefill_chunk=128, vocab_limit=None,
                 prefix_sharing=True, cuda_graph=False, overlap=False, compile_step=False, prompt_rows=None):
        """model: a GPT in eval mode (its device and dtype are the engine's). n_blocks x tokens_per_block
        tokens of cache in all; at most max_batch requests run at once; a prompt is read in chunks
        of prefill_chunk tokens, one chunk per step, beside the other requests' decoding (with
        prompt_rows: prefill_chunk prompt tokens a step in all).
        vocab_limit: the tokenizer's vocabulary (ids past it, the model's padding, are never sampled).
        prefix_sharing: reuse the cached blocks of prompt prefixes seen before (see the top).
        cuda_graph: steps in fixed shapes (all but the prompt-scoring pass), each bucket's step a
        CUDA graph on CUDA (see the top; on the CPU the same steps run eagerly).
        overlap: read each step's tokens back one step late, so that the host prepares the next step
        while the device runs this one (see the top).
        compile_step (with cuda_graph): each fixed-shape step through torch.compile before it is
        captured (see the top); a compilation costs seconds to tens of seconds.
        prompt_rows (with cuda_graph): prompt tokens ride in the one-token pass as rows of their
        own, prefill_chunk of them a step in all (see the top); False: each step's prompt chunks
        in a pass of their own; None: on with cuda_graph, except for dynamic NTK RoPE and on a GPU
        where a graph cannot hold max_batch + prefill_chunk rows (generate.graph_capturable)."""
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.vocab_limit, self.prefix_sharing, self.cuda_graph = vocab_limit, prefix_sharing, cuda_graph
        self.overlap = overlap
        if compile_step and not cuda_graph:
            raise ValueError('compile_step fuses the fixed-shape steps: it needs cuda_graph=True')
        dynamic = rope_scaling_type(model.config) == 'dynamic'
        if prompt_rows and (not cuda_graph or dynamic):
            raise ValueError('prompt_rows puts prompt tokens in the fixed-shape one-token pass: it needs '
                             'cuda_graph=True, and a RoPE other than dynamic NTK (whose angles follow a '
                             "chunk's longest position, not each token's own)")
        for name, n in (('n_blocks', n_blocks), ('tokens_per_block', tokens_per_block), ('max_batch', max_batch),
                        ('prefill_chunk', prefill_chunk)):
            if not (isinstance(n, int) and n >= 1):
                raise ValueError(f'{name}={n!r} must be a whole number >= 1')
        self.static_forward = torch.compile(static_forward) if compile_step else static_forward
        if compile_step:     # the buckets may need more recompilations than dynamo's default limit, 8
            name = 'recompile_limit' if hasattr(torch._dynamo.config, 'recompile_limit') else 'cache_size_limit'
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))   # (torch < 2.7)
        self.pool = BlockPool(model.config, n_blocks, tokens_per_block)
        self.device = next(model.parameters()).device
        self.waiting, self.running = [], []
        self.ids = itertools.count()
        self.width = -(-model.config.block_size // tokens_per_block)   # blocks in the longest request (the context)
        # the columns a step is padded to (cuda_graph): 1 (decode), then 8, 32, 128, ... (x4) below
        # prefill_chunk, then prefill_chunk itself; e.g. (1, 8, 32, 128, 256) for prefill_chunk 256
        self.token_buckets = tuple(sorted({1, prefill_chunk} | {8 * 4 ** i for i in range(8)
                                                                 if 8 * 4 ** i < prefill_chunk}))
        # prompt tokens as rows of the one-token pass (token_rows; see the top), up to prefill_chunk
        # of them a step beside max_batch decoding rows
        # (by default not where a graph could not hold the largest bucket: the MoE loop on a GPU
        # without grouped_mm would run those steps eagerly, their decoding rows with them)
        self.prompt_rows = prompt_rows if prompt_rows is not None else cuda_graph and not dynamic and (
            self.device.type != 'cuda' or graph_capturable(model, max_batch + prefill_chunk))
        self.max_rows = max_batch + (prefill_chunk if self.prompt_rows else 0)
        self.static = {}                   # (rows, columns) bucket -> its StaticPagedCache (and CUDA graph)
        self.params = list(model.parameters())   # what a captured step reads, listed once
        self.last_tokens = None            # the tokens the last step sampled, on the device
        self.unread_step = None            # with overlap: the launched step not read back yet
        pinned = self.device.type == 'cuda'
        self.token_buffers = [torch.zeros(max_batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.turn = 0
        # prompt_tokens: of admitted requests; reused_tokens: of those, read from shared blocks;
        # prefill_tokens: prompt tokens run through the model; decode_tokens: generated tokens fed back;
        # steps: steps that ran the model (each one or two passes, see the top);
        # eager_steps: forward passes run in their own shapes (PagedCache; a step is one or two
        # passes, see the top); static_steps: passes in fixed shapes (cuda_graph),
        # static_prefill_steps: those of them with a prompt chunk (columns > 1), prompt_row_steps:
        # those with prompt tokens as rows of a one-column pass (token_rows);
        # graph_captures: CUDA graphs captured; cancelled: requests stopped early (cancel())
        self.stats = dict(requests=0, prompt_tokens=0, reused_tokens=0, prefill_tokens=0, decode_tokens=0, steps=0,
                          eager_steps=0, static_steps=0, static_prefill_steps=0, prompt_row_steps=0,
                          graph_captures=0, cancelled=0)

    def hit_rate(self):
        """The share of admitted prompt tokens that were reused rather than computed."""
        return self.stats['reused_tokens'] / max(1, self.stats['prompt_tokens'])

    def forget_prefixes(self):
        """Reuse nothing computed so far (call it after changing the model's weights). A request
        still reading its prompt names none of its later blocks either: they are computed on top of
        blocks of the old weights."""
        self.pool.forget()
        for r in self.running:
            r.n_named = len(r.hashes)

    def blocks_for(self, n_tokens):
        return -(-n_tokens // self.pool.tokens_per_block)

    def add(self, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=(), seed=None,
            frequency_penalty=0.0, presence_penalty=0.0, logprobs=None, prompt_logprobs=None):
        """Queue a request (prompt: token ids); returns it (request.output fills as it runs).
        logprobs=k: request.token_logprobs also gets each new token's log-probability and the k
        most likely tokens' (generate.chosen_and_top_logprobs: the model's distribution, before
        sampling reshapes it). prompt_logprobs=k: request.prompt_scores gets the same for each prompt token
        after the first, given the ones before it, from the prefill's own forward passes (as
        generate.prompt_logprobs scores a text: what an evaluation harness asks of a server), all
        of them by the time its first token comes; such a request reads its whole prompt (no cached
        prefix). Refused by name if it could never fit: past the model's block_size, or more
        blocks than the pool has."""
        if not prompt or max_new_tokens < 1:
            raise ValueError('a request needs at least one prompt token and max_new_tokens >= 1')
        V = self.model.config.vocab_size
        bad = [t for t in prompt if not (isinstance(t, numbers.Integral) and 0 <= t < V)]
        if bad:           # (a negative id would be read as a pointer to the last step's tokens: fill)
            raise ValueError(f'prompt token ids must be whole numbers in 0..{V - 1}; got {bad[:5]}')
        for name, k in (('logprobs', logprobs), ('prompt_logprobs', prompt_logprobs)):
            if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
                raise ValueError(f'{name}={k!r} must be None or a whole number >= 0')
        total = len(prompt) + max_new_tokens
        if total > self.model.config.block_size:
            raise ValueError(f'prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the '
                             f"model's block_size {self.model.config.block_size}")
        if self.blocks_for(total) > self.pool.n_blocks:
            raise ValueError(f'{total} tokens need {self.blocks_for(total)} blocks; the pool has {self.pool.n_blocks}')
        g = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        r = Request(prompt=list(prompt), max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, stop_ids=tuple(stop_ids), generator=g, id=next(self.ids),
                    frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs)
        if frequency_penalty or presence_penalty:
            r.counts = torch.zeros(self.model.config.vocab_size, device=self.device)
        r.pending = list(prompt)
        if self.prefix_sharing:
            r.hashes = block_hashes(r.prompt, self.pool.tokens_per_block)
        self.waiting.append(r)
        return r

    def admit(self):
        """Waiting requests, first come first served, while a batch row and their blocks are free;
        one that does not fit waits (and the ones behind it wait too, so none starves).
        With prefix sharing a request first reuses the cached blocks of its prompt's longest known
        prefix, and takes new blocks only for the rest."""
        bs = self.pool.tokens_per_block
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]                                 # (change the pick here: r leaves waiting below)
            need = self.blocks_for(len(r.prompt) + r.max_new_tokens)
            # reuse at most the blocks wholly inside prompt[:-1]: the last prompt token is always
            # computed, for the logits of the first new token (so a prompt made only of cached
            # blocks recomputes its last block, into a block of its own)
            # (a request that scores its prompt reuses none: its scores come from reading every token)
            reused = [] if r.prompt_logprobs is not None else self.pool.lookup(r.hashes[:(len(r.prompt) - 1) // bs])
            idle = sum(self.pool.ref[b] == 0 for b in reused)    # cached blocks this request revives
            if need - len(reused) > self.pool.available() - idle:
                break
            self.pool.share(reused)                             # before take(), which may evict
            r.blocks = reused + self.pool.take(need - len(reused))
            r.length = len(reused) * bs                         # the reused prefix counts as cached
            r.n_named = len(reused)
            r.pending = r.prompt[r.length:]
            self.stats['requests'] += 1
            self.stats['prompt_tokens'] += len(r.prompt)
            self.stats['reused_tokens'] += r.length
            self.waiting.remove(r)
            self.running.append(r)

    def register_prompt_blocks(self, r):
        """Name r's full prompt blocks computed so far, so that later requests may reuse them.
        Only prompt blocks, and only once wholly written: r never writes below r.length again."""
        while r.n_named < len(r.hashes) and (r.n_named + 1) * self.pool.tokens_per_block <= r.length:
            self.pool.register(r.blocks[r.n_named], r.hashes[r.n_named])
            r.n_named += 1

    @torch.no_grad()
    def step(self):
        """One step: every running request that needs one feeds its next tokens through the model
        (a prompt chunk, or the token it sampled last), and those whose prompt is read sample their
        next token, on the device. Returns [(request, new token or None, finished)] for the tokens
        read back to the host in this call: this step's, or with overlap the step before's (None:
        a prompt chunk was read and more of the prompt is left)."""
        self.admit()
        # a request needs a step while its prompt is being read, or while the tokens it has (read
        # back or still on the device) are fewer than max_new_tokens and it has not stopped
        rows = [r for r in self.running if r.pending or (not r.done and len(r.output) + r.in_flight < r.max_new_tokens)]
        launched = self.launch(rows) if rows else None
        if not self.overlap:
            return self.read_back(launched) if launched else []
        before, self.unread_step = self.unread_step, launched
        return self.read_back(before) if before else []

    def launch(self, rows):
        """Queue the forward passes of `rows` and their sampling on the device (no wait for the
        device here, on CUDA); returns what read_back needs."""
        # without prompt_rows the rows reading a prompt chunk go through the model apart from the
        # rows feeding one token, so that no decoding row is padded to a chunk's width: at 64 rows
        # and one new 128-token prompt, 128 + 63 token positions instead of 64 x 128 (with it, the
        # chunks' tokens are rows of the one-token pass: token_rows)
        # (and the rows that score their prompt's tokens apart from both: they need every position's logits)
        def part(r):          # 0: scoring a prompt chunk, 1: reading a prompt chunk, 2: one token
            return 0 if r.pending and r.prompt_logprobs is not None else 1 if len(r.pending) > 1 else 2
        # a row feeds its prompt's next chunk, or, decoding, the token it sampled in the step
        # before: -1 - i stands for entry i of that step's tokens, still on the device
        feed = [r.pending[:self.prefill_chunk] if r.pending else [-1 - r.src] for r in rows]
        # prefill_chunk prompt tokens a step in all (not each), the first admitted prompts first
        # (rows are in self.running's order, admission's; the others wait for a step): for the
        # scoring rows' pass always (its (B, T, V) logits stay bounded), and with prompt_rows for
        # the rows reading a prompt
        budgets = {'scoring': self.prefill_chunk, 'reading': self.prefill_chunk if self.prompt_rows else None}
        for k, r in enumerate(rows):
            kind = 'scoring' if part(r) == 0 else 'reading'       # (a one-token prompt reads too)
            if r.pending and budgets[kind] is not None:
                feed[k] = feed[k][:budgets[kind]]
                budgets[kind] -= len(feed[k])
        # rows sorted by part (stably): rows[:n] score their prompt, rows[n:m] read a prompt chunk,
        # rows[m:] feed one token (with prompt_rows, rows[n:] are one pass: token_rows)
        order = sorted((k for k, f in enumerate(feed) if f), key=lambda k: part(rows[k]))   # (stable)
        rows, feed = [rows[k] for k in order], [feed[k] for k in order]
        n, m = (sum(part(r) <= k for r in rows) for k in (0, 1))
        parts = [self.score_rows(rows[:n], feed[:n])] if n else []
        if not self.prompt_rows:
            parts += [self.forward_rows(rows[a:b], feed[a:b]) for a, b in ((n, m), (m, len(rows))) if b > a]
        elif len(rows) > n:                         # prompt chunks and one-token rows: one pass
            parts.append(self.token_rows(rows[n:], feed[n:]))
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]          # (B, V), row k's in row k
        self.stats['steps'] += 1
        # every row's greedy choice in one argmax; a sampling row draws with its own generator (its
        # seed's stream), a row with a penalty picks from its penalised logits and counts its token.
        # All on the device: nothing here waits for the step to finish
        tokens = sample_next(logits, 0, vocab_limit=self.vocab_limit)
        sampled = []
        for k, (r, f) in enumerate(zip(rows, feed)):
            prompt = bool(r.pending)
            self.stats['prefill_tokens' if prompt else 'decode_tokens'] += len(f)
            r.pending = r.pending[len(f):] if prompt else []
            self.register_prompt_blocks(r)
            sampled.append(not r.pending)               # its prompt is read: this step gives a token
            if sampled[-1]:
                r.src, r.in_flight = k, r.in_flight + 1
                z = logits[k:k + 1]
                if r.counts is not None:
                    z = penalize(z, r.counts[None], r.frequency_penalty, r.presence_penalty)
                # greedy rows without a penalty keep the batched argmax: a new change to the logits
                # that applies when greedy too (a logit bias, say) joins this test
                if r.temperature > 0 or r.counts is not None:
                    tokens[k] = sample_next(z, r.temperature, top_k=r.top_k, top_p=r.top_p,
                                            vocab_limit=self.vocab_limit, generator=r.generator)[0]
                if r.counts is not None:
                    r.counts.index_add_(0, tokens[k:k + 1], torch.ones_like(r.counts[:1]))
        # the log-probabilities some requests asked for, every row's at once (on the device; read
        # back with the tokens)
        asked = [r.logprobs for r, s in zip(rows, sampled) if s and r.logprobs is not None]
        scores = chosen_and_top_logprobs(logits, tokens, max(asked), self.vocab_limit) if asked else None
        self.last_tokens = tokens
        done = None
        if self.overlap and tokens.is_cuda:             # to the host without waiting: a pinned buffer
            host = self.token_buffers[self.turn][:len(rows)]        # (two, used in turns: the one read
            self.turn ^= 1                                           # back next is never written now)
            host.copy_(tokens, non_blocking=True)
            if scores is not None:                      # (pinned by torch's caching host allocator)
                scores = tuple(t.to('cpu', non_blocking=True) for t in scores)
            done = torch.cuda.Event()
            done.record()
            tokens = host
        return rows, sampled, tokens, done, scores

    def read_back(self, launched):
        """The tokens of a launched step, on the host (waiting for that step only): each request
        adds its token (and its log-probabilities, if it asked) and finishes at a stop token or
        max_new_tokens, giving its blocks back. A request that stopped (or was cancelled) while the
        step ran drops its token."""
        rows, sampled, tokens, done, scores = launched
        if done is not None:
            done.synchronize()
        chosen, values, top = [t.tolist() for t in scores] if scores is not None else (None, None, None)
        events = []
        for i, (r, s, tok) in enumerate(zip(rows, sampled, tokens.tolist())):
            if not s:
                if not r.done:
                    events.append((r, None, False))
                continue
            r.in_flight -= 1
            if r.done:
                continue
            r.output.append(tok)
            if r.logprobs is not None:
                r.token_logprobs.append((chosen[i], list(zip(top[i][:r.logprobs], values[i][:r.logprobs]))))
            r.done = tok in r.stop_ids or len(r.output) >= r.max_new_tokens
            events.append((r, tok, r.done))
            if r.done:
                self.pool.give_back(r.blocks)
                r.blocks = []
                self.running.remove(r)
        return events

    def forward_rows(self, rows, feed):
        """(B, V) logits of the last token row b feeds (feed[b]): one forward pass, with cuda_graph in
        its (rows, columns) bucket's fixed shapes, else in its own (the rows left-padded to the
        longest)."""
        if self.cuda_graph:
            return self.static_step(rows, feed)
        idx, _ = pad_prompts(feed)                    # (B, T), each row left-padded with 0
        idx = idx.to(self.device)
        if any(f[-1] < 0 for f in feed):
            take_sampled(idx[:, -1], self.last_tokens)
        cache = PagedCache(self.pool, rows, [len(f) for f in feed], self.device)
        self.stats['eager_steps'] += 1
        return self.model(idx, cache=cache, last_only=True)[0][:, -1]   # (B, V)

    def token_rows(self, rows, feed):
        """forward_rows in one one-column pass with every fed token a row of its own (prompt_rows):
        the tokens of a prompt chunk are rows at their own slots, r.length + i, each with r's block
        table, so each sees the ones before it (update() writes a pass's entries before it gathers
        the keys, so the rows' order does not matter). Row b is request b's last token, then come
        the chunks' other tokens: (B, V) logits of each request's last token are the first B rows
        (a slice: an index tensor made on the host would make the host wait for the device)."""
        last = [(r, [f[-1]], r.length + len(f) - 1) for r, f in zip(rows, feed)]
        before = [(r, [t], r.length + i) for r, f in zip(rows, feed) for i, t in enumerate(f[:-1])]
        entries, tokens, starts = zip(*(last + before))
        logits = self.static_step(list(entries), list(tokens), list(starts))
        self.stats['prompt_row_steps'] += int(any(r.pending for r in rows))
        return logits[:len(rows)]

    def score_rows(self, rows, feed):
        """forward_rows for rows reading a chunk of a prompt they score (eagerly, every position's
        logits): the chunk prompt[s:s + c] at columns T - c..T - 1, where column T - c + j predicts
        prompt[s + j + 1] (the last one of the whole prompt predicts the first new token, not scored
        here). Adds each scored token's (logprob, top k) to r.prompt_scores; (B, V) last logits."""
        idx, _ = pad_prompts(feed)
        idx = idx.to(self.device)
        cache = PagedCache(self.pool, rows, [len(f) for f in feed], self.device)
        self.stats['eager_steps'] += 1
        logits = self.model(idx, cache=cache)[0]                        # (B, T, V)
        T = idx.size(1)
        for b, (r, f) in enumerate(zip(rows, feed)):
            start = len(r.prompt) - len(r.pending)                       # where this chunk starts
            targets = r.prompt[start + 1:start + len(f) + 1]
            if targets:           # (float32 log-softmax over the chunk's positions: at most prefill_chunk)
                chosen, values, top = chosen_and_top_logprobs(logits[b, T - len(f):T - len(f) + len(targets)],
                                                              torch.tensor(targets, device=self.device),
                                                              r.prompt_logprobs, self.vocab_limit)
                r.prompt_scores += [(c, list(zip(i, v))) for c, i, v in zip(chosen.tolist(), top.tolist(),
                                                                           values.tolist())]
        return logits[:, -1]

    def bucket(self, B):
        """The rows a step of B rows is padded to: the smallest of 1, 2, 4, 8, ... and max_rows
        (max_batch, + prefill_chunk with prompt_rows) that holds them (a few shapes, so a few graphs)."""
        return min(1 << (B - 1).bit_length(), self.max_rows)

    def token_bucket(self, T):
        """The columns a step whose longest row feeds T tokens is padded to: the smallest of
        self.token_buckets that holds them (T <= prefill_chunk, the largest)."""
        return next(Tb for Tb in self.token_buckets if Tb >= T)

    def static_step(self, rows, feed, starts=None):
        """A step of `rows` (row b feeding the tokens feed[b], from slot starts[b], by default its
        request's length) in its (rows, columns) bucket's fixed shapes: (B, V) logits of the real
        rows' last tokens, through the bucket's CUDA graph where it has one (see refresh_graph),
        else eagerly."""
        cache = self.static_cache(self.bucket(len(rows)), self.token_bucket(max(len(f) for f in feed)))
        self.refresh_graph(cache)              # (before fill: a capture runs a padding-only fill of its own)
        cache.fill(rows, feed, self.last_tokens, starts)
        if cache.graph is not None:
            cache.graph.replay()                           # writes the pools and cache.logits
            cache.end()                                    # a replay runs no Python: lengths here
            logits = cache.logits
        else:
            logits = self.static_forward(self.model, cache)
        self.stats['static_steps'] += 1
        self.stats['static_prefill_steps'] += int(cache.Tb > 1)
        return logits[:len(rows), -1]                      # (Bb, 1, V) -> (B, V): column Tb - 1, every row's last

    def static_cache(self, Bb, Tb):
        if (Bb, Tb) not in self.static:
            self.static[Bb, Tb] = StaticPagedCache(self.pool, Bb, Tb, self.width, self.device)
        return self.static[Bb, Tb]

    def refresh_graph(self, cache):
        """On CUDA, give `cache` a graph of its step captured for the model as it is now: at its
        first use, and again if the parameters moved (model.to(...); an update in place is read
        where it is) or the autocast setting changed; none where a graph cannot hold the step
        (generate.graph_capturable, for its Bb x Tb tokens: e.g. the MoE loop waits for the host)."""
        if self.device.type != 'cuda':
            return
        signature = (DecodeGraphs.signature(self.model, self.params),    # cheap: the parameters listed
                     self.model.__dict__.get('tensor_moves', 0))          # once; and model.to(...) calls
        if cache.signature != signature:
            cache.graph = cache.logits = None              # an older graph's memory goes first
            cache.signature = signature
            if graph_capturable(self.model, cache.Bb * cache.Tb):
                self.capture(cache)

    @torch.no_grad()
    def capture(self, cache):
        """Capture `cache`'s step as a CUDA graph (generate.capture_graph: warm-up steps on a side
        stream, then the capture) with every row parked on the scratch block, so that none of
        these steps writes a block a request holds. A capture must not allocate the pools: if no
        step has made them yet, one parked step run eagerly does."""
        def step():
            return self.static_forward(self.model, cache)
        cache.fill([])
        if not self.pool.tensors:
            step()
        cache.graph, cache.logits = capture_graph(step, self.device)
        self.stats['graph_captures'] += 1

    def capture_graphs(self, prefill=False):
        """Capture every rows bucket's one-column step now (a server at start, a benchmark before it
        times) rather than at its first use: with prompt_rows these are all the fixed-shape steps
        there are, up to max_batch + prefill_chunk rows (a request that scores its prompt still
        reads it in eager passes); without, the decode steps' buckets, and with prefill=True
        also every (rows, columns) pair of the prompt-chunk steps. Nothing without cuda_graph, or
        off CUDA.
        By default the prompt-chunk pairs are captured at their first use: they are many (7 rows
        buckets x 4 column buckets at max_batch 64, prefill_chunk 256), a steady load uses few of
        them (a closed loop of C streams sits at rows bucket C), and each graph keeps the memory
        of its step's activations, which grow with Bb x Tb. The price: the first step of each
        pair used also runs the capture (two warm-up steps and the capture itself)."""
        if self.cuda_graph and self.device.type == 'cuda':
            for Bb in sorted({self.bucket(B) for B in range(1, self.max_rows + 1)}):
                for Tb in self.token_buckets if prefill and not self.prompt_rows else (1,):
                    self.refresh_graph(self.static_cache(Bb, Tb))

    def decode_mode(self):
        """How the steps run, in words, for a script to print."""
        if not self.cuda_graph:
            return 'eager'
        return 'CUDA graphs' if any(c.graph is not None for c in self.static.values()) else 'fixed shapes, eager'

    def cancel(self, r):
        """Stop a request (e.g. its client went away, or a stop string was seen): its blocks go
        back to the pool."""
        if not r.done:
            self.stats['cancelled'] += 1
        r.done = True
        if r in self.waiting:
            self.waiting.remove(r)
        if r in self.running:
            self.pool.give_back(r.blocks)
            r.blocks = []
            self.running.remove(r)

    def run(self):
        """Step until no request waits or runs."""
        while self.waiting or self.running:
            self.step()
