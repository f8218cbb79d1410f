"""serve.py with the official openai client on loopback: chat and text completions, streamed and
not, n, seed, stop strings, frequency and presence penalties, logprobs and echo, /v1/models,
/health, the tokenizer's endpoints, the chat page; concurrent requests are batched by the engine
and get the greedy answers of generate_chat; bad requests get OpenAI's error shape, a client that
leaves mid-stream frees its blocks, an engine step that fails answers 500 to the requests in
flight and the server goes on (and so does a request whose own thread fails: a 500), and a load
of 32 clients x 10 requests gets each request's answer alone."""

import concurrent.futures
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO

openai = pytest.importorskip('openai')


def start_server(pipeline, out_dir, python=(), args=()):
    """serve.py on a checkpoint of the tiny pipeline, on a free port: (process, its url). python:
    the interpreter's arguments before the script's (e.g. ('-c', code) that runs serve.py itself)."""
    proc = subprocess.Popen([sys.executable, *python, os.path.join(REPO, 'serve.py'), f'--out_dir={out_dir}', '--port=0',
                             '--device=cpu', '--n_blocks=64', '--tokens_per_block=8', '--default_max_tokens=12', *args],
                            cwd=pipeline, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'))
    line = ''
    while 'serving' not in line and proc.poll() is None:
        line = proc.stdout.readline()
    assert 'serving' in line, line + proc.stderr.read()
    return proc, line.split(' on ')[1].split(';')[0]


@pytest.fixture(scope='module')
def server(pipeline):
    """serve.py on the tiny pipeline's SFT-style model (the base model with the chat template's
    tokens: sft.py adds them)."""
    from conftest import run_script
    if not (pipeline / 'sft_serve').exists():
        run_script('sft.py', '--init_from=base', '--out_dir=sft_serve', '--task_dir=inst', '--max_iters=2',
                   '--eval_interval=2', '--batch_size=2', '--block_size=96', '--eval_prompts=1', '--max_new_tokens=4',
                   '--compile=False', '--device=cpu', '--peak_flops=1e12', cwd=pipeline)
    proc, url = start_server(pipeline, 'sft_serve')
    yield url, pipeline
    proc.terminate()
    proc.wait(timeout=30)


def client(url):
    return openai.OpenAI(base_url=url + '/v1', api_key='none')


@contextlib.contextmanager
def chat_page(url):
    """The server's chat page in headless Chromium (skipped without playwright or chromium)."""
    sync_api = pytest.importorskip('playwright.sync_api', reason='needs pip install playwright')
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    if not chromium:
        pytest.skip("needs Debian's chromium (apt-get install chromium), as .ci/run installs it")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=['--no-sandbox'])
        page = browser.new_page()
        page.goto(url + '/')
        yield page
        browser.close()


def send(page, text, max_tokens=12):
    """Type `text` into the page and send it, greedy, at most max_tokens new tokens."""
    page.fill('#temperature', '0')
    page.fill('#max_tokens', str(max_tokens))
    page.fill('#input', text)
    page.click('#send')


def test_chat_completions_streamed_and_not_equal_the_engine_free_greedy_answer(server):
    url, pipeline = server
    c = client(url)
    msgs = [{'role': 'user', 'content': 'Write a story that uses the words: fox, key.'}]
    r = c.chat.completions.create(model='sft_serve', messages=msgs, max_tokens=10, temperature=0)
    answer = r.choices[0].message.content
    assert r.object == 'chat.completion' and r.choices[0].finish_reason in ('stop', 'length')
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 0
    from checkpoint import load_model
    from generate import generate_chat
    model, tok, _ = load_model(str(pipeline / 'sft_serve'))
    expected = generate_chat(model.eval(), tok, [msgs[0]['content']], 10, 0.0)[0]['text']
    assert answer == expected
    pieces = [ch.choices[0].delta.content or '' for ch in c.chat.completions.create(
        model='sft_serve', messages=msgs, max_tokens=10, temperature=0, stream=True)]
    assert ''.join(pieces) == answer and len(pieces) > 2


