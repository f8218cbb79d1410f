"""
A screenshot of serve.py's chat page in use: serve a checkpoint, open the page in headless
Chromium, send the messages one turn after another, wait for each streamed answer, save a PNG.

$ python experiments/chat_screenshot.py --out_dir=out/sft --png=docs/chat_page.png \
      --messages="Write a story that uses the words: dog, ball, happy.|And then?"

Needs playwright (pip install playwright) and Debian's chromium (apt-get install chromium).
docs/chat_page.png was made on 2 CPU cores from the TinyStories sample in ../shared/data:
$ python train.py config/tinystories_cpu.py --out_dir=out/demo --max_iters=2500 --eval_interval=500
$ python prepare/tinystories_instruct.py --source=../shared/data/tinystories/train_sample_2mb.txt \
      --out_dir=data/demo_instruct --n_prompts_val=32 --n_prompts_train=32
$ python sft.py --init_from=out/demo --out_dir=out/demo_sft --task_dir=data/demo_instruct --max_iters=600 \
      --eval_interval=300 --batch_size=8 --block_size=128 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=20 \
      --eval_prompts=8 --max_new_tokens=100 --device=cpu --compile=False
$ python experiments/chat_screenshot.py --out_dir=out/demo_sft --height=580 --frequency_penalty=0.5 \
      --messages="Write a story that uses the words: dog, ball, happy.|Write a story that uses the words: cat, tree, brave."
(greedy, without the penalty the first answer loops: "The dog is brown and yellow." eight times)
"""

import os
import shutil
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
from config import configure  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out/sft'          # the checkpoint to serve
png = 'docs/chat_page.png'
messages = 'Write a story that uses the words: dog, ball, happy.'   # turns, separated by |
temperature = 0.0            # the page's sampling settings
frequency_penalty = 0.0
max_tokens = 0               # 0: the page's default (what the context leaves after the prompt)
width, height = 900, 900     # the browser window, in CSS pixels
device = 'cpu'
# -----------------------------------------------------------------------------
configure(globals())
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sys.exit('error: needs playwright: pip install playwright')
chromium = shutil.which('chromium') or shutil.which('chromium-browser')
if not chromium:
    sys.exit("error: needs Debian's chromium: apt-get install chromium")

server = subprocess.Popen([sys.executable, os.path.join(_REPO, 'serve.py'), f'--out_dir={out_dir}', '--port=0',
                           f'--device={device}'], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'))
line = ''
while 'serving' not in line and server.poll() is None:
    line = server.stdout.readline()
if 'serving' not in line:
    sys.exit(f'error: serve.py did not start (exit code {server.poll()})')
url = line.split(' on ')[1].split(';')[0]
print(line.strip())
try:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=['--no-sandbox'])
        page = browser.new_page(viewport={'width': width, 'height': height})
        page.goto(url + '/')
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        page.fill('#temperature', str(temperature))
        page.fill('#frequency_penalty', str(frequency_penalty))
        if max_tokens:
            page.fill('#max_tokens', str(max_tokens))
        for text in messages.split('|'):
            page.fill('#input', text)
            page.click('#send')
            page.wait_for_function("!document.getElementById('send').disabled", timeout=300_000)
        answers = page.locator('.msg.assistant').all_text_contents()
        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
        page.screenshot(path=png, full_page=True)
        browser.close()
finally:
    server.terminate()
    server.wait(timeout=30)
for a in answers:
    print(f'answer: {a!r}')
print(f'wrote {png}')
