"""
Serve a checkpoint over HTTP with OpenAI's API, backed by engine.py, so that concurrent requests
are batched together (continuous batching over a paged KV cache):

$ python serve.py --out_dir=out/sft                      # http://127.0.0.1:8000, the chat page at /
$ python serve.py --out_dir=out/sft --port=8080 --host=0.0.0.0 --n_blocks=2048

  POST /v1/chat/completions   messages -> the assistant's answer (the chat template of tokenizer.py)
  POST /v1/completions        prompt -> its continuation; the prompt a string, token ids, or a list of
                              either (one answer each); echo: the prompt before the answer
      both: max_tokens, temperature, top_p, frequency_penalty, presence_penalty, stop (strings), n, seed,
            stream (server-sent events; stream_options.include_usage), logprobs (each answer token's
            log-probability and the most likely tokens': chat logprobs=true with top_logprobs 0..20,
            completions logprobs 0..5, with echo the prompt's tokens too). Refused by name (400,
            unsupported_parameter): tools, logit_bias, response_format (other than text), suffix...;
            any other field too (unrecognized_parameter; OpenAI's metadata fields, user, metadata,
            store, ..., are accepted and not used: METADATA)
  GET  /v1/models             the one model served
  GET  /tokenizer_info, POST /tokenize, POST /detokenize
                              the checkpoint's tokenizer (vLLM's endpoints: lm-evaluation-harness finds
                              them and tokenizes with them; /tokenize reads special tokens' names)
  GET  /health                {"status": "ok"} and what the engine holds: running, waiting, free blocks
  GET  /                      a chat page: multi-turn, streaming, sampling settings, a stop button

Any OpenAI client works, e.g. openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none').
Log-probabilities are the model's own distribution, before temperature, top_p or the penalties
(generate.chosen_and_top_logprobs). A completion's prompt of token ids is read as given; a string prompt
starts with the end-of-text token, as every training document did, and its echo leaves that out
(so even its first token has a log-probability). With echo and logprobs the engine scores the
prompt's tokens as its prefill reads them (Engine.add prompt_logprobs, batched with the other
requests; such a prompt reuses no cached prefix), and they come with the first token. This is how
lm-evaluation-harness scores a model's multiple-choice answers (its local-completions model, which
tokenizes through /tokenize: experiments/lm_eval_serve.sh).
A request is checked before anything runs; what cannot be served gets a 4xx in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}: malformed JSON, no messages, an unknown model
(404, model_not_found; a request may leave the model out), a prompt or max_tokens past the
model's context (context_length_exceeded), a sampling setting out of OpenAI's range (temperature
0..2, top_p in (0, 1], the penalties in -2..2, n >= 1). A client that leaves mid-stream, or before
a non-streamed answer is ready, has its request cancelled and its blocks freed; an engine step that
fails (e.g. out of memory) fails the requests in flight with a 500 and the server goes on.

One thread runs the engine; each HTTP request waits on its own queue for its tokens. The HTTP
layer is the standard library's ThreadingHTTPServer (a thread per connection): the model step is
the bottleneck, not the HTTP parsing, and it keeps serve.py free of extra dependencies and
readable top to bottom; an asyncio stack (FastAPI / uvicorn) would matter for thousands of idle
connections, which one GPU's batch of at most max_batch requests never has.
"""

import codecs
import json
import math
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from checkpoint import load_model, newest_run
from config import configure
from engine import Engine, cache_numbers_per_token
from generate import use_cuda_graph
from runtime import init_runtime

# -----------------------------------------------------------------------------
out_dir = ''                 # the checkpoint to serve; '': the newest under out/
host = '127.0.0.1'
port = 8000                  # 0: any free port (printed)
n_blocks = 512               # KV-cache blocks in the pool ...
tokens_per_block = 16        # ... of this many tokens each
max_batch = 32               # requests decoded together at most
prefill_chunk = 256          # prompt tokens read per step
cuda_graph = None            # the engine's steps as CUDA graphs, captured at start (engine.py); None: on for CUDA
prompt_rows = None           # with the graphs: prompt tokens as rows of the one-token step, so that a step is one
                             # graph (engine.py); False: prompt chunks in steps of their own (fewer, smaller
                             # graphs: for a long context, whose every prompt row gathers all its keys)
overlap = None               # read each step's tokens back a step late, so that the host prepares the next
                             # step while the GPU runs this one (engine.py); None: on for CUDA
default_max_tokens = 256     # when a request names none (at most what the context leaves after the prompt)
page_temperature = 0.8       # the chat page's settings when it opens (each a field on the page): small
page_frequency_penalty = 0.0 # models read best greedy with a penalty of 0.5 (docs/results.md)
quantize = ''                # 'int8' | 'int4': weights quantized at load (quant.py); '': as saved
device = 'auto'
dtype = 'auto'
seed = 1337
# -----------------------------------------------------------------------------
configure(globals(), verbose=False)
if not 0 <= page_temperature <= 2:                 # (the ranges OpenAI gives them)
    sys.exit(f'error: page_temperature={page_temperature} must be in [0, 2]')
if not -2 <= page_frequency_penalty <= 2:
    sys.exit(f'error: page_frequency_penalty={page_frequency_penalty} must be in [-2, 2]')
out_dir = out_dir or newest_run('serving')


def port_error(e):
    return (f'error: cannot serve on {host}:{port} ({e.strerror}): another server holds that port, '
            f'or it is not this machine\'s; --port=N picks another (--port=0: any free one)')


if not 0 <= port <= 65535:
    sys.exit(f'error: --port={port} is not a TCP port (0..65535; 0: any free one)')
