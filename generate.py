"""
The inference engine: everything that turns a model into text, which every stage and sample.py
use (nanochat's engine.py plays this part there).

  sample_next(logits, ...)             greedy, temperature, top-k and nucleus sampling
  penalize(logits, counts, ...)        OpenAI's frequency and presence penalties on repeated tokens
  chosen_and_top_logprobs(logits, tokens, k)
                                       the model's log-probabilities of chosen tokens, and the top k
  prompt_logprobs(model, ids, k)       the same for every token of a prompt after its first
  pad_prompts(prompts)                 left-padded (B, P) prompts and their validity mask
  KVCache, new_cache(model, ...)       keys and values (or MLA latents) of earlier tokens
  generate_tokens(model, idx, ...)     yields the next token of every row, through the cache
  graph_capturable(model)              whether a step of this model can be a CUDA graph
  capture_graph(fn, device)            a step captured as a CUDA graph (side-stream warm-up first)
  DecodeGraph / DecodeGraphs           a one-token step captured as a CUDA graph, kept per shape
  use_cuda_graph(value, device_type)   a script's cuda_graph setting resolved (None: on for CUDA)
  generate_chat(model, tok, prompts)   answers to chat prompts, in batches
  generate(model, idx, ...)            generate_tokens gathered into one (B, P + new) tensor
  generate_speculative(model, prompt)  greedy decoding drafted by the model's own MTP modules

GPT.generate in model.py is the reference: no cache, the whole window recomputed per token;
tests hold generate_tokens equal to it while prompt + new tokens fit block_size (past it the
reference crops at every token and generate_tokens restarts from the latest half window).
"""

import contextlib
import sys

import torch

from fast_paths import grouped_mm_supported
from model import attention_mask


# -----------------------------------------------------------------------------
# Sampling

