"""
Request latency of a running serve.py on one kept-alive connection (as the openai client keeps
it): the median of N non-streamed one-token completions, and of N /tokenize calls where the
server has that endpoint. With Nagle's algorithm on the server's socket a reply written as headers
then body waits for the client's delayed ACK, about 40 ms per request on Linux loopback.

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
        reply.read()
        if reply.status == 404:
            return None
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


completion = median_ms('/v1/completions', {'prompt': 'The cat sat', 'max_tokens': 1, 'temperature': 0})
tokenize = median_ms('/tokenize', {'prompt': 'The cat sat'})
print(f'{args.url}: one-token completion {completion:.1f} ms, /tokenize '
      + ('(no such route)' if tokenize is None else f'{tokenize:.1f} ms') + f' (medians of {args.n}, one connection)')