if port:                    # checked before the model loads (a bind is also checked again at the end)
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        sys.exit(port_error(e))
rt = init_runtime(device, dtype, seed)
model, tok, ckpt = load_model(out_dir, rt.device, quantize=quantize)
model.eval()
if rt.dtype != 'float32':
    model.to(getattr(torch, rt.dtype))
MODEL_ID = os.path.basename(os.path.normpath(out_dir))
try:
    engine = Engine(model, n_blocks, tokens_per_block, max_batch, prefill_chunk, vocab_limit=tok.vocab_size,
                    cuda_graph=use_cuda_graph(cuda_graph, rt.device_type),
                    overlap=rt.device_type == 'cuda' if overlap is None else bool(overlap), prompt_rows=prompt_rows)
except ValueError as e:
    sys.exit(f'error: {e}')
engine.capture_graphs()                  # every rows bucket's one-token step, before any request
inbox = queue.Queue()                    # (request arguments, stop strings, the reply queue) from HTTP threads
cancelled = set()                        # ids of requests whose clients stopped listening
cancel_lock = threading.Lock()           # cancelled is written by HTTP threads, pruned by the engine's


def engine_loop():
    """The one thread that touches the engine: admits new requests, steps, hands tokens out, and
    ends a request whose text reached one of its stop strings (each choice of n as its own tokens
    come, so that its blocks are free at once, however the HTTP thread reads the choices)."""
    listeners, texts = {}, {}           # request id -> its reply queue; -> (stop strings, its token ids)
    while True:
        while not inbox.empty() or not (engine.waiting or engine.running):
            args, stop, reply = inbox.get()
            try:
                r = engine.add(**args)
                listeners[r.id] = reply
                if stop and tok.kind != 'word':     # (the word tokenizer's text is the HTTP thread's to
                    texts[r.id] = (stop, [])        # check: its spacing of quotes depends on all before)
                reply.put(('started', r.id))
            except ValueError as e:                         # it can never fit: a 400
                reply.put(('error', str(e)))
            except Exception as e:                          # e.g. out of memory: a 500, and keep serving
                traceback.print_exc()
                reply.put(('failed', f'the engine could not admit the request: {type(e).__name__}: {e}'))
        with cancel_lock:
            leaving = [r for r in engine.waiting + engine.running if r.id in cancelled]
        for r in leaving:                                   # a stop string was seen, or the client left
            engine.cancel(r)
            listeners.pop(r.id, None)
            texts.pop(r.id, None)
        live = {r.id for r in engine.waiting + engine.running}
        with cancel_lock:                                   # forget ids of requests that have ended
            cancelled.intersection_update(live)
        try:
            events = engine.step()
            for r, token, finished in events:
                if token is not None:              # (with its log-probabilities, if it asked)
                    if r.prompt_logprobs is not None and len(r.output) == 1:    # and first, its prompt's
                        listeners[r.id].put(('prompt', r.prompt_scores))
                    listeners[r.id].put(('token', (token, r.token_logprobs[-1] if r.logprobs is not None else None)))
                    if r.id in texts and not finished and token not in tok.special_names:
                        stop, ids = texts[r.id]
                        ids.append(token)
                        # a new match ends in the last token, and a stop string of n characters (at most 4n
                        # bytes, a token at least one) lies in the last 4n + 1 tokens: no whole-answer decode
                        # per token on the engine's thread (Generation.pieces cuts the text there)
                        # (a false match would end an answer the text does not end; a miss only frees
                        # the blocks later, when the HTTP thread sees the stop in the whole text: so a
                        # character cut at either end of the tail, U+FFFD, is left out)
                        tail = tok.decode(ids[-(4 * max(map(len, stop)) + 1):]).strip('\ufffd')
                        if any(s in tail for s in stop):
                            engine.cancel(r)
                            finished, token = True, r.stop_ids[0]
                if finished:
                    texts.pop(r.id, None)
                    listeners.pop(r.id).put(('done', 'stop' if token in r.stop_ids else 'length'))
        except Exception as e:          # e.g. out of memory: fail the requests in flight, keep serving
                                        # (so that no HTTP thread waits on a reply that never comes)
            traceback.print_exc()
            for r in engine.waiting + engine.running:
                engine.cancel(r)
            for reply in listeners.values():
                reply.put(('failed', f'the engine failed: {type(e).__name__}: {e}'))
            listeners.clear()
            texts.clear()


class APIError(Exception):
    """A request the server refuses or could not finish, answered with an HTTP status and OpenAI's
    error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message, param=None, code=None, status=400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status

    def body(self):
        kind = 'invalid_request_error' if self.status < 500 else 'server_error'
        return {'error': {'message': str(self), 'type': kind, 'param': self.param, 'code': self.code}}


def server_error(e):
    """An exception the server did not expect, as the 500 it answers (the traceback goes to its log)."""
    return APIError(f'the server failed on this request: {type(e).__name__}: {e}', code='server_error', status=500)


def number(body, key, default, low, high=None, integer=False, above=False):
    """body[key] (default when absent or null), an integer or a number in [low, high], or in
    (low, high] with above=True; APIError naming the key otherwise."""
    v = body.get(key)
    if v is None:
        return default
    # (isfinite of an int too large for a float raises OverflowError: JSON's integers have no bound)
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or (
            isinstance(v, float) and not math.isfinite(v)):
        raise APIError(f"'{key}' must be {'an integer' if integer else 'a finite number'}, not {json.dumps(v)}", key)
    if v < low or (above and v == low) or (high is not None and v > high):
        raise APIError(f"'{key}' is {v}; it must be {'above' if above else 'at least'} {low}"
                       + (f' and at most {high}' if high is not None else ''), key)
    return v


def text_of(content, where):
    """A message's content: a string, or OpenAI's list of parts [{'type': 'text', 'text': ...}]."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get('type') == 'text'
                                         and isinstance(p.get('text'), str) for p in content):
        return ''.join(p['text'] for p in content)
    if not isinstance(content, str):
        raise APIError(f"{where}.content must be a string or a list of text parts", 'messages')
    return content