def test_completions_n_seed_stop_strings_and_penalties(server):
    url, pipeline = server
    c = client(url)
    a = c.completions.create(model='sft_serve', prompt='Once upon a time', max_tokens=12, temperature=1.0, n=2, seed=7)
    b = c.completions.create(model='sft_serve', prompt='Once upon a time', max_tokens=12, temperature=1.0, n=2, seed=7)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 2
    full = c.completions.create(model='sft_serve', prompt='Once upon a time', max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    cut = c.completions.create(model='sft_serve', prompt='Once upon a time', max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == 'stop'
    streamed = ''.join(ch.choices[0].text for ch in c.completions.create(
        model='sft_serve', prompt='Once upon a time', max_tokens=12, temperature=0, stream=True))
    assert streamed == full
    # n = 2: each choice ends at its stop string as its tokens come, though the choices are read one
    # after the other (here choice 1 stops early while choice 0 runs to max_tokens)
    both = c.completions.create(model='sft_serve', prompt='Once upon a time', max_tokens=40, temperature=1.0, n=2,
                                seed=7).choices
    mark = next(both[1].text[i:i + 3] for i in range(len(both[1].text)) if both[1].text[i:i + 3] not in both[0].text)
    before = health(url)['cancelled']
    cut = c.completions.create(model='sft_serve', prompt='Once upon a time', max_tokens=40, temperature=1.0, n=2,
                               seed=7, stop=[mark]).choices
    assert (cut[0].text, cut[0].finish_reason) == (both[0].text, both[0].finish_reason)
    assert (cut[1].text, cut[1].finish_reason) == (both[1].text[:both[1].text.index(mark)], 'stop')
    assert health(url)['cancelled'] == before + 1                    # freed at the stop, not run to the end
    # OpenAI's penalties reach the engine: the greedy answer of generate_chat with the same penalties
    msgs = [{'role': 'user', 'content': 'Write a story that uses the words: fox, key.'}]
    from checkpoint import load_model
    from generate import generate_chat
    model, tok, _ = load_model(str(pipeline / 'sft_serve'))
    for kw in (dict(frequency_penalty=1.5), dict(presence_penalty=2.0, frequency_penalty=-0.5)):
        got = c.chat.completions.create(model='sft_serve', messages=msgs, max_tokens=12, temperature=0, **kw)
        assert got.choices[0].message.content == generate_chat(model.eval(), tok, [msgs[0]['content']], 12, 0.0,
                                                                **kw)[0]['text'], kw
    assert generate_chat(model, tok, [msgs[0]['content']], 12, 0.0, frequency_penalty=1.5)[0]['text'] != \
        generate_chat(model, tok, [msgs[0]['content']], 12, 0.0)[0]['text']


def test_concurrent_requests_models_health_and_the_chat_page(server):
    url, _ = server
    c = client(url)
    prompts = [f'Write a story that uses the words: {w}.' for w in ('dog', 'sun', 'cake', 'tree', 'ball', 'bird')]
    one = lambda p: c.chat.completions.create(model='sft_serve', messages=[{'role': 'user', 'content': p}],  # noqa: E731
                                              max_tokens=8, temperature=0).choices[0].message.content
    alone = [one(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(one, prompts))
    assert together == alone
    assert [m.id for m in c.models.list().data] == ['sft_serve']
    health = json.load(urllib.request.urlopen(url + '/health'))
    assert health['status'] == 'ok' and health['running'] == health['waiting'] == 0
    assert health['free_blocks'] == health['blocks'] == 64
    page = urllib.request.urlopen(url + '/').read().decode()
    assert '<textarea' in page and '/v1/chat/completions' in page and 'stream: true' in page
    with pytest.raises(openai.BadRequestError, match='must end with a user message'):
        c.chat.completions.create(model='sft_serve', messages=[{'role': 'assistant', 'content': 'hi'}])


def post(url, path, body):
    """POST body (bytes, or an object sent as JSON): (HTTP status, the JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_bad_requests_get_a_4xx_in_openais_error_shape_and_the_server_keeps_serving(server):
    url, _ = server
    chat, text = '/v1/chat/completions', '/v1/completions'
    hello = [{'role': 'user', 'content': 'Write a story that uses the words: fox.'}]
    cases = [  # (path, body, status, the error's param, its code)
        (chat, b'{"messages": [', 400, None, None),                                  # malformed JSON
        (chat, [1, 2], 400, None, None),                                              # not an object
        (chat, {'model': 'sft_serve'}, 400, 'messages', None),                        # no messages
        (chat, {'messages': [{'content': 'hi'}]}, 400, 'messages', None),             # no role
        (chat, {'messages': [{'role': 'user', 'content': 7}]}, 400, 'messages', None),
        (chat, {'model': 'gpt-4o', 'messages': hello}, 404, 'model', 'model_not_found'),
        (text, {'prompt': 'x' * 300}, 400, 'prompt', 'context_length_exceeded'),     # context is 256 bytes
        (text, {'prompt': 'Once', 'max_tokens': 10_000}, 400, 'max_tokens', 'context_length_exceeded'),
        (text, {'prompt': 'Once', 'max_tokens': 0}, 400, 'max_tokens', None),
        (text, {'prompt': 'Once', 'max_tokens': 'ten'}, 400, 'max_tokens', None),
        (chat, {'messages': hello, 'temperature': -0.5}, 400, 'temperature', None),
        (chat, {'messages': hello, 'top_p': 0}, 400, 'top_p', None),
        (chat, {'messages': hello, 'n': 0}, 400, 'n', None),
        (chat, {'messages': hello, 'frequency_penalty': 2.5}, 400, 'frequency_penalty', None),
        (chat, b'{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": NaN}', 400,
         'frequency_penalty', None),                                  # JSON's NaN: every comparison false
        (chat, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400, 'temperature', None),
        (chat, {'messages': hello, 'logprobs': 3}, 400, 'logprobs', None),           # chat's is true / false
        (chat, {'messages': hello, 'top_logprobs': 2}, 400, 'top_logprobs', None),    # without logprobs: true
        (chat, {'messages': hello, 'logprobs': True, 'top_logprobs': 21}, 400, 'top_logprobs', None),
        (chat, {'messages': hello, 'echo': True}, 400, 'echo', 'unrecognized_parameter'),   # completions'
        (text, {'prompt': 'Once', 'logprobs': 6}, 400, 'logprobs', None),             # OpenAI's 0..5
        (text, {'prompt': 'Once', 'logprobs': True}, 400, 'logprobs', None),
        (text, {'prompt': 'Once', 'echo': 1}, 400, 'echo', None),
        (text, {'prompt': 'Once', 'top_logprobs': 2}, 400, 'top_logprobs', 'unrecognized_parameter'),   # chat's
        (text, {'prompt': [65, 10 ** 6]}, 400, 'prompt', None),                       # an id past the vocabulary
        (text, {'prompt': []}, 400, 'prompt', None),
        (text, {'prompt': ['Once', 7]}, 400, 'prompt', None),
        (text, {'prompt': '\ud800'}, 400, 'prompt', None),                          # a lone surrogate: no UTF-8
        (text, {'prompt': 'Once', 'echo': None, 'logprobs': None, 'max_tokens': 0}, 400, 'max_tokens', None),
        (chat, {'messages': hello, 'tools': [{'type': 'function'}]}, 400, 'tools', 'unsupported_parameter'),
        (text, {'prompt': 'Once', 'suffix': 'end'}, 400, 'suffix', 'unsupported_parameter'),
        (chat, {'messages': hello, 'stream_options': {'x': 1}}, 400, 'stream_options', 'unsupported_parameter'),
        (chat, {'messages': hello, 'top_k': 5}, 400, 'top_k', 'unrecognized_parameter'),   # not silently ignored
        (chat, {'messages': hello, 'prompt': 'Once'}, 400, 'prompt', 'unrecognized_parameter'),   # completions'
        (chat, {'messages': hello, 'presence_penalty': -3}, 400, 'presence_penalty', None),
        (chat, {'messages': hello, 'stop': 5}, 400, 'stop', None),
        (text, {'prompt': 7}, 400, 'prompt', None),
        # a JSON integer too large for a float (isfinite raised OverflowError: no reply at all)
        (text, {'prompt': 'Once', 'max_tokens': 10 ** 400}, 400, 'max_tokens', 'context_length_exceeded'),
        (text, {'prompt': 'Once', 'seed': 10 ** 400}, 400, 'seed', None),
        (chat, b'[' * 100_000 + b']' * 100_000, 400, None, None),           # too deep for json: no reply
        (text, {'prompt': 'Once', 'stop': ['a', 'b', 'c', 'd', 'e']}, 400, 'stop', None),   # OpenAI's 4
        (text, {'prompt': 'Once', 'stop': False}, 400, 'stop', None),                     # (was ignored)
        (chat, {'messages': hello, 'stream_options': {'include_usage': True}}, 400, 'stream_options', None),
    ]
    for path, body, status, param, code in cases:
        got, answer = post(url, path, body)
        assert got == status, (body, answer)
        error = answer['error']
        assert error['type'] == 'invalid_request_error' and error['message'], (body, answer)
        assert (error['param'], error['code']) == (param, code), (body, answer)
    got, answer = post(url, text, {'prompt': ['Once', 'x' * 300]})        # which of several prompts
    assert got == 400 and answer['error']['message'].startswith('prompt[1] is 301 tokens'), answer
    got, answer = post(url, '/v1/nothing', {})
    assert got == 404 and 'no route' in answer['error']['message']
    c = client(url)                                                   # the openai client's view of it
    with pytest.raises(openai.NotFoundError, match='does not exist'):
        c.chat.completions.create(model='gpt-4o', messages=hello)
    with pytest.raises(openai.BadRequestError, match='temperature'):
        c.chat.completions.create(model='sft_serve', messages=hello, temperature=-1)
    # still serving: a good request (the model named, or left out) gets the greedy answer
    status, good = post(url, chat, {'messages': hello, 'max_tokens': 6, 'temperature': 0})
    assert status == 200 and good['choices'][0]['message']['content'] == c.chat.completions.create(
        model='sft_serve', messages=hello, max_tokens=6, temperature=0).choices[0].message.content
    status, developer = post(url, chat, {'messages': [{'role': 'developer', 'content': 'Be brief.'}, *hello],
                                         'max_tokens': 6, 'temperature': 0})    # OpenAI's newer name for system
    as_system = post(url, chat, {'messages': [{'role': 'system', 'content': 'Be brief.'}, *hello], 'max_tokens': 6,
                                 'temperature': 0})[1]
    assert status == 200 and developer['choices'][0]['message'] == as_system['choices'][0]['message']
    status, plain = post(url, chat, {'messages': hello, 'max_tokens': 6, 'temperature': 0, 'logprobs': False,
                                     'response_format': {'type': 'text'}, 'user': 'u1'})   # asking for nothing
    assert status == 200 and plain['choices'][0]['message'] == good['choices'][0]['message']
    conn = http.client.HTTPConnection(url.split('//')[1])   # one kept-alive connection, as the openai client's
    conn.request('POST', '/v1/embeddings', body=json.dumps({'input': 'x' * 500}), headers={'Content-Type': 'application/json'})
    first = conn.getresponse()
    assert first.status == 404 and json.loads(first.read())['error']['code'] == 'not_found'
    conn.request('POST', chat, body=json.dumps({'messages': hello, 'max_tokens': 6, 'temperature': 0}),
                 headers={'Content-Type': 'application/json'})
    second = conn.getresponse()                              # the 404's body did not become this request
    assert second.status == 200 and json.loads(second.read())['choices'][0]['message'] == good['choices'][0]['message']
    conn.close()
    for length in ('ten', '-1'):                             # -1: read(-1) would wait for the connection to close
        conn = http.client.HTTPConnection(url.split('//')[1], timeout=30)
        conn.putrequest('POST', chat)
        conn.putheader('Content-Length', length)
        conn.endheaders()
        bad = conn.getresponse()
        assert bad.status == 400 and 'Content-Length' in json.loads(bad.read())['error']['message']
        conn.close()
    conn = http.client.HTTPConnection(url.split('//')[1], timeout=30)      # a body in chunks (no Content-Length)
    request = json.dumps({'messages': hello, 'max_tokens': 6, 'temperature': 0}).encode()
    for _ in range(2):                                                      # (and the connection kept alive)
        conn.request('POST', chat, body=iter([request[:10], request[10:]]),
                     headers={'Content-Type': 'application/json'}, encode_chunked=True)
        chunked = conn.getresponse()
        assert chunked.status == 200
        assert json.loads(chunked.read())['choices'][0]['message'] == good['choices'][0]['message']
    conn.close()
    host, port = url.split('//')[1].split(':')
    with socket.create_connection((host, int(port))) as sock:                # chunks of no hex size: a 400
        sock.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n')
        sock.settimeout(30)
        reply = b''
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b'HTTP/1.1 400') and b'chunked encoding' in reply, reply
    chunks = list(c.chat.completions.create(model='sft_serve', messages=hello, max_tokens=6, temperature=0,
                                            stream=True, stream_options={'include_usage': True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == good['usage']['completion_tokens']
    assert all(ch.usage is None for ch in chunks[:-1])
    parts = [{'role': 'user', 'content': [{'type': 'text', 'text': 'Write a story that uses '},
                                          {'type': 'text', 'text': 'the words: fox.'}]}]   # OpenAI's content parts
    status, same = post(url, chat, {'messages': parts, 'max_tokens': 6, 'temperature': 0})
    assert status == 200 and same['choices'][0]['message'] == good['choices'][0]['message']


def health(url):
    return json.load(urllib.request.urlopen(url + '/health'))


def test_a_port_another_server_holds_is_an_error_before_the_model_loads(tmp_path):
    """serve.py on a port something already listens on: one line naming the port and --port,
    at once (before it loads a model: here there is none to load)."""
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, os.path.join(REPO, 'serve.py'), f'--port={port}',
                            f'--out_dir={tmp_path / "none"}'], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    assert f'error: cannot serve on 127.0.0.1:{port} (Address already in use)' in p.stderr and '--port=N' in p.stderr
    p = subprocess.run([sys.executable, os.path.join(REPO, 'serve.py'), '--port=70000', f'--out_dir={tmp_path}'],
                       cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip() == 'error: --port=70000 is not a TCP port (0..65535; 0: any free one)'


def test_the_tokenizer_endpoints_and_kept_alive_replies_without_nagles_delay(server):
    """/tokenizer_info, /tokenize (special tokens' names read as their ids) and /detokenize, as vLLM
    answers them (lm-evaluation-harness tokenizes through them); bad input gets a 400. Twenty
    requests on one kept-alive connection take well under the 40 ms each that a reply written as
    headers then body waited for the client's delayed ACK with Nagle's algorithm on (0.84 s in all
    before TCP_NODELAY, 0.02 s after, on loopback)."""
    from checkpoint import load_model
    url, pipeline = server
    model, tok, _ = load_model(str(pipeline / 'sft_serve'))
    context = model.config.block_size
    info = json.load(urllib.request.urlopen(url + '/tokenizer_info'))
    assert info['eos_token'] == '<|endoftext|>' and info['model_max_length'] == context and info['vocab_size'] == 260
    status, body = post(url, '/tokenize', {'prompt': 'Hi<|endoftext|>fox<|end|>', 'add_special_tokens': False})
    assert status == 200 and body['tokens'] == tok.encode('Hi') + [tok.eot_id] + tok.encode('fox') + [259]
    assert body['count'] == len(body['tokens']) and body['max_model_len'] == context
    assert post(url, '/detokenize', {'tokens': body['tokens']}) == (200, {'prompt': 'Hi<|endoftext|>fox<|end|>'})
    for path, bad, param in (('/tokenize', {'prompt': 7}, 'prompt'), ('/detokenize', {'tokens': [1, 999]}, 'tokens'),
                             ('/detokenize', {'tokens': 'ab'}, 'tokens'), ('/tokenize', [1], None),
                             ('/tokenize', {'prompt': '\ud800'}, 'prompt')):
        status, answer = post(url, path, bad)
        assert status == 400 and answer['error']['param'] == param, (path, bad, answer)
    conn = http.client.HTTPConnection(url.split('//')[1], timeout=30)
    start = time.perf_counter()
    for _ in range(20):
        conn.request('POST', '/tokenize', body=json.dumps({'prompt': 'fox'}),
                     headers={'Content-Type': 'application/json'})
        assert json.loads(conn.getresponse().read())['tokens'] == tok.encode('fox')
    assert time.perf_counter() - start < 0.4
    conn.close()


def token_name(raw):
    """A token's text in OpenAI's logprobs: its bytes as UTF-8, or 'bytes:\\xNN' where they are
    part of a character."""
    try:
        return bytes(raw).decode('utf-8')
    except UnicodeDecodeError:
        return 'bytes:' + ''.join(f'\\x{b:02x}' for b in raw)


EOT_FIRST = """
import runpy, sys
sys.path.insert(0, sys.argv[1].rsplit('/', 1)[0])
import checkpoint
load_model = checkpoint.load_model
def eot_first(*args, **kw):            # the model's logits with the end-of-text token's raised by 50
    model, tok, ckpt = load_model(*args, **kw)
    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., tok.eot_id] += 50
        return logits
    model.lm_head.register_forward_hook(hook)
    return model, tok, ckpt
checkpoint.load_model = eot_first
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_a_stop_token_keeps_its_logprob_so_lm_eval_drops_the_right_one(server):
    """A completion whose generated token is the end-of-text token (here every one: its logit is
    raised by 50) keeps it in logprobs, though not in the text: lm-evaluation-harness sums
    token_logprobs[ctxlen:-1], taking the last entry for the generated token; without it, the
    last continuation token was dropped instead. Streamed, the stop token's logprob comes with
    the finishing chunk."""
    _, pipeline = server
    proc, url = start_server(pipeline, 'sft_serve', python=('-c', EOT_FIRST))
    try:
        from checkpoint import load_model
        _, tok, _ = load_model(str(pipeline / 'sft_serve'))
        context, continuation = tok.encode('Tom had a red'), tok.encode(' ball')
        ids = [tok.eot_id] + context + continuation
        status, body = post(url, '/v1/completions', {'prompt': [ids], 'max_tokens': 1, 'logprobs': 1, 'echo': True,
                                                     'temperature': 0})
        choice = body['choices'][0]
        assert status == 200 and choice['finish_reason'] == 'stop' and choice['text'] == tok.decode(ids)
        got = choice['logprobs']
        assert len(got['token_logprobs']) == len(ids) + 1 and got['tokens'][-1] == '<|endoftext|>'
        assert got['text_offset'][-1] == len(choice['text']) and body['usage']['completion_tokens'] == 1
        assert got['token_logprobs'][-1] == max(got['top_logprobs'][-1].values()) > -1e-3   # all but certain
        continuation_logprob = sum(got['token_logprobs'][1 + len(context):-1])    # lm-eval's sum
        assert continuation_logprob == sum(got['token_logprobs'][-1 - len(continuation):-1]) < -1
        chunks = [ch.choices[0] for ch in client(url).completions.create(
            model='sft_serve', prompt='Tom', max_tokens=4, logprobs=0, temperature=0, stream=True)]
        assert ''.join(ch.text for ch in chunks) == '' and chunks[-1].finish_reason == 'stop'
        assert chunks[-1].logprobs.tokens == ['<|endoftext|>']
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_logprobs_of_answers_and_echoed_prompts_are_the_models(server):
    """logprobs through the openai client are the model's log-probabilities (one forward pass over
    prompt and answer): a completion's, with echo its prompt's too, each top list holding its
    chosen token, greedy's chosen token the likeliest; a chat answer's with top_logprobs; streamed
    chunks carry the same numbers; a prompt of token ids (as lm-evaluation-harness sends it, read
    as given: its first token has none), several prompts in one request each get their choice; a
    stop string cuts the tokens with the text."""
    import torch
    from checkpoint import load_model
    url, pipeline = server
    c = client(url)
    model, tok, _ = load_model(str(pipeline / 'sft_serve'))

    def reference(ids):                 # log p(ids[t + 1] | ids[:t + 1]) for each t, over the tokenizer's ids
        with torch.no_grad():           # (the model's vocabulary padding left out, as it is never sampled)
            lp = torch.log_softmax(model.eval()(torch.tensor([ids]))[0][0, :, :tok.vocab_size].float(), -1)
        return [lp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]

    def close(a, b):
        return len(a) == len(b) and all((x is None and y is None) or abs(x - y) < 1e-4 for x, y in zip(a, b))

    r = c.completions.create(model='sft_serve', prompt='Once upon', max_tokens=8, temperature=0, logprobs=2, echo=True)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text.startswith('Once upon') and len(text) > len('Once upon')
    ids = [tok.eot_id] + tok.encode(text)                 # (the byte tokenizer: one token per character)
    assert ''.join(lp.tokens) == text and close(lp.token_logprobs, reference(ids))   # the EOT before: no None
    assert lp.text_offset == [len(''.join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert t in top and top[t] == v and 2 <= len(top) <= 3
    answer = slice(len('Once upon'), None)
    assert all(v == max(top.values()) for v, top in zip(lp.token_logprobs[answer], lp.top_logprobs[answer]))
    streamed = [ch.choices[0].logprobs for ch in c.completions.create(
        model='sft_serve', prompt='Once upon', max_tokens=8, temperature=0, logprobs=2, echo=True, stream=True)
        if ch.choices[0].logprobs is not None]
    assert sum((s.tokens for s in streamed), []) == lp.tokens and close(sum((s.token_logprobs for s in streamed), []),
                                                                       lp.token_logprobs)
    # lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs=1, max_tokens=1; the
    # continuation's log-likelihood is the sum over its tokens (the last token, generated, left out)
    context, continuation = tok.encode('Once upon a'), tok.encode(' time')
    batch = [[tok.eot_id] + context + continuation, tok.encode('The fox')]
    status, body = post(url, '/v1/completions', {'model': 'sft_serve', 'prompt': batch, 'temperature': 0,
                                                 'max_tokens': 1, 'logprobs': 1, 'echo': True, 'seed': 1234})
    assert status == 200 and [ch['index'] for ch in body['choices']] == [0, 1]
    assert body['choices'][0]['logprobs']['text_offset'][:2] == [0, len('<|endoftext|>')]   # its text holds the name
    for ch, ids in zip(body['choices'], batch):
        got = ch['logprobs']['token_logprobs']
        assert got[0] is None and close(got[1:len(ids)], reference(ids)) and len(got) == len(ids) + 1
        assert ch['text'].startswith(tok.decode(ids))
    loglikelihood = sum(body['choices'][0]['logprobs']['token_logprobs'][1 + len(context):-1])
    assert abs(loglikelihood - sum(reference(batch[0])[len(context):])) < 1e-4
    assert body['usage']['prompt_tokens'] == len(batch[0]) + len(batch[1])
    # n choices of each prompt (the engine scores the prompt once, for its first choice; the rest
    # carry the same scores), streamed and not, two prompts of text at once
    for stream in (False, True):
        many = c.completions.create(model='sft_serve', prompt=['Once upon', 'A cat'], max_tokens=3, temperature=1.0,
                                    n=2, seed=5, logprobs=1, echo=True, stream=stream)
        got = {}
        for ch in (many if stream else [many]):
            for choice in ch.choices:
                if choice.logprobs is not None:
                    got.setdefault(choice.index, []).extend(choice.logprobs.token_logprobs)
        assert sorted(got) == [0, 1, 2, 3]
        for i, text in enumerate(['Once upon', 'Once upon', 'A cat', 'A cat']):
            assert close(got[i][:len(text)], reference([tok.eot_id] + tok.encode(text))), (stream, i)
    # a chat answer, streamed and not
    msgs = [{'role': 'user', 'content': 'Write a story that uses the words: fox, key.'}]
    r = c.chat.completions.create(model='sft_serve', messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    answer_ids = [b for e in content for b in e.bytes]    # (the byte tokenizer: a token's id is its byte)
    prompt_ids = tok.encode_messages([{'role': 'user', 'content': msgs[0]['content']}])
    assert tok.decode(answer_ids) == r.choices[0].message.content
    assert all(e.token == token_name(e.bytes) for e in content)
    assert close([e.logprob for e in content], reference(prompt_ids + answer_ids)[len(prompt_ids) - 1:])
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in content)
    chunks = [ch.choices[0].logprobs for ch in c.chat.completions.create(
        model='sft_serve', messages=msgs, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        if ch.choices and ch.choices[0].logprobs is not None]
    assert [e.model_dump() for ch in chunks for e in ch.content] == [e.model_dump() for e in content]
    plain = c.chat.completions.create(model='sft_serve', messages=msgs, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    # a stop string cuts the tokens where it cuts the text
    full = c.completions.create(model='sft_serve', prompt='Once upon', max_tokens=12, temperature=0).choices[0].text
    cut = c.completions.create(model='sft_serve', prompt='Once upon', max_tokens=12, temperature=0, logprobs=0,
                               stop=[full[4:6]]).choices[0]
    kept = full[:full.index(full[4:6])]
    assert cut.text == kept and cut.logprobs.tokens == list(kept) and len(cut.logprobs.top_logprobs[0]) == 1


def test_a_client_that_leaves_mid_stream_frees_its_blocks(server):
    url, _ = server
    before = health(url)['cancelled']
    host, port = url.removeprefix('http://').split(':')
    body = json.dumps({'prompt': 'Once upon a time', 'max_tokens': 200, 'temperature': 0, 'stream': True})
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f'POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n'
                     f'Content-Length: {len(body)}\r\n\r\n{body}'.encode())
        got = b''
        while b'data: ' not in got:                                     # the first piece has come ...
            got += sock.recv(4096)
        assert got.startswith(b'HTTP/1.1 200')
    # ... and the client has left
    for _ in range(200):
        h = health(url)
        if h['running'] == h['waiting'] == 0:
            break
        time.sleep(0.05)
    assert h['running'] == h['waiting'] == 0 and h['free_blocks'] == h['blocks']
    assert h['cancelled'] == before + 1                                 # stopped early, not run to the end


# serve.py with an engine whose step fails (as out of memory would) while a request of 13 tokens runs,
# and whose admission fails for a request of 11
FAILING_ENGINE = """
import runpy, sys, time, types
sys.path.insert(0, sys.argv[1].rsplit('/', 1)[0])
import engine
step, add = engine.Engine.step, engine.Engine.add
def failing_step(self):
    if any(r.max_new_tokens == 13 for r in self.running):
        raise RuntimeError('out of memory (made by the test)')
    return step_with_bytes(self)
def step_with_a_chat_tag(self):     # a request of 7 tokens samples <|user|> first (ids: user, assistant, end)
    events = failing_step(self)
    return [(r, r.stop_ids[0] - 2 if r.max_new_tokens == 7 and len(r.output) == 1 else t, f) for r, t, f in events]
def slow_step(self):                # a request of 97 tokens: a step every 0.05 s (its client has time to leave);
    if any(r.max_new_tokens in (95, 97) for r in self.running):     # one of 95: its first token, again and again
        time.sleep(0.05)
    return [(r, r.output[0] if r.max_new_tokens == 95 and t is not None and not f else t, f) for r, t, f in step(self)]
def step_with_a_bad_event(self):   # a request of 9 tokens: an event the server cannot deliver (no such request)
    events = step_with_a_bad_token(self)
    ghost = [(types.SimpleNamespace(id='ghost', stop_ids=r.stop_ids, prompt_logprobs=None), 5, False)
             for r in self.running if r.max_new_tokens == 9]
    return events + ghost[:1]
def step_with_bytes(self):   # a request of 76 tokens: the bytes of 'hé, héllo wörld. ' (the byte tokenizer's ids)
    script = list('hé, héllo wörld. '.encode()) * 4
    return [(r, script[len(r.output) - 1] if r.max_new_tokens == 76 and t not in (None, *r.stop_ids) else t, f)
            for r, t, f in slow_step(self)]
def step_with_a_bad_token(self):   # a request of 5 tokens: an id no tokenizer has (its HTTP thread fails to decode it)
    events = step_with_a_chat_tag(self)
    return [(r, 10 ** 9 if r.max_new_tokens == 5 and len(r.output) == 2 else t, f) for r, t, f in events]
def failing_add(self, prompt, max_new_tokens, **kw):
    if max_new_tokens == 11 or kw.get('seed') == 101:       # (seed 101: choice 1 of a request of seed 100)
        raise RuntimeError('no memory to admit it (made by the test)')
    return add(self, prompt, max_new_tokens, **kw)
engine.Engine.step, engine.Engine.add = step_with_a_bad_event, failing_add
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_an_engine_step_that_fails_answers_500_to_the_requests_in_flight_and_the_server_goes_on(server):
    _, pipeline = server
    proc, url = start_server(pipeline, 'sft_serve', python=('-c', FAILING_ENGINE))
    try:
        body = {'prompt': 'Once upon a time', 'temperature': 0}
        status, answer = post(url, '/v1/completions', {**body, 'max_tokens': 13})
        assert status == 500, answer
        error = answer['error']
        assert (error['type'], error['code']) == ('server_error', 'engine_error')
        assert "out of memory (made by the test)" in error['message']
        with pytest.raises(openai.APIError, match="out of memory"):   # streamed: the error comes as an event
            for _ in client(url).completions.create(model='sft_serve', prompt='Once upon a time', max_tokens=13,
                                                    temperature=0, stream=True):
                pass
        status, answer = post(url, '/v1/completions', {**body, 'max_tokens': 9})    # the server's own loop fails
        assert status == 500 and 'the engine failed: KeyError' in answer['error']['message'], answer
        status, answer = post(url, '/v1/completions', {**body, 'max_tokens': 11})   # not even admitted
        assert status == 500 and 'no memory to admit it' in answer['error']['message'], answer
        # n = 2, the second choice not admitted: a 500, and the first, already running, stops too
        before = health(url)['cancelled']
        status, answer = post(url, '/v1/completions', {**body, 'max_tokens': 200, 'n': 2, 'seed': 100})
        assert status == 500 and 'no memory to admit it' in answer['error']['message'], answer
        for _ in range(600):
            if health(url)['running'] == 0:
                break
            time.sleep(0.05)
        assert health(url)['cancelled'] == before + 1          # cancelled, not run to its 200 tokens
        # a non-streaming client that leaves before its answer is ready: its request is cancelled
        before = health(url)['cancelled']
        host, port = url.split('//')[1].split(':')
        request = json.dumps({**body, 'max_tokens': 97}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                         + f'Content-Length: {len(request)}\r\n\r\n'.encode() + request)
            for _ in range(100):
                if health(url)['running']:
                    break
                time.sleep(0.02)
        for _ in range(300):                     # 97 steps of 0.05 s would end after about 5 s
            if health(url)['running'] == 0:
                break
            time.sleep(0.02)
        assert health(url)['cancelled'] == before + 1
        # a request whose HTTP thread fails (a bug of ours, here a token it cannot decode): a 500 that says
        # so, its blocks freed, and the server goes on
        status, answer = post(url, '/v1/completions', {**body, 'max_tokens': 5})
        assert status == 500, answer
        assert (answer['error']['type'], answer['error']['code']) == ('server_error', 'server_error'), answer
        assert answer['error']['message'].startswith('the server failed on this request'), answer
        for _ in range(300):
            if health(url)['running'] == 0:
                break
            time.sleep(0.02)
        assert health(url)['running'] == 0
        # a client that closes only its sending side (as nc does) still reads: its stream goes on to the end
        request = json.dumps({**body, 'max_tokens': 6, 'stream': True}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                         + f'Content-Length: {len(request)}\r\n\r\n'.encode() + request)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(30)
            got = b''
            while chunk := sock.recv(4096):
                got += chunk
        assert b'"finish_reason": "length"' in got and got.endswith(b'data: [DONE]\n\n'), got
        # a stop string is looked for in whole characters: the first byte of 'é' alone (U+FFFD for now)
        # does not match a stop of U+FFFD, streamed or not
        status, answer = post(url, '/v1/completions', {**body, 'max_tokens': 76})
        text = answer['choices'][0]['text']
        assert text.startswith('hé, héllo wörld. hé') and '\ufffd' not in text, answer
        status, answer = post(url, '/v1/completions', {**body, 'max_tokens': 76, 'stop': '\ufffd'})
        assert (answer['choices'][0]['text'], answer['choices'][0]['finish_reason']) == (text, 'length'), answer
        pieces = [c.choices[0].text for c in client(url).completions.create(
            model='sft_serve', prompt=body['prompt'], max_tokens=76, temperature=0, stop='\ufffd', stream=True)]
        assert ''.join(pieces) == text
        status, good = post(url, '/v1/completions', {**body, 'max_tokens': 6})   # still serving
        assert status == 200 and good['choices'][0]['finish_reason'] == 'length'
        # a streaming client that leaves while no text is written (every piece held back, since the answer
        # ends with the start of a stop string: the first token's text again and again, the stop string
        # that text and a character that never comes): its request is cancelled too
        first = post(url, '/v1/completions', {**body, 'max_tokens': 1})[1]['choices'][0]['text']
        before = health(url)['cancelled']
        request = json.dumps({**body, 'max_tokens': 95, 'stream': True, 'stop': [first + '\x07']}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                         + f'Content-Length: {len(request)}\r\n\r\n'.encode() + request)
            headers = b''
            while b'\r\n\r\n' not in headers:
                headers += sock.recv(4096)
            time.sleep(0.5)
            sock.settimeout(0.1)
            got = b''
            with contextlib.suppress(socket.timeout):
                while chunk := sock.recv(4096):
                    got += chunk
            assert b'data:' not in got and b':\n\n' in got, got  # no text yet (held back): comments alone
        for _ in range(300):                     # 95 steps of 0.05 s would end after about 5 s
            if health(url)['running'] == 0:
                break
            time.sleep(0.02)
        assert health(url)['cancelled'] == before + 1
        # a chat tag sampled in an answer (not a stop token) is no text: '<|user|>' never reaches the client
        hello = [{'role': 'user', 'content': 'Write a story that uses the words: fox.'}]
        status, tagged = post(url, '/v1/chat/completions', {'messages': hello, 'max_tokens': 7, 'temperature': 0})
        assert status == 200 and tagged['usage']['completion_tokens'] == 7, tagged    # (generated: it counts)
        assert '<|' not in tagged['choices'][0]['message']['content']
        status, tagged = post(url, '/v1/chat/completions', {'messages': hello, 'max_tokens': 7, 'temperature': 0,
                                                            'logprobs': True})
        assert status == 200 and len(tagged['choices'][0]['logprobs']['content']) == 6   # nor a logprob of text
        h = health(url)
        assert h['running'] == h['waiting'] == 0 and h['free_blocks'] == h['blocks']
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_32_clients_x_10_requests_each_get_the_answer_served_alone(server):
    """A bounded load test: 320 requests from 32 threads at once (chat and text, streamed and not,
    greedy and seeded sampling, 3 to 14 tokens) all succeed, each equal to the request sent alone."""
    url, _ = server
    c = client(url)
    words = ('fox', 'key', 'sun', 'cake', 'tree', 'ball', 'bird', 'ship', 'moon', 'frog')

    def call(k):
        kind, stream, sampled = k % 2, k % 3 == 0, k % 4 == 0
        args = dict(model='sft_serve', max_tokens=3 + k % 12, temperature=1.0 if sampled else 0.0, seed=k,
                    stream=stream)
        if kind:
            r = c.completions.create(prompt=f'The {words[k % 10]} and the {words[k // 10 % 10]}', **args)
            return ''.join(ch.choices[0].text for ch in r) if stream else r.choices[0].text
        messages = [{'role': 'user', 'content': f'Write a story that uses the words: {words[k % 10]}, '
                                                f'{words[k // 10 % 10]}.'}]
        r = c.chat.completions.create(messages=messages, **args)
        return ''.join(ch.choices[0].delta.content or '' for ch in r) if stream else r.choices[0].message.content

    distinct = range(40)
    alone = {k: call(k) for k in distinct}
    jobs = [(7 * client_ + j) % 40 for client_ in range(32) for j in range(10)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(call, jobs))
    assert together == [alone[k] for k in jobs]
    h = health(url)
    assert h['running'] == h['waiting'] == 0 and h['free_blocks'] == h['blocks']


def test_the_chat_pages_starting_settings_and_ctrl_c(pipeline, server):
    """--page_temperature / --page_frequency_penalty fill the page's fields (the speedrun suggests
    greedy with a penalty of 0.5 for its small models); Ctrl-C stops the server with a line; bad
    settings are one-line errors."""
    import signal
    proc, url = start_server(pipeline, 'sft_serve', args=('--page_temperature=0', '--page_frequency_penalty=0.5'))
    try:
        page = urllib.request.urlopen(url + '/').read().decode()
        assert 'id="temperature" type="number" step="0.1" value="0"' in page and 'value="0.5"' in page
        assert 'PAGE_' not in page
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and 'stopped. Prefix sharing' in out
    default = urllib.request.urlopen(server[0] + '/').read().decode()       # the defaults: 0.8 and 0
    assert 'step="0.1" value="0.8"' in default
    from conftest import run_script_many
    hot, penalty, rows = run_script_many('serve.py', [['--page_temperature=3.0'], ['--page_frequency_penalty=-2.5'],
                                                      ['--prompt_rows=True', '--out_dir=sft_serve', '--port=0',
                                                       '--device=cpu']], cwd=pipeline)
    assert hot.returncode and 'page_temperature=3.0 must be in [0, 2]' in hot.stderr
    assert penalty.returncode and 'page_frequency_penalty=-2.5 must be in [-2, 2]' in penalty.stderr
    # prompt tokens as rows of the fixed-shape steps: not without them (the CPU's default)
    assert rows.returncode == 1 and 'error: prompt_rows puts prompt tokens in the fixed-shape' in rows.stderr
    assert 'Traceback' not in rows.stderr


def test_the_chat_page_in_headless_chromium(server):
    """The page as a user drives it: the model's name appears, a message sent streams an answer
    into the page (greedy: the API's answer), a second turn carries the first, a turn that makes
    the conversation longer than the context is answered without the oldest turns, Clear empties it,
    a refused turn leaves the conversation as it was."""
    url, _ = server
    c = client(url)
    question = 'Write a story that uses the words: fox, key.'
    api = c.chat.completions.create(model='sft_serve', messages=[{'role': 'user', 'content': question}], max_tokens=12,
                                    temperature=0).choices[0].message.content
    with chat_page(url) as page:
        page.wait_for_function("document.getElementById('model').textContent.includes('sft_serve')")
        send(page, question)
        page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
        assert page.locator('.msg.user').all_text_contents() == [question]
        assert page.locator('.msg.assistant').all_text_contents() == [api]
        page.fill('#input', 'And then')
        page.press('#input', 'Shift+Enter')                            # a new line, nothing sent
        assert page.input_value('#input') == 'And then\n' and page.locator('.msg.user').count() == 1
        page.fill('#input', 'And then?')
        page.press('#input', 'Enter')                                  # Enter sends
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                               "!document.getElementById('send').disabled", timeout=60_000)
        assert page.evaluate('messages.length') == 4                   # both turns go to the server
        # a third turn past the model's context of 256 bytes: the page leaves out the oldest turns
        long = 'Write a story that uses the words: ' + ', '.join(['fox', 'key', 'moon', 'cake'] * 7) + '.'
        alone = c.chat.completions.create(model='sft_serve', messages=[{'role': 'user', 'content': long}],
                                          max_tokens=12, temperature=0).choices[0].message.content
        send(page, long)
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 3 && "
                               "!document.getElementById('send').disabled", timeout=60_000)
        last = page.locator('.msg.assistant').nth(2)
        assert last.text_content() == alone and 'left out' in last.get_attribute('title')
        page.click('#clear')
        assert page.locator('.msg').count() == 0
        # a turn the server refuses (a temperature out of range) shows the error and leaves the
        # conversation as it was: no empty answer, no unanswered question sent with the next turn
        page.fill('#temperature', '5')
        page.fill('#input', question)
        page.click('#send')
        page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
        assert 'temperature' in page.locator('.msg.assistant').nth(0).text_content()
        assert page.evaluate('messages.length') == 0


def test_the_chat_page_continues_text_with_a_pretrained_model(pipeline):
    """The quick start's first model has no chat template: /v1/models says so ('chat': false), and
    the page sends each message to /v1/completions and shows the text with its continuation (the
    API's greedy continuation), instead of an error."""
    proc, url = start_server(pipeline, 'base')
    try:
        models = json.load(urllib.request.urlopen(url + '/v1/models'))
        assert models['data'][0]['chat'] is False
        api = client(url).completions.create(model='base', prompt='Once upon a time', max_tokens=12,
                                             temperature=0).choices[0].text
        with chat_page(url) as page:
            page.wait_for_function("document.getElementById('model').textContent.includes('continues the text')")
            send(page, 'Once upon a time')
            page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
            assert page.locator('.msg.assistant').all_text_contents() == ['Once upon a time' + api]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# serve.py whose engine hands out a script of word-tokenizer ids instead of the model's: '"a x x x x x x
# x x x x" b x x ...' (the words of word_checkpoint below)
WORD_SCRIPT = """
import runpy, sys
sys.path.insert(0, sys.argv[1].rsplit('/', 1)[0])
import engine
script = [1, 2] + [4] * 10 + [1, 3] + [4] * 40
step = engine.Engine.step
def scripted_step(self):
    return [(r, script[len(r.output) - 1] if t not in (None, *r.stop_ids) else t, f) for r, t, f in step(self)]
engine.Engine.step = scripted_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_stop_strings_with_the_word_tokenizer_whose_spacing_depends_on_the_text_before(pipeline, tmp_path):
    """The word tokenizer spaces a quote by whether it opens or closes one, so the text of the last
    few tokens alone can differ from the answer's end: '" b' closes a quote in the answer, but a
    tail that starts after the opening quote reads it as '"b'. A stop string the answer does not
    hold ends nothing (it ran to its length), and one it holds cuts it there."""
    import dataclasses
    import torch
    from checkpoint import save_checkpoint
    from model import GPT, ModelConfig
    from tokenizer import WordTokenizer, with_chat_tokens
    tok = with_chat_tokens(WordTokenizer(['<unk>', '"', 'a', 'b', 'x']))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=16, block_size=64, n_layer=1, n_head=2, n_embd=16, pos_emb='rope')
    state = {'model_config': dataclasses.asdict(config), 'model': GPT(config).state_dict(), 'tokenizer': tok.spec(),
             'stage': 'sft'}
    save_checkpoint(str(tmp_path / 'word'), state)
    proc, url = start_server(pipeline, str(tmp_path / 'word'), python=('-c', WORD_SCRIPT))
    try:
        body = {'prompt': 'a', 'max_tokens': 20, 'temperature': 0}
        text = post(url, '/v1/completions', body)[1]['choices'][0]['text']
        assert text.startswith('"a x x') and '" b' in text and '"b' not in text, text
        status, answer = post(url, '/v1/completions', {**body, 'stop': '"b'})
        assert (answer['choices'][0]['text'], answer['choices'][0]['finish_reason']) == (text, 'length'), answer
        status, answer = post(url, '/v1/completions', {**body, 'stop': '" b'})
        cut = text[:text.index('" b')]
        assert (answer['choices'][0]['text'], answer['choices'][0]['finish_reason']) == (cut, 'stop'), answer
    finally:
        proc.terminate()
        proc.wait(timeout=30)