def sampling_problems(temperature, top_k=0, top_p=1.0):
    """Why sampling settings cannot be used: one message per bad value (empty if they can), for the
    scripts that take them (sample.py, eval.py)."""
    return [msg for bad, msg in [
        (temperature < 0, f'temperature={temperature} must be >= 0 (0 means greedy)'),
        (top_k < 0, f'top_k={top_k} must be >= 0 (0 means off)'),
        (not 0 < top_p <= 1, f'top_p={top_p} must be in (0, 1]')] if bad]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, vocab_limit=None, generator=None):
    """Pick the next token from (B, V) logits: greedy at temperature 0, else sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens and/or the
    smallest set whose probability reaches top_p (nucleus sampling, Holtzman et al. 2019)."""
    limited = vocab_limit is not None and vocab_limit < logits.size(-1)   # ids past the tokenizer
    if temperature == 0:                              # (vocab padding) are never chosen
        return (logits[:, :vocab_limit] if limited else logits).argmax(-1)   # in bf16: no float copy
    logits = logits.float()
    # minus the largest real id's logit first: a tiny temperature (1e-39) then makes the others -inf
    # and that one 0 (greedy's choice), where the division alone would overflow to inf - inf = NaN
    top = (logits[:, :vocab_limit] if limited else logits).amax(-1, keepdim=True)
    logits = (logits - top) / temperature             # a new tensor: the caller's logits stay as they are
    if limited:                       # masked (slicing would change which tokens a seed draws)
        logits[:, vocab_limit:] = -float('inf')
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float('inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # the smallest set whose probability reaches top_p: out goes a token whose predecessors' mass
        # reaches it already (the first token never: 0 < top_p)
        outside = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(outside, -float('inf'))
        logits = torch.full_like(logits, -float('inf')).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def penalize(logits, counts, frequency_penalty=0.0, presence_penalty=0.0):
    """OpenAI's penalties on (B, V) logits, from counts (B, V) of each token in the answer so far:
        z_i - frequency_penalty * c_i - presence_penalty * [c_i > 0]
    Positive values make a token less likely each time it is used (frequency) or once it has been
    used at all (presence): against the loops of greedy decoding. A new float32 tensor."""
    return logits.float() - frequency_penalty * counts - presence_penalty * (counts > 0).float()


def chosen_and_top_logprobs(logits, tokens, k=0, vocab_limit=None):
    """The model's log-probabilities of tokens (B,) under (B, V) logits, and of the k most likely
    tokens of each row: what OpenAI's `logprobs` report. They are of the model's own distribution,
        log p(t) = z_t - log sum_j exp(z_j)      over the tokenizer's ids (not the vocab padding),
    before temperature, top-k / top-p or the penalties reshape it for sampling (vLLM's default
    too), so an answer's numbers do not depend on how it was sampled. Returns float32 tensors
    (chosen (B,), top values (B, k), top ids (B, k)), on the logits' device (nothing waits)."""
    z = logits.float()
    if vocab_limit is not None and vocab_limit < z.size(-1):
        z = z[:, :vocab_limit]
    lp = z.log_softmax(-1)
    top = lp.topk(min(k, lp.size(-1)), -1)                # (k = 0: empty)
    return lp.gather(-1, tokens[:, None].to(lp.device))[:, 0], top.values, top.indices


@torch.no_grad()
def prompt_logprobs(model, ids, k=0, vocab_limit=None):
    """Log-probabilities of a prompt's tokens (a list of ids): for ids[1:], each given the ones
    before it, with the k most likely tokens at each position, from one forward pass over the
    whole prompt (no cache). What an evaluation of a fixed text needs (OpenAI's `echo` with
    `logprobs`: lm-evaluation-harness scores multiple-choice answers so). Returns a list of
    len(ids) - 1 (logprob, [(id, logprob), ...]) on the host."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    logits = model(idx)[0][0, :-1]                        # (T - 1, V): position t predicts ids[t + 1]
    out = []
    for a in range(0, len(ids) - 1, 256):                 # float32 log-softmax 256 positions at a time
        chosen, values, top = chosen_and_top_logprobs(logits[a:a + 256], idx[0, a + 1:a + 257], k,
                                                      vocab_limit)
        out += [(c, list(zip(i, v))) for c, i, v in zip(chosen.tolist(), top.tolist(), values.tolist())]
    return out


def pad_prompts(prompts, pad_id=0, device='cpu'):
    """Left-pad a list of token-id lists to one (B, P) tensor and its (B, P) validity mask."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError('every prompt needs at least one token (an empty one can start with EOT)')
    P = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = True
    return idx.to(device), mask.to(device)


# -----------------------------------------------------------------------------
# The KV cache

class KVCache:
    """Past keys and values (or MLA latents) for incremental decoding, one set per layer.

    Rows of a batch are left-padded to a common length: each row's positions start at 0 at its
    first real token, and padding is never attended to. Without a sliding window the cache holds
    `max_len` tokens. With one (and roll=True: positions relative, RoPE or none) it is a rolling
    buffer of n_keep + window slots: the first n_keep = n_sink + the longest left padding slots
    stay (every row's sinks: a row padded by k has them at k .. k + n_sink - 1), the rest overwrite
    the oldest slot, so memory stays bounded however long generation runs (positions keep
    counting, exactly as the masked full attention sees them).

    Per forward pass: begin(T) -> (positions, mask); each layer calls update(); then end().

    static=True (no rolling window): every tensor keeps its shape from step to step, and where the
    next token goes is a device tensor (pos_t), not a Python number, so one decode step can be
    captured as a CUDA graph and replayed (see DecodeGraph). Attention then runs over all
    `capacity` slots with the empty ones masked out, which costs a little more per step and
    nothing in launches."""

    def __init__(self, batch_size, max_len, device, valid=None, window=None, n_sink=0, static=False, roll=True):
        self.batch_size, self.device = batch_size, device
        self.window = window
        self.n_sink = n_sink if window is not None else 0          # sinks only matter with a window
        max_pad = int((~valid).sum(1).max()) if valid is not None and window is not None else 0
        self.n_keep = self.n_sink + max_pad                        # slots never overwritten
        self.capacity = max_len if window is None or not roll else min(max_len, self.n_keep + window)
        self.rolling = window is not None and self.capacity < max_len
        if static and self.rolling:
            raise ValueError('a static KV cache cannot be a rolling buffer (sliding window shorter '
                             'than the generation); use static=False')
        self.static = static
        self.pos = 0                                   # tokens written so far (padded index)
        self.buffers = {}                              # (layer, name) -> preallocated tensor
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.padded = False
        # the row position of the token in each slot; -1 marks an empty slot or padding
        self.slot_pos = torch.full((batch_size, self.capacity), -1, dtype=torch.long, device=device)
        self.pos_t = torch.zeros((), dtype=torch.long, device=device)   # = pos, on the device
        self.reset(valid)

    def reset(self, valid=None):
        """Empty the cache for a new (B, P) prompt whose left padding `valid` marks (None: none),
        keeping every buffer where it is in memory (a captured CUDA graph still points there)."""
        self.pos = 0
        self.pos_t.zero_()
        self.slot_pos.fill_(-1)
        self.pad.zero_()
        self.padded = False
        if valid is not None:                          # (B, P) mask of a left-padded prompt
            self.pad.copy_((~valid).sum(1))
            self.padded = bool((~valid).any())

    def begin(self, T):
        """Plan the next T tokens: (positions (B, T), (attn_mask, is_causal)) for the layers."""
        if self.static:
            return self._begin_static(T)
        q_pos = self.pos + torch.arange(T, device=self.device)[None, :] - self.pad[:, None]
        self.q_pos = q_pos                             # negative: left padding
        fits = self.window is None or self.pos + T <= self.window   # no key falls out of the window yet
        if not self.padded and fits and not self.rolling:
            # a first chunk: plain causal attention (is_causal); one new token: it sees every key,
            # no mask; several tokens after a cached prefix: an explicit mask
            mask = (None, self.pos == 0) if (self.pos == 0 or T == 1) else self._mask(T)
        else:                                          # padding, a window or a rolling buffer
            mask = self._mask(T)
        if self.rolling:                               # which new tokens land in which slot
            p = self.pos + torch.arange(T)
            slot = torch.where(p < self.n_keep, p, self.n_keep + (p - self.n_keep) % self.window)
            keep = (p < self.n_keep) | (p + self.window >= self.pos + T)   # not overwritten in this chunk
            self.src = torch.arange(T)[keep].to(self.device)
            self.dst = slot[keep].to(self.device)
        elif self.pos + T > self.capacity:
            raise RuntimeError(f'KV cache overflow: {self.pos} + {T} > capacity {self.capacity}')
        return q_pos.clamp(min=0), mask

    def _begin_static(self, T):
        """begin() from device tensors only: the new tokens go to slots pos_t .. pos_t + T - 1,
        and every slot is a key, masked unless it holds a token this query may see."""
        if self.pos + T > self.capacity:
            raise RuntimeError(f'KV cache overflow: {self.pos} + {T} > capacity {self.capacity}')
        self.dst = self.pos_t + torch.arange(T, device=self.device)                   # (T,) slots
        self.q_pos = self.dst[None, :] - self.pad[:, None]                            # (B, T)
        q_pos = self.q_pos.masked_fill(self.q_pos < 0, -1)
        k_pos = self.slot_pos.index_copy(1, self.dst, q_pos)                          # (B, capacity)
        allowed = attention_mask(self.q_pos, k_pos, self.window, self.n_sink)        # (B, T, capacity)
        itself = torch.arange(self.capacity, device=self.device) == self.dst[:, None]  # (T, capacity)
        return self.q_pos.clamp(min=0), ((allowed | itself)[:, None], False)        # padding sees itself

    def _mask(self, T):
        cached = self.slot_pos if self.rolling else self.slot_pos[:, :self.pos]
        k_pos = torch.cat([cached, self.q_pos.masked_fill(self.q_pos < 0, -1)], dim=1)   # (B, L)
        allowed = attention_mask(self.q_pos, k_pos, self.window, self.n_sink)          # (B, T, L)
        L0 = cached.size(1)                            # a padding query sees itself, not nothing
        eye = torch.zeros_like(allowed)
        eye[:, torch.arange(T), L0 + torch.arange(T)] = True
        return (allowed | eye)[:, None], False                                          # (B,1,T,L)

    def update(self, layer, name, x, dim):
        """Add x (T new entries along `dim`) to what is cached; return the entries in view."""
        key = (layer, name)
        if key not in self.buffers:
            shape = list(x.shape)
            shape[dim] = self.capacity
            self.buffers[key] = torch.zeros(shape, dtype=x.dtype, device=x.device)
        buf, T = self.buffers[key], x.size(dim)
        if self.static:                                # write at pos_t, attend over every slot
            buf.index_copy_(dim, self.dst, x.to(buf.dtype))
            return buf
        if not self.rolling:
            buf.narrow(dim, self.pos, T).copy_(x)
            return buf.narrow(dim, 0, self.pos + T)
        view = torch.cat([buf, x.to(buf.dtype)], dim=dim)          # every slot, then the new ones
        buf.index_copy_(dim, self.dst, x.index_select(dim, self.src).to(buf.dtype))
        return view

    def end(self):
        T = self.q_pos.size(1)
        q_pos = self.q_pos.masked_fill(self.q_pos < 0, -1)
        if self.static:
            self.slot_pos.index_copy_(1, self.dst, q_pos)
            self.pos_t += T
        elif self.rolling:
            self.slot_pos[:, self.dst] = q_pos[:, self.src]
        else:
            self.slot_pos[:, self.pos:self.pos + T] = q_pos
        self.pos += T

    def rollback(self, n):
        """Forget the last n tokens (speculative decoding's rejected drafts): their slots are
        marked empty and written over next. Not for a rolling or static cache."""
        if self.rolling or self.static:
            raise ValueError('rollback needs a plain cache (no rolling window, not static)')
        self.pos -= n
        self.slot_pos[:, self.pos:self.pos + n] = -1

    def numel_per_token(self):
        """Numbers cached per token per layer (e.g. kv_lora_rank + qk_rope_head_dim for MLA)."""
        per_layer = {}
        for (layer, name), buf in self.buffers.items():
            per_layer[layer] = per_layer.get(layer, 0) + buf.numel() // (self.batch_size * self.capacity)
        return per_layer


def relative_positions(config):
    """Whether the model's positions are relative (RoPE, or none), so a sliding-window cache can roll
    past block_size; learned or sinusoidal positions cannot go past it."""
    return config.pos_emb in ('rope', 'none')


def new_cache(model, batch_size, max_len, device, prompt_mask=None, static=False):
    """A KVCache shaped for `model` (its sliding window and attention sinks): a rolling buffer
    only where positions are relative (RoPE or none); learned or sinusoidal positions cannot go
    past block_size, so their cache holds max_len tokens and the window is the mask's alone."""
    c = model.config
    return KVCache(batch_size, max_len, device, prompt_mask, c.sliding_window, c.n_sink_tokens, static,
                   roll=relative_positions(c))


# -----------------------------------------------------------------------------
# Generation

@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                    stop_ids=None, vocab_limit=None, prompt_mask=None, generator=None,
                    cuda_graph=False, compile_step=False, cache_len=None, frequency_penalty=0.0,
                    presence_penalty=0.0):
    """Yield the next token of every row, (B,), max_new_tokens times (fewer once every row
    has emitted one of stop_ids, an id or a list of ids; a finished row then repeats the
    first of them). idx: (B, P) prompts, left-padded
    where prompt_mask (B, P) is False. Keys and values are cached, so each step feeds one
    token. With a sliding window and relative positions (RoPE or none) the cache is a
    rolling buffer and generation runs on indefinitely in bounded memory; otherwise, when
    the cache reaches block_size, generation continues from the latest block_size/2 tokens
    (re-encoded), like nanoGPT's cropping but amortised.
    cuda_graph=True (not streaming): the cache is static and, on CUDA, the one-token step
    runs as a captured CUDA graph (DecodeGraph): one launch per token instead of hundreds (on
    the CPU the same static steps run eagerly; the tests check them there). For speed, put the
    weights in the compute dtype first, model.to(torch.bfloat16), rather than autocast.
    compile_step=True (with cuda_graph): the captured step is torch.compile's fused one.
    A captured step is kept for the next call with the same batch size and cache length
    (DecodeGraphs), so repeated calls (samples, evaluation batches, RL rollouts) capture once.
    cache_len: the cache's length, at least P + max_new_tokens (the default) and at most
    block_size: calls of different lengths that pass one cache_len share one captured step.
    frequency_penalty, presence_penalty: see penalize; they count the tokens this call generates."""
    B, P = idx.shape
    c = model.config
    bs = c.block_size
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids or ())     # [] or None: no stop
    streaming = c.sliding_window is not None and relative_positions(c)    # a rolling cache: no restart
    static = cuda_graph and not streaming         # on the CPU: the same static steps, no graph
    use_graph = static and idx.is_cuda and graph_capturable(model, B)
    valid = prompt_mask if prompt_mask is not None else torch.ones_like(idx, dtype=torch.bool)
    if P > bs and not streaming:                     # keep the latest block_size tokens
        idx, valid, P = idx[:, -bs:], valid[:, -bs:], bs
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    tokens, new = idx, []          # the window: tokens, then the new ones (joined at a restart)
    max_len = P + max_new_tokens if streaming else min(bs, max(P + max_new_tokens, cache_len or 0))
    graphs = key = signature = step = None
    if use_graph and max_new_tokens > 1:           # the graph of an earlier call of this shape
        graphs, key = decode_graphs(model), (idx.device, B, max_len, compile_step)
        signature = graphs.signature(model)
        step = graphs.take(key, signature)
    if step is not None:                           # its cache: the same buffers, emptied
        cache = step.cache
        cache.reset(valid)
    else:
        cache = new_cache(model, B, max_len, idx.device, valid, static=static)
    try:
        logits, _ = model(idx, cache=cache, last_only=True)
        if graphs is not None and step is None:    # captured after the prompt made the buffers
            step = DecodeGraph(model, cache, compile=compile_step)
        if stop_ids:
            stop = torch.tensor(stop_ids, device=idx.device)
        counts = None
        if frequency_penalty or presence_penalty:       # (B, V): each token's uses in the answer so far
            counts = torch.zeros(B, logits.size(-1), device=idx.device)
        for i in range(max_new_tokens):
            last = logits[:, -1] if counts is None else penalize(logits[:, -1], counts, frequency_penalty,
                                                                   presence_penalty)
            nxt = sample_next(last, temperature, top_k, top_p, vocab_limit, generator)
            if counts is not None:
                counts.scatter_add_(1, nxt[:, None], torch.ones_like(counts[:, :1]))
            if stop_ids:
                nxt = torch.where(done, stop[0], nxt)
                done = done | torch.isin(nxt, stop)
            yield nxt
            if i == max_new_tokens - 1 or (stop_ids and bool(done.all())):
                return                               # no forward pass for a token never used
            if not streaming:
                new.append(nxt)
            if not streaming and cache.pos == cache.capacity:   # window full: restart from the last half
                keep = max(1, bs // 2)
                tokens = torch.cat([tokens, torch.stack(new, 1)], dim=1)[:, -keep:]
                valid = torch.cat([valid, valid.new_ones(B, len(new))], dim=1)[:, -keep:]
                new = []
                if static:                          # same buffers: a graph stays valid
                    cache.reset(valid)
                else:
                    cache = new_cache(model, B, bs, idx.device, valid)
                logits, _ = model(tokens, cache=cache, last_only=True)
            else:
                if step is not None:
                    logits = step(nxt[:, None])
                else:
                    logits, _ = model(nxt[:, None], cache=cache, last_only=True)
    finally:                                       # kept for the next call (not while in use)
        if step is not None:
            graphs.give_back(model, key, step, signature)


def graph_capturable(model, batch_size=None):
    """Whether a decode step (batch_size tokens) can be a CUDA graph: nothing in it may wait
    for the host, and the MoE reference loop does (it asks which tokens each expert got);
    the grouped path runs where grouped_mm_supported (e.g. bf16 on Hopper), the gathered one
    (which 'auto' takes for batch_size * K <= E) everywhere."""
    w = model.tok_emb.weight

    def capturable(m):
        if m.impl == 'auto':
            return (batch_size is not None and batch_size * m.K <= m.E) or grouped_mm_supported(w[:1], m.C, m.I)
        return m.impl in ('grouped', 'gathered')
    return all(capturable(m) for m in model.moe_layers())


# -----------------------------------------------------------------------------
# CUDA-graph decoding

def decode_step(model, token, cache):
    """One token per row through the model and its cache: the (B, 1, V) logits."""
    return model(token, cache=cache, last_only=True)[0]


_compiled_decode_step = None


def compiled_decode_step():
    """decode_step through torch.compile, made once per process: every cache of the same shapes
    passes the same guards, so later generate() calls reuse the compiled code."""
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, dynamic=False)
    return _compiled_decode_step