class Prompt:
    """One prompt of a request: ids, what the engine reads; echo_ids and echo_text, what `echo`
    puts before the answer (a string prompt's tokens without the end-of-text token that starts
    it; a prompt of ids, all of them and their text); skipped, how many of ids come before the
    echoed ones (so echoed token j's log-probability is the prompt's score at skipped + j - 1)."""

    def __init__(self, ids, echo_ids=(), echo_text=''):
        self.ids, self.echo_ids, self.echo_text = ids, list(echo_ids), echo_text
        self.skipped = len(ids) - len(self.echo_ids)
        self.offsets = None                               # the echoed tokens' text offsets, once asked


class TextOffsets:
    """Where each token's text starts (len(tok.decode(ids[:k]))), counted in one pass as tokens
    come instead of decoding every prefix again: a token's bytes through an incremental UTF-8
    decoder (a token that ends inside a character adds it once it is whole); special tokens add no
    text (in an answer), or their names (specials_in_text: an echoed prompt of ids, whose text is
    tok.decode's). A word tokenizer, which joins words by rules, decodes each prefix."""

    def __init__(self, ids=(), specials_in_text=False):
        self.at, self.n, self.text_ids, self.specials_in_text = [], 0, [], specials_in_text
        self.decoder = codecs.getincrementaldecoder('utf-8')('replace')
        for i in ids:
            self.add(i)

    def add(self, i):
        self.at.append(self.n)
        special = i in tok.special_names
        if special and not self.specials_in_text:
            return
        self.text_ids.append(i)
        if tok.kind == 'word':
            self.n = len(tok.decode(self.text_ids))
        else:
            self.n += len(tok.special_names[i]) if special else len(self.decoder.decode(tok.decode_bytes([i])))


def prompts_of(path, body):
    """The prompts: the conversation in the chat template; a completion's prompt EOT + the text,
    or token ids as given; a list of either is several prompts."""
    if path != '/v1/chat/completions':
        prompt = body.get('prompt')
        several = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
        return [completion_prompt(p, f'prompt[{i}]') for i, p in enumerate(prompt)] if several \
            else [completion_prompt(prompt, 'prompt')]
    return [Prompt(chat_prompt(body))]


def completion_prompt(prompt, where):
    """A completion's prompt: a string (read after the end-of-text token) or a list of token ids."""
    if isinstance(prompt, str):
        try:
            ids = tok.encode(prompt)
        except ValueError as e:                           # e.g. a lone surrogate, or a character a
            raise APIError(f'{where} cannot be tokenized: {e}', 'prompt')    # char tokenizer lacks
        return Prompt([tok.eot_id] + ids, ids, prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool)
                                                   and 0 <= i < tok.vocab_size for i in prompt):
        return Prompt(prompt, prompt, tok.decode(prompt))
    raise APIError(f"{where} must be a string or a non-empty list of token ids in [0, {tok.vocab_size})", 'prompt')


def chat_prompt(body):
    """The conversation's token ids in the chat template."""
    messages = body.get('messages')
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of {role, content}", 'messages')
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get('role') not in ('system', 'developer', 'user', 'assistant'):
            raise APIError(f"messages[{i}] must be an object whose role is system, developer, user or assistant",
                           'messages')
        role = 'system' if m['role'] == 'developer' else m['role']     # (OpenAI's newer name for system)
        turns.append({'role': role, 'content': text_of(m.get('content'), f'messages[{i}]')})
    if not tok.chat:
        raise APIError(f'{out_dir} has no chat template (fine-tune it with sft.py); use /v1/completions',
                       'messages')
    try:
        return tok.encode_messages(turns)
    except ValueError as e:
        raise APIError(str(e), 'messages')


# The request fields this server reads, by endpoint; OpenAI's metadata fields that change no answer
# (accepted, not used); and OpenAI's fields it does not implement, with the values that ask for
# nothing. Any other field is refused by name, as OpenAI refuses one it does not know.
SAMPLING = {'model', 'max_tokens', 'max_completion_tokens', 'stop', 'stream', 'stream_options', 'temperature', 'top_p',
            'seed', 'frequency_penalty', 'presence_penalty', 'n'}
READ = {'/v1/chat/completions': SAMPLING | {'messages', 'logprobs', 'top_logprobs'},
        '/v1/completions': SAMPLING | {'prompt', 'logprobs', 'echo'}}
METADATA = {'user', 'metadata', 'store', 'service_tier', 'parallel_tool_calls', 'prompt_cache_key',
            'safety_identifier'}
UNSUPPORTED = {'logit_bias': ({},), 'tools': ([],), 'tool_choice': ('none',), 'functions': ([],),
               'function_call': ('none',), 'response_format': ({'type': 'text'},), 'suffix': ('',), 'best_of': (1,)}


