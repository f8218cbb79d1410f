"""
Request latency of a running serve.py on one kept-alive connection (as the openai client keeps
it): the median of N non-streamed one-token completions, and of N /tokenize calls where the
server has that endpoint. With Nagle's algorithm on the server's socket a reply written as headers
then body waits for the client's delayed ACK, about 40 ms per request on Linux loopback.
--score_tokens=T adds lm-evaluation-harness's log-likelihood request: a prompt of T token ids,
echo with logprobs=1, max_tokens=1 (the server scores the prompt's every token): its median alone,
and the wall time of --concurrent such requests sent at once, each on its own connection.

$ python serve.py --out_dir=out/speedrun_cpu/base --port=8123 --device=cpu &
$ python experiments/serve_latency.py --url=http://127.0.0.1:8123 --n=20
"""
import argparse
import http.client
import json
import statistics
import time
from urllib.parse import urlparse

parser = argparse.ArgumentParser()
parser.add_argument('--url', default='http://127.0.0.1:8000')
parser.add_argument('--n', type=int, default=20)
parser.add_argument('--score_tokens', type=int, default=0)
parser.add_argument('--concurrent', type=int, default=8)
args = parser.parse_args()
u = urlparse(args.url)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)


def median_ms(path, body):
    """The median time of args.n POSTs of body to path, in ms, or None where the route is missing."""
    times = []
    for _ in range(args.n):
        start = time.perf_counter()
        conn.request('POST', path, body=json.dumps(body), headers={'Content-Type': 'application/json'})
        reply = conn.getresponse()
        answer = reply.read()
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise SystemExit(f'error: {path} answered {reply.status}: {answer[:300]!r}')
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


completion = median_ms('/v1/completions', {'prompt': 'The cat sat', 'max_tokens': 1, 'temperature': 0})
tokenize = median_ms('/tokenize', {'prompt': 'The cat sat'})
print(f'{args.url}: one-token completion {completion:.1f} ms, /tokenize '
      + ('(no such route)' if tokenize is None else f'{tokenize:.1f} ms') + f' (medians of {args.n}, one connection)')

if args.score_tokens:
    import threading
    conn.request('GET', '/tokenizer_info')                  # fixed ids inside the server's vocabulary
    vocab = json.loads(conn.getresponse().read())['vocab_size']
    ids = [(37 * i + 11) % (vocab - 1) for i in range(args.score_tokens)]
    scored = {'prompt': ids, 'max_tokens': 1, 'temperature': 0, 'logprobs': 1, 'echo': True}
    alone = median_ms('/v1/completions', scored)

    failed = []

    def one():
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        c.request('POST', '/v1/completions', body=json.dumps(scored), headers={'Content-Type': 'application/json'})
        r = c.getresponse()
        answer = r.read()
        if r.status != 200:
            failed.append(f'{r.status}: {answer[:300]!r}')
    start = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(args.concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together = (time.perf_counter() - start) * 1000
    if failed:
        raise SystemExit(f'error: {len(failed)} of the {args.concurrent} requests failed, e.g. {failed[0]}')
    print(f'{args.url}: scoring a {args.score_tokens}-token prompt (echo, logprobs=1, max_tokens=1): {alone:.1f} ms '
          f'alone (median of {args.n}); {args.concurrent} at once: {together:.0f} ms in all')