def capture_graph(fn, device, warmup=2, park=None):
    """fn() captured as a CUDA graph: (graph, fn's output, which every graph.replay() rewrites in
    place). fn must read its inputs from tensors that stay where they are (filled in place before
    a replay) and never wait for the host. `warmup` calls of fn first run on a side stream (lazy
    init, cuBLAS workspaces, the allocator settle there, as capture requires); park(), if given,
    runs before each of them and before the capture, on the host, to point the inputs where these
    runs do no harm (outside the capture: a fill_ inside it would be replayed with every step).
    Under autocast the capture runs with autocast's weight cache off, so that the casts of float32
    weights are kernels of the graph: a cached cast lives only until its autocast context exits,
    and a graph kept for a later call would read the freed memory (garbage logits, and a
    device-side assert in torch.multinomial once the memory was reused)."""
    park = park or (lambda: None)
    cache_casts = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)               # weight casts inside the graph (above)
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                park()
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        park()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):                     # records, does not run, the kernels
            out = fn()
    finally:
        torch.set_autocast_cache_enabled(cache_casts)
    return graph, out


class DecodeGraph:
    """One decode step, (B, 1) tokens -> (B, 1, V) logits over a static KVCache, captured once as
    a CUDA graph and then replayed per token. At batch 1 a small model's step is hundreds of
    tiny kernels whose launches (and the Python that issues them) cost far more than their
    work; a replay launches them all at once. The graph reads the token from `self.token`,
    the position from cache.pos_t and the cache buffers in place, so every tensor it touches
    must stay at its address: the cache is reset in place, never rebuilt. (torch.compile's
    mode='reduce-overhead' does the same thing automatically; this is the explicit version.)
    The capture is capture_graph's (under autocast: with the weight casts inside the graph)."""

    def __init__(self, model, cache, warmup=2, compile=False):
        assert cache.static and cache.device.type == 'cuda'
        self.model, self.cache = model, cache
        # compile=True: the step is first fused by torch.compile (hundreds of small elementwise
        # kernels become a few dozen), then its kernels are captured the same way
        self.step_fn = compiled_decode_step() if compile else decode_step
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        saved = (cache.pos, cache.pos_t.clone(), cache.slot_pos.clone())
        self.graph, self.logits = capture_graph(lambda: self.step_fn(self.model, self.token, cache),
                                                cache.device, warmup, self._park)
        cache.pos = saved[0]                              # undo the warm-up steps
        cache.pos_t.copy_(saved[1])
        cache.slot_pos.copy_(saved[2])

    def _park(self):
        """Point the cache at its last slot for a warm-up or capture step: that slot is empty
        unless the cache is full (and then generation restarts from a fresh prompt before the
        next step), so these steps never overwrite a cached token or run past the buffers.
        (Outside the capture: a fill_ inside it would be replayed with every token.)"""
        self.cache.pos = self.cache.capacity - 1
        self.cache.pos_t.fill_(self.cache.capacity - 1)

    def __call__(self, token):
        if self.cache.pos + 1 > self.cache.capacity:
            raise RuntimeError(f'KV cache overflow: {self.cache.pos} + 1 > capacity {self.cache.capacity}')
        self.token.copy_(token)
        self.graph.replay()                               # advances cache.pos_t on the device
        self.cache.pos += 1                               # ... and here the host's count
        return self.logits