def parse(path, body):
    """Check a request before anything runs: (its prompts, the engine's arguments for each, the
    stop strings, n, echo); APIError for what cannot be served. max_tokens defaults to
    default_max_tokens or what the context leaves after the prompt, whichever is less."""
    if not isinstance(body, dict):
        raise APIError('the request body must be a JSON object')
    if body.get('model') not in (None, MODEL_ID):
        raise APIError(f"the model {json.dumps(body['model'])} does not exist: this server serves "
                       f"'{MODEL_ID}'", 'model', 'model_not_found', 404)
    for key, harmless in UNSUPPORTED.items():             # refused by name, never silently ignored
        if body.get(key) not in (None, *harmless):
            raise APIError(f"'{key}' is not supported by this server", key, 'unsupported_parameter')
    for key in body:
        if key not in READ[path] | METADATA | set(UNSUPPORTED):
            raise APIError(f"unrecognized request argument supplied: '{key}'", key, 'unrecognized_parameter')
    options = body.get('stream_options')
    if options is not None and (not isinstance(options, dict) or set(options) - {'include_usage'}):
        raise APIError("'stream_options' may hold only include_usage", 'stream_options', 'unsupported_parameter')
    if options is not None and not body.get('stream'):
        raise APIError("'stream_options' needs 'stream': true", 'stream_options')
    prompts = prompts_of(path, body)
    context = model.config.block_size
    key = 'max_completion_tokens' if body.get('max_completion_tokens') is not None else 'max_tokens'
    max_tokens = []
    for i, p in enumerate(prompts):
        name = f'prompt[{i}]' if len(prompts) > 1 else 'the prompt'
        room = context - len(p.ids)                       # tokens left for the answer
        if room < 1:
            raise APIError(f"{name} is {len(p.ids)} tokens; the model's context is {context}, with no room for "
                           f"an answer", 'messages' if path == '/v1/chat/completions' else 'prompt',
                           'context_length_exceeded')
        max_tokens.append(number(body, key, min(default_max_tokens, room), 1, integer=True))
        if max_tokens[-1] > room:
            raise APIError(f"'{key}' is {max_tokens[-1]}, but the {len(p.ids)} tokens of {name.replace('the ', '')} "
                           f"leave {room} of the model's context of {context}", key, 'context_length_exceeded')
    # logprobs: chat's a boolean with top_logprobs (0..20) beside it; completions' the number of
    # likeliest tokens (0..5) itself; None: none recorded
    if path == '/v1/chat/completions':
        if body.get('logprobs') not in (None, True, False):
            raise APIError("'logprobs' must be true or false", 'logprobs')
        top = number(body, 'top_logprobs', None, 0, 20, integer=True)
        if top is not None and not body.get('logprobs'):
            raise APIError("'top_logprobs' needs 'logprobs': true", 'top_logprobs')
        logprobs = (top or 0) if body.get('logprobs') else None
    else:
        logprobs = number(body, 'logprobs', None, 0, 5, integer=True)
    echo = body.get('echo')
    echo = False if echo is None else echo
    if not isinstance(echo, bool):
        raise APIError("'echo' must be true or false", 'echo')
    stop = body.get('stop')
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError("'stop' must be a string or a list of strings", 'stop')
    if len(stop) > 4:                    # OpenAI's limit (each one is checked against every step's tail)
        raise APIError(f"'stop' holds {len(stop)} strings; at most 4", 'stop')
    if not isinstance(body.get('stream', False), bool):
        raise APIError("'stream' must be true or false", 'stream')
    top_p = number(body, 'top_p', 1.0, 0, 1, above=True)
    args = dict(temperature=float(number(body, 'temperature', 1.0, 0, 2)), top_p=None if top_p == 1 else top_p,
                stop_ids=tok.stop_ids(), seed=number(body, 'seed', None, -2**63, 2**63 - 1, integer=True),
                frequency_penalty=float(number(body, 'frequency_penalty', 0.0, -2, 2)),
                presence_penalty=float(number(body, 'presence_penalty', 0.0, -2, 2)), logprobs=logprobs)
    args = [dict(args, prompt=p.ids, max_new_tokens=m) for p, m in zip(prompts, max_tokens)]
    return prompts, args, [s for s in stop if s], number(body, 'n', 1, 1, max_batch, integer=True), echo


class Generation:
    """One choice of one HTTP request: its token ids in, text out as it comes, stop strings cut;
    with logprobs each token's (logprob, [(id, logprob)] * k) beside it in self.logprobs.
    index: its place among the request's choices; choice: among its prompt's n (it samples with
    seed + choice); echo with logprobs: score (its prompt's first choice) asks the engine to score
    the prompt's own tokens, scorer (its other choices) is the choice that did."""

    def __init__(self, args, stop, index, prompt, choice=0, score=False, scorer=None):
        self.reply, self.index, self.stop, self.prompt, self.choice = queue.Queue(), index, stop, prompt, choice
        seed = args['seed']
        score = {'prompt_logprobs': args['logprobs']} if score else {}
        inbox.put(({**args, **score, 'seed': None if seed is None else seed + choice}, stop, self.reply))
        kind, value = self.reply.get()
        self.scorer, self.prompt_scores = self if score else scorer, None
        if kind == 'error':                               # the engine refused it (e.g. the pool is too small)
            raise APIError(value)
        if kind == 'failed':                              # the engine could not admit it
            raise APIError(value, code='engine_error', status=500)
        self.id, self.text, self.finish = value, '', None
        self.ids = []                                     # the answer's text tokens
        self.tokens, self.logprobs = [], []               # every token it generated (a stop token too)
        self.asked = args['logprobs'] is not None         # ... and their log-probabilities, if asked
        self.offsets = TextOffsets()                      # where each of self.tokens starts in the text
        self.shown = 0                                    # how many of self.tokens self.text shows

    def scores_of_prompt(self):
        """The prompt's own tokens' (logprob, top) (echo with logprobs), waiting for them: the
        engine sends them just before the scoring choice's first token (which pieces() reads)."""
        s = self.scorer
        while s.prompt_scores is None:
            kind, value = s.reply.get()
            if kind == 'failed':
                raise APIError(value, code='engine_error', status=500)
            if kind != 'prompt':           # (the scoring choice is always read first: never here)
                raise RuntimeError(f"the prompt's scores were to come first, not {kind!r}")
            s.prompt_scores = value
        return s.prompt_scores

    def pieces(self, listening=None):
        """Yield the new text as tokens arrive (held back while it may be a multi-byte character or
        the start of a stop string); sets self.finish ('stop' | 'length'). listening(): whether the
        client is still there, asked every 0.2 s; ClientGone when it is not."""
        sent, next_check = 0, time.monotonic() + 0.2
        while self.finish is None:
            try:
                kind, value = self.reply.get(timeout=0.2 if listening else None)
            except queue.Empty:
                kind = None
            if listening and time.monotonic() >= next_check:
                if not listening():
                    raise ClientGone
                next_check = time.monotonic() + 0.2
            if kind is None:
                continue
            if kind == 'failed':
                raise APIError(value, code='engine_error', status=500)
            if kind == 'done':
                self.finish = value
            elif kind == 'prompt':                        # the prompt's scores, before the first token
                self.prompt_scores = value
            else:
                self.tokens.append(value[0])
                self.logprobs.append(value[1])
                if self.asked:
                    self.offsets.add(value[0])
                if value[0] not in tok.special_names:   # a stop token, or a chat tag: not text
                    self.ids.append(value[0])
            text = tok.decode(self.ids)
            # stop strings are looked for in whole characters: one whose bytes have not all come yet
            # decodes as U+FFFD for now
            whole = text.rstrip('\ufffd') if self.finish is None else text
            cut = min((whole.find(s) for s in self.stop if s in whole), default=-1)
            shown = len(self.tokens)
            if cut >= 0:                                # a stop string: end here, free the blocks
                text, self.finish = text[:cut], 'stop'  # (and show the tokens that start before it)
                shown = self.tokens_before(text) if self.asked else 0
                with cancel_lock:
                    cancelled.add(self.id)
            elif self.finish is None and (text.endswith('\ufffd') or any(
                    text.endswith(s[:k]) for s in self.stop for k in range(1, len(s)))):
                continue                                # wait for the rest
            self.text, self.shown = text, shown
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)


    def tokens_before(self, text):
        """How many of self.tokens a text cut from the answer shows: up to the fewest text tokens
        whose decoding holds it (a character of several byte tokens needs all of them)."""
        n = next(i for i in range(len(self.ids) + 1) if tok.decode(self.ids[:i]).startswith(text))
        shown = count = 0
        for t in self.tokens:
            if count == n:
                break
            shown, count = shown + 1, count + (t not in tok.special_names)
        return shown


class ClientGone(Exception):
    """The client of a request closed its connection before the answer was ready."""


def usage_of(gens):
    """OpenAI's usage of a request's choices: its prompts' tokens (each once), every choice's tokens."""
    prompt = sum(len(g.prompt.ids) for g in gens if g.choice == 0)
    completion = sum(len(g.tokens) for g in gens)      # (a stop token counts: it was generated)
    return {'prompt_tokens': prompt, 'completion_tokens': completion, 'total_tokens': prompt + completion}


def token_piece(i):
    """A token's text and its bytes. A byte-level token that is part of a character has no text
    of its own: its text is 'bytes:\\xNN...', as OpenAI writes it (so no two such tokens share a
    name); a special token's text is its name."""
    raw = tok.decode_bytes([i])
    if i in tok.special_names:
        return tok.special_names[i], raw
    try:
        return raw.decode('utf-8'), raw
    except UnicodeDecodeError:
        return 'bytes:' + ''.join(f'\\x{b:02x}' for b in raw), raw


def scored_tokens(g, echo, a, b, chat):
    """[(token id, logprob or None, top [(id, logprob)] or None, text offset)] for tokens a..b of
    choice g: with echo its prompt's echoed tokens first (the first token of a prompt of ids has no
    logprob: nothing comes before it), then its answer's, the stop token too (lm-evaluation-harness
    drops the last); each offset counted in the choice's text. A chat answer's tokens only, without
    special tokens (no text) or offsets."""
    p = g.prompt
    n_echo = len(p.echo_ids) if echo else 0
    if n_echo and p.offsets is None:
        p.offsets = TextOffsets(p.echo_ids, specials_in_text=True).at
    rows = []
    for j in range(a, b):
        if j < n_echo:                                    # an echoed prompt token: p.ids[skipped + j],
            k = p.skipped + j - 1                         # predicted at position k
            lp, top = g.scores_of_prompt()[k] if k >= 0 else (None, None)
            rows.append((p.echo_ids[j], lp, top, p.offsets[j]))
        elif not (chat and g.tokens[j - n_echo] in tok.special_names):
            lp, top = g.logprobs[j - n_echo]
            rows.append((g.tokens[j - n_echo], lp, top, None if chat else
                         (len(p.echo_text) if echo else 0) + g.offsets.at[j - n_echo]))
    return rows


def completion_logprobs(rows):
    """OpenAI's logprobs of a completion: tokens, token_logprobs, top_logprobs (the likeliest
    tokens and the chosen one, by text), text_offset."""
    names = [token_piece(i)[0] for i, *_ in rows]
    tops = []
    for name, (_, lp, top, _) in zip(names, rows):
        tops.append(None if top is None else {token_piece(j)[0]: v for j, v in top})
        if tops[-1] is not None:
            tops[-1].setdefault(name, lp)
    return {'tokens': names, 'token_logprobs': [lp for _, lp, _, _ in rows],
            'top_logprobs': tops, 'text_offset': [at for *_, at in rows]}