class DecodeGraphs:
    """The captured decode steps of one model, kept between generate_tokens() calls: making one
    (warm-up steps, torch.compile's guards, the capture) costs as much as tens of replayed tokens
    at batch 1, so a caller that generates again with the same batch size and cache length
    (samples, evaluation batches, RL rollouts) should not pay it again.

    A step is keyed by (device, batch size, cache length, compiled or not), and is valid only for
    the tensors it was captured on: every parameter and buffer at the same address and dtype, under
    the same autocast setting. `take` checks that and hands a step out to one caller at a time
    (another caller of the same shape meanwhile captures its own); `give_back` keeps it, the most
    recent `max_steps` of them. Weights updated in place (an optimizer step) stay valid: the graph
    reads them where they are. model.to(...) drops them all (GPT._apply); so does clear(). Each
    kept step holds its KV cache and the graph's memory pool."""

    def __init__(self, max_steps=4):
        self.max_steps = max_steps
        self.steps = {}                  # key -> (signature, DecodeGraph), oldest first

    @staticmethod
    def signature(model, tensors=None):
        """What a captured step depends on besides its inputs. tensors: the model's tensors, or a
        list of them kept by the caller (walking the modules costs more than a replayed step)."""
        tensors = (*model.parameters(), *model.buffers()) if tensors is None else tensors
        tensors = tuple((t.data_ptr(), t.dtype) for t in tensors)
        return (tensors, model.training, torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda'))

    def take(self, key, signature):
        """The step kept for `key`, removed while its caller decodes; None if none was kept for
        these tensors (signature(model) now)."""
        kept = self.steps.pop(key, None)
        return kept[1] if kept is not None and kept[0] == signature else None

    def give_back(self, model, key, step, signature):
        """Keep `step` (captured or taken with `signature`) unless the model changed meanwhile."""
        if self.signature(model) != signature:
            return
        self.steps.pop(key, None)
        self.steps[key] = (signature, step)
        while len(self.steps) > self.max_steps:
            self.steps.pop(next(iter(self.steps)))

    def clear(self):
        self.steps.clear()

    def __deepcopy__(self, memo):        # a copied model captures its own
        return DecodeGraphs(self.max_steps)


def decode_graphs(model):
    """The DecodeGraphs kept for `model` (made on first use; GPT._apply drops it when the
    model's tensors move)."""
    if '_decode_graphs' not in model.__dict__:
        model.__dict__['_decode_graphs'] = DecodeGraphs()
    return model.__dict__['_decode_graphs']


# -----------------------------------------------------------------------------
# Chat

def use_cuda_graph(value, device_type):
    """A script's cuda_graph setting resolved: None means on for CUDA (the captured one-token step
    of DecodeGraph gives the answers of eager decoding, several times faster), off elsewhere;
    True / False as given. Anything else stops the script with an error that names the valid values."""
    if value is None:
        return device_type == 'cuda'
    if isinstance(value, bool):
        return value
    sys.exit(f'error: cuda_graph={value!r}; valid: None (on for CUDA), True, False')


@torch.no_grad()
def generate_chat(model, tok, prompts, max_new_tokens=256, temperature=0.0, top_k=None, top_p=None,
                  batch_size=32, autocast=contextlib.nullcontext, generator=None, cuda_graph=False,
                  frequency_penalty=0.0, presence_penalty=0.0):
    """Responses to `prompts` (strings, or conversations: [{'role', 'content'}, ...] ending with the
    user's turn) with the chat template, in left-padded batches through the
    KV cache. Returns one dict per prompt: 'ids' (the response tokens, without the stop token),
    'text', 'ended' (True if the model ended its turn: emitted <|end|>) and 'stop' (the id of
    the token that stopped it, <|end|> or EOT, or None at max_new_tokens). An EOT also stops the
    answer, but it ends a document, not a turn: a pretrained model that never saw the template
    stops there, and its answers do not count as ended turns.
    cuda_graph=True: a static cache whose one-token step is captured once and replayed, in this
    and later calls of the same shape (DecodeGraph; the same static steps run eagerly on the CPU).
    Under autocast the captured step casts the float32 weights itself at every token (DecodeGraph).
    frequency_penalty, presence_penalty: as in generate_tokens (penalize)."""
    device = next(model.parameters()).device
    stops = tok.stop_ids()
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [tok.encode_chat(p)[0] if isinstance(p, str) else tok.encode_messages(p)
                 for p in prompts[i:i + batch_size]]
        idx, mask = pad_prompts(chunk, pad_id=tok.eot_id, device=device)
        with autocast():
            new = list(generate_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, stop_ids=stops, vocab_limit=tok.vocab_size,
                                       prompt_mask=mask, generator=generator, cuda_graph=cuda_graph,
                                       frequency_penalty=frequency_penalty, presence_penalty=presence_penalty))
        new = torch.stack(new, 1).tolist() if new else [[] for _ in chunk]
        for row in new:
            end = next((j for j, t in enumerate(row) if t in stops), None)
            ids = row if end is None else row[:end]
            stop = None if end is None else row[end]
            out.append({'ids': ids, 'text': tok.decode(ids), 'ended': stop not in (None, tok.eot_id),
                        'stop': stop})
    return out