def chat_logprobs(rows):
    """OpenAI's logprobs of a chat answer: per token its text, logprob, bytes and top_logprobs."""
    def entry(i, lp):
        text, raw = token_piece(i)
        return {'token': text, 'logprob': lp, 'bytes': list(raw)}
    return {'content': [{**entry(i, lp), 'top_logprobs': [entry(j, v) for j, v in top]} for i, lp, top, _ in rows],
            'refusal': None}


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def setup(self):
        super().setup()
        # no Nagle: a reply is written as headers, then body; with Nagle the body waited for the
        # client's delayed ACK of the headers, about 40 ms on every kept-alive request on loopback
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):                 # quiet: one line per request is noise here
        pass

    def send(self, code, obj, content_type='application/json'):
        data = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header('Content-Type', content_type)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):    # the client left as its answer was sent
            self.close_connection = True

    def do_GET(self):
        if self.path == '/health':                     # and what the engine holds now
            self.send(200, {'status': 'ok', 'running': len(engine.running), 'waiting': len(engine.waiting),
                            'free_blocks': engine.pool.available(), 'blocks': engine.pool.n_blocks,
                            'cancelled': engine.stats['cancelled']})
        elif self.path == '/v1/models':
            # 'chat': whether the checkpoint has the chat template (the page continues text otherwise)
            self.send(200, {'object': 'list', 'data': [{'id': MODEL_ID, 'object': 'model', 'created': 0,
                                                         'owned_by': 'nano-kimi', 'chat': bool(tok.chat)}]})
        elif self.path == '/tokenizer_info':             # GPT-2's convention: EOT begins and ends a text
            eot = tok.special_names[tok.eot_id]
            self.send(200, {'tokenizer_class': tok.kind, 'vocab_size': tok.vocab_size, 'eos_token': eot,
                            'bos_token': eot, 'pad_token': None, 'chat_template': None,
                            'model_max_length': model.config.block_size})
        elif self.path in ('/', '/index.html'):
            self.send(200, CHAT_PAGE, 'text/html; charset=utf-8')
        else:
            self.send(404, APIError(f'no route {self.path}', code='not_found', status=404).body())

    def read_chunked(self):
        """A body sent in chunks (Transfer-Encoding: chunked, no Content-Length): each chunk a line
        with its size in hex, its bytes and a line break, until a chunk of size 0; then the trailer's
        lines up to a blank one. None if it is not that shape."""
        parts = []
        while True:
            try:
                size = int(self.rfile.readline(1024).split(b';')[0], 16)   # (';': a chunk extension)
            except ValueError:
                return None
            if size == 0:
                break
            parts.append(self.rfile.read(size))
            if self.rfile.readline(3) != b'\r\n':
                return None
        while self.rfile.readline(8192).strip():
            pass
        return b''.join(parts)

    def do_POST(self):
        if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
            raw = self.read_chunked()
            if raw is None:                   # (what is left of it would start the next request)
                self.close_connection = True
                return self.send(400, APIError('the request body is not well-formed chunked encoding').body())
        else:
            try:                              # read the body first, whatever the route: on a kept-alive
                length = int(self.headers.get('Content-Length') or 0)  # connection what is left unread
            except ValueError:                                         # would start the next request
                length = None
            if length is None or length < 0:                           # (read(-1) would wait for the
                self.close_connection = True                           # client to close the connection)
                return self.send(400, APIError('Content-Length is not a number of bytes').body())
            raw = self.rfile.read(length)
        if self.path in ('/tokenize', '/detokenize'):
            return self.tokenizer_route(raw)
        if self.path not in ('/v1/chat/completions', '/v1/completions'):
            return self.send(404, APIError(f'no route {self.path}', code='not_found', status=404).body())
        chat = self.path == '/v1/chat/completions'
        gens = []
        try:
            try:
                body = json.loads(raw or b'{}')
            except (ValueError, RecursionError) as e:      # (RecursionError: nested too deep)
                raise APIError(f'the request body is not valid JSON: {e}')
            prompts, args, stop, n, echo = parse(self.path, body)
            for p, a in zip(prompts, args):         # choices p * n + i: n of each prompt
                for i in range(n):                  # (echo with logprobs: its first choice scores the prompt)
                    scores = echo and a['logprobs'] is not None
                    gens.append(Generation(a, stop, len(gens), p, i, score=scores and i == 0,
                                           scorer=gens[-i] if scores and i else None))
            rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}", int(time.time())
            kind = 'chat.completion' if chat else 'text_completion'
            if body.get('stream'):
                usage = bool((body.get('stream_options') or {}).get('include_usage'))
                return self.stream(gens, rid, created, kind, chat, usage, echo)
            for g in gens:
                for _ in g.pieces(self.client_listening):
                    pass
        except APIError as e:                   # (choices already running stop: no one would read them)
            stop_generating(gens)
            return self.send(e.status, e.body())
        except ClientGone:                      # it left (a client's timeout, say): free its blocks now
            stop_generating(gens)
            self.close_connection = True
            return
        except Exception as e:                  # a bug of ours: say so (500), free its blocks, keep serving
            traceback.print_exc()
            stop_generating(gens)
            return self.send(500, server_error(e).body())
        choices = [{'index': g.index, 'finish_reason': g.finish, 'logprobs': logprobs_of(g, chat, echo),
                    **({'message': {'role': 'assistant', 'content': g.text}} if chat
                       else {'text': (g.prompt.echo_text if echo else '') + g.text})}
                   for g in gens]
        self.send(200, {'id': rid, 'object': kind, 'created': created, 'model': MODEL_ID, 'choices': choices,
                        'usage': usage_of(gens)})

    def tokenizer_route(self, raw):
        """/tokenize {"prompt": text} -> {"tokens", "count", "max_model_len"}; /detokenize {"tokens":
        ids} -> {"prompt": text}, as vLLM's server answers them."""
        try:
            try:
                body = json.loads(raw or b'{}')
            except (ValueError, RecursionError) as e:
                raise APIError(f'the request body is not valid JSON: {e}')
            if not isinstance(body, dict):
                raise APIError('the request body must be a JSON object')
            if self.path == '/tokenize':
                if not isinstance(body.get('prompt'), str):
                    raise APIError("'prompt' must be a string", 'prompt')
                try:
                    ids = tok.encode_special(body['prompt'])
                except ValueError as e:                   # a lone surrogate, a character it lacks
                    raise APIError(f"'prompt' cannot be tokenized: {e}", 'prompt')
                return self.send(200, {'tokens': ids, 'count': len(ids), 'max_model_len': model.config.block_size})
            ids = body.get('tokens')
            if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                  and 0 <= i < tok.vocab_size for i in ids)):
                raise APIError(f"'tokens' must be a list of token ids in [0, {tok.vocab_size})", 'tokens')
            self.send(200, {'prompt': tok.decode(ids)})
        except APIError as e:
            self.send(e.status, e.body())

    def client_listening(self):
        """False once the client has closed its connection (readable, and nothing to read); a
        client that sent more (a next request) is still there."""
        try:
            previous = self.connection.gettimeout()
            self.connection.settimeout(0)           # (a peek that does not wait; select() would fail on a
            try:                                    # file descriptor of 1024 or more)
                return self.connection.recv(1, socket.MSG_PEEK) != b''
            finally:
                self.connection.settimeout(previous)
        except BlockingIOError:                     # nothing to read: still there
            return True
        except OSError:
            return False

    def stream(self, gens, rid, created, kind, chat, usage=False, echo=False):
        """Server-sent events: one chunk per piece of text (with echo the prompt first), each choice
        in turn as its tokens come, with the log-probabilities of the tokens it shows if asked, then
        a chunk with its finish_reason, then (usage: stream_options.include_usage) a chunk with no
        choices and the usage, then [DONE]. An engine failure mid-stream sends an event
        {"error": ...} and ends the stream."""
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-cache')
        self.send_header('Connection', 'close')
        self.end_headers()

        wrote = time.monotonic()                # when the client was last written to

        def write(obj):
            nonlocal wrote
            self.wfile.write(f'data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n'.encode())
            self.wfile.flush()
            wrote = time.monotonic()

        def listening():
            """While no text goes out (held back before a possible stop string, say), an SSE comment
            every 0.2 s, which clients skip: a client that left shows as a write that fails. (A
            client that only closed its sending side still reads, and is still there.)"""
            nonlocal wrote
            if time.monotonic() - wrote < 0.2:
                return True
            try:
                self.wfile.write(b':\n\n')
                self.wfile.flush()
                wrote = time.monotonic()
                return True
            except OSError:
                return False

        def event(index, content, finish=None, first=False, logprobs=None):
            delta = ({'role': 'assistant'} if first else {}) | ({'content': content} if content is not None else {})
            choice = {'index': index, 'finish_reason': finish, 'logprobs': logprobs,
                      **({'delta': delta} if chat else {'text': content or ''})}
            write({'id': rid, 'object': kind + ('.chunk' if chat else ''), 'created': created, 'model': MODEL_ID,
                   'choices': [choice]})
        try:
            try:
                for g in gens:
                    if chat:
                        event(g.index, '', first=True)
                    echoed = len(g.prompt.echo_ids) if echo else 0
                    if echo:
                        event(g.index, g.prompt.echo_text, logprobs=logprobs_of(g, chat, echo, 0, echoed))
                    sent = echoed                           # tokens whose logprobs went out
                    for piece in g.pieces(listening):               # (ClientGone: it left)
                        event(g.index, piece, logprobs=logprobs_of(g, chat, echo, sent, echoed + g.shown))
                        sent = echoed + g.shown
                    # the finish carries what no piece of text did (a completion's stop token)
                    rest = logprobs_of(g, chat, echo, sent) if echoed + g.shown > sent else None
                    empty = rest is None or chat and not rest['content']
                    event(g.index, None, g.finish, logprobs=None if empty else rest)
                if usage:
                    write({'id': rid, 'object': kind + ('.chunk' if chat else ''), 'created': created,
                           'model': MODEL_ID, 'choices': [], 'usage': usage_of(gens)})
            except ClientGone:                  # it left while no text was written (held back before a
                stop_generating(gens)           # possible stop string, say): free its blocks now
                self.close_connection = True
                return
            except Exception as e:              # refused mid-stream, or a bug of ours: said, then [DONE]
                if not isinstance(e, APIError):
                    traceback.print_exc()
                write((e if isinstance(e, APIError) else server_error(e)).body())
                stop_generating(gens)
            write('[DONE]')
        except (BrokenPipeError, ConnectionResetError):  # the client stopped listening: free its blocks
            stop_generating(gens)
        self.close_connection = True


def logprobs_of(g, chat, echo, a=0, b=None):
    """A choice's logprobs object in OpenAI's shape for its tokens a..b (echoed prompt tokens
    first; b None: every token its text shows), or None when the request asked for none."""
    if not g.asked:
        return None
    b = (len(g.prompt.echo_ids) if echo else 0) + g.shown if b is None else b
    rows = scored_tokens(g, echo, a, b, chat)
    return chat_logprobs(rows) if chat else completion_logprobs(rows)


def stop_generating(gens):
    """Cancel the choices still generating: the engine loop drops them and frees their blocks."""
    with cancel_lock:
        cancelled.update(g.id for g in gens if g.finish is None)


CHAT_PAGE = '''<!doctype html>
<html><head><meta charset="utf-8"><title>nano-kimi chat</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 1rem auto; padding: 0 1rem; }
#log .msg { white-space: pre-wrap; margin: .5rem 0; padding: .5rem .75rem; border-radius: .5rem; }
#log .user { background: #e8f0fe; } #log .assistant { background: #f1f3f4; }
form { display: flex; gap: .5rem; } textarea { flex: 1; height: 4rem; }
#settings { margin: .5rem 0; font-size: .9rem; } #settings input { width: 4.5rem; } .hint { color: #777; }
</style></head><body>
<h1>nano-kimi</h1><div id="model"></div>
<div id="log"></div>
<div id="settings">temperature <input id="temperature" type="number" step="0.1" value="PAGE_TEMPERATURE">
 top_p <input id="top_p" type="number" step="0.05" value="1.0">
 frequency penalty <input id="frequency_penalty" type="number" step="0.1" min="-2" max="2"
  value="PAGE_FREQUENCY_PENALTY">
 max tokens <input id="max_tokens" type="number" min="1" placeholder="auto">
 <span class="hint">Enter sends, Shift+Enter starts a new line</span></div>
<form id="form"><textarea id="input" placeholder="Write a story that uses the words: dog, ball, happy."></textarea>
<button id="send" type="submit">Send</button><button id="stop" type="button" disabled>Stop</button>
<button id="clear" type="button">Clear</button></form>
<script>
const log = document.getElementById('log'), input = document.getElementById('input');
const sendBtn = document.getElementById('send'), stopBtn = document.getElementById('stop');
let messages = [], controller = null, chat = true;
fetch('/v1/models').then(r => r.json()).then(j => { const m = j.data[0]; chat = m.chat !== false;
  document.getElementById('model').textContent = 'model: ' + m.id + (chat ? '' :
    ' (a pretrained model without the chat template: it continues the text you write)');
  if (!chat) input.placeholder = 'Once upon a time'; });
function add(role, text) { const d = document.createElement('div'); d.className = 'msg ' + role;
  d.textContent = text; log.appendChild(d); return d; }
document.getElementById('clear').onclick = () => { messages = []; log.innerHTML = ''; };
stopBtn.onclick = () => { if (controller) controller.abort(); };
input.addEventListener('keydown', (e) => {   // Enter sends (unless a reply is still streaming)
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault();
    if (!sendBtn.disabled) document.getElementById('form').requestSubmit(); } });
document.getElementById('form').onsubmit = async (e) => {
  e.preventDefault(); const text = input.value.trim(); if (!text) return;
  input.value = ''; messages.push({role: 'user', content: text}); add('user', text);
  const out = add('assistant', chat ? '' : text); let answer = '';
  controller = new AbortController(); sendBtn.disabled = true; stopBtn.disabled = false;
  const settings = {stream: true, temperature: +document.getElementById('temperature').value,
    top_p: +document.getElementById('top_p').value,
    frequency_penalty: +document.getElementById('frequency_penalty').value};
  const maxTokens = document.getElementById('max_tokens').value;   // empty: what the context leaves
  if (maxTokens) settings.max_tokens = +maxTokens;
  let failed = false;   // no answer: the user's turn leaves the conversation too (no empty assistant turn)
  try {   // a chat model answers the conversation; a pretrained one continues this message's text
    let sent = messages, res;
    while (true) {   // a conversation past the model's context: leave out its oldest turns until it fits
      res = await fetch(chat ? '/v1/chat/completions' : '/v1/completions', {method: 'POST',
        signal: controller.signal, headers: {'Content-Type': 'application/json'},
        body: JSON.stringify(chat ? {messages: sent, ...settings} : {prompt: text, ...settings})});
      if (res.ok || !chat || sent.length < 3) break;
      const error = (await res.clone().json()).error;
      if (error.code !== 'context_length_exceeded' || error.param !== 'messages') break;
      sent = sent.slice(2);
    }
    if (!res.ok) { out.textContent = (await res.json()).error.message; failed = true; return; }
    if (sent.length < messages.length) out.title = (messages.length - sent.length) +
      ' earlier messages were left out: the conversation is longer than the context of the model';
    const reader = res.body.getReader(), decoder = new TextDecoder(); let buf = '';
    while (true) { const {done, value} = await reader.read(); if (done) break;
      buf += decoder.decode(value, {stream: true}); const events = buf.split('\\n\\n'); buf = events.pop();
      for (const ev of events) { if (!ev.startsWith('data: ')) continue;   // (':' lines: comments)
        const data = ev.slice(6); if (data === '[DONE]') continue;
        const obj = JSON.parse(data);
        if (obj.error) { out.textContent = answer + ' [' + obj.error.message + ']'; continue; }
        const choice = obj.choices[0], piece = chat ? choice.delta.content : choice.text;
        if (piece) { answer += piece; out.textContent = (chat ? '' : text) + answer; } } }
  } catch (err) { if (err.name !== 'AbortError') { out.textContent = String(err); failed = !answer; } }
  finally { if (failed) messages.pop(); else messages.push({role: 'assistant', content: answer}); controller = null;
    sendBtn.disabled = false; stopBtn.disabled = true; }
};
</script></body></html>
'''

CHAT_PAGE = CHAT_PAGE.replace('PAGE_TEMPERATURE', f'{page_temperature:g}').replace(
    'PAGE_FREQUENCY_PENALTY', f'{page_frequency_penalty:g}')
try:
    server = ThreadingHTTPServer((host, port), Handler)
except OSError as e:
    sys.exit(port_error(e))
threading.Thread(target=engine_loop, daemon=True).start()
per_token = cache_numbers_per_token(model.config) * next(model.parameters()).element_size()
print(f"serving {out_dir} ({ckpt.get('stage', '?')} checkpoint, {model.num_params() / 1e6:.1f}M parameters) on "
      f"http://{host}:{server.server_address[1]}; KV cache: {n_blocks} blocks x {tokens_per_block} tokens, "
      f"{per_token:,} bytes per token ({n_blocks * tokens_per_block * per_token / 2**20:.1f} MiB); decode steps: "
      f"{engine.decode_mode()}; Ctrl-C stops it", flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    server.server_close()
    print(f"stopped. Prefix sharing (requests whose prompts begin alike share those cached blocks) reused "
          f"{engine.stats['reused_tokens']:,} of {engine.stats['prompt_tokens']:,} prompt tokens "
          f"({engine.hit_rate():.1%})")