@torch.no_grad()
def generate(model, idx, max_new_tokens, **kw):
    """(B, P) prompts -> (B, P + n): the prompts followed by the n <= max_new_tokens tokens that
    generate_tokens yields (the same keywords)."""
    new = list(generate_tokens(model, idx, max_new_tokens, **kw))
    return torch.cat([idx, torch.stack(new, 1)], dim=1) if new else idx


# -----------------------------------------------------------------------------
# Speculative decoding with the model's own multi-token-prediction modules

def kept_drafts(drafts, greedy, stop_ids):
    """How many drafts a verify pass keeps: those equal to the main model's greedy tokens at their
    positions, up to the first that differs, or up to and with a stop token (a correct one counts)."""
    k = 0
    while k < len(drafts) and drafts[k] == greedy[k]:
        k += 1
        if drafts[k - 1] in stop_ids:
            break
    return k


@torch.no_grad()
def generate_speculative(model, prompt, max_new_tokens, stop_ids=(), draft_context=64, vocab_limit=None):
    """Greedy decoding of one prompt (a list of ids) that drafts with the MTP modules: from the
    main model's last hidden state h and the token t it predicts, MTP depth k drafts the token
    after the next, d_k = argmax Head(MTP_k(h^(k-1), Emb(d_(k-1)))) with d_0 = t (DeepSeek-V3's MTP,
    used as a draft model as its report suggests); then ONE forward pass of the main model over
    [t, d_1, ..., d_D] checks them all: the drafts that equal the main model's own greedy tokens
    are kept, the first that does not is replaced by the main model's token, and the cache forgets
    the rest. The output is the main model's greedy decoding, token for token (tests/test_decode.py);
    the MTP blocks see the last `draft_context` positions (their attention context; a shorter one
    makes worse drafts, never other tokens). vocab_limit: ids past it (vocabulary padding) are never
    chosen, as in generate_tokens. Returns (new tokens, {'drafted', 'accepted', 'forward_passes'})."""
    c, mtp = model.config, model.mtp
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids or ())     # as generate_tokens takes it
    if not len(mtp):
        raise ValueError('speculative decoding drafts with the MTP modules: the model has none (mtp_depth=0)')
    if len(prompt) + max_new_tokens > c.block_size:    # (drafts never run past max_new_tokens)
        raise ValueError(f'prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceed '
                         f'block_size {c.block_size}')
    if model.rope is not None and model.rope.kind == 'dynamic':
        raise ValueError("speculative decoding with rope_scaling 'dynamic': its RoPE base follows the "
                         "longest position of each forward pass, so a verify pass of several tokens "
                         "would not compute one-token steps' logits")
    device = model.tok_emb.weight.device
    # a plain cache (no rolling window): rejected drafts are rolled back, and the prompt and the
    # new tokens fit in block_size; a sliding window is then the mask's alone
    cache = KVCache(1, c.block_size, device, window=c.sliding_window, n_sink=c.n_sink_tokens, roll=False)
    greedy_of = lambda h: model.lm_head(h)[..., :vocab_limit].argmax(-1)     # noqa: E731  (h normed)
    x = model.trunk(torch.tensor([prompt], device=device), cache)[0]          # (1, P, C)
    hidden = x[0, -draft_context:]                                             # main hidden per fed position
    tokens = list(prompt)
    nxt = int(greedy_of(model.norm(x[:, -1]))[0])
    out, stats = [nxt], {'drafted': 0, 'accepted': 0, 'forward_passes': 1}
    while len(out) < max_new_tokens and nxt not in stop_ids:
        # draft: depth k reads the previous depth's hidden states and the embedding of the token
        # each position is followed by (the last position's: the newest token, then each draft)
        seq = tokens + [nxt]
        h, drafts = hidden, []
        for k, module in enumerate(mtp):
            follow = (seq[len(seq) - len(h) + k:] + drafts)[-len(h):]          # t_{i+1+k} per position i
            n = len(follow)
            positions = torch.arange(n, device=device)
            rope = model.rope(positions) if model.rope is not None else None
            h, _ = module(h[-n:][None], model.tok_emb(torch.tensor([follow], device=device)), rope,
                          model.causal_mask(n, device))
            h = h[0]
            drafts.append(int(greedy_of(module.norm(h[-1:]))[0]))
        drafts = drafts[:max_new_tokens - len(out)]
        # verify: the main model on [nxt, drafts...] in one pass; keep the drafts it agrees with
        x = model.trunk(torch.tensor([[nxt] + drafts], device=device), cache)[0]  # (1, 1 + D, C)
        greedy = greedy_of(model.norm(x[0])).tolist()
        k = kept_drafts(drafts, greedy, stop_ids)
        stats['drafted'] += len(drafts)
        stats['accepted'] += k
        stats['forward_passes'] += 1
        if k and drafts[k - 1] in stop_ids:               # a kept stop token ends the answer
            out += drafts[:k]
            break
        cache.rollback(len(drafts) - k)                                        # forget the rejected
        tokens += [nxt] + drafts[:k]
        hidden = torch.cat([hidden, x[0, :k + 1]])[-draft_context:]
        out += drafts[:k] + [greedy[k]]                   # and the main model's token after them
        nxt = out[-1]
    return out[:max_new_tokens], stats

