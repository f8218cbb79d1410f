"""
What a run writes about itself: out_dir/log.jsonl (one JSON object per logged step or
evaluation), PNG curves and the expert-load heatmap, optionally TensorBoard and wandb.
"""

import json
import os
import sys
import time


class RunLog:
    def __init__(self, out_dir, enabled=True, tensorboard=False, wandb_project='', run_name='',
                 config=None, resume_step=None):
        """A new log.jsonl, or with resume_step (a resumed run) the old one up to that step: rows
        the run wrote after its checkpoint are dropped, as the resumed run writes them again."""
        self.out_dir, self.enabled = out_dir, enabled
        self.path = os.path.join(out_dir, 'log.jsonl')
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        elif resume_step is not None:
            kept = [r for r in self.rows() if r.get('step', 0) <= resume_step]
            with open(self.path + '.tmp', 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in kept)
            os.replace(self.path + '.tmp', self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: pip install tensorboard
            self.tb = SummaryWriter(os.path.join(out_dir, 'tb'))
        if wandb_project:
            import wandb  # optional: pip install wandb
            self.wandb = wandb.init(project=wandb_project, name=run_name or None, config=config)

    def log(self, step, **metrics):
        if not self.enabled:
            return
        row = {'step': step, 'time': round(time.time(), 3), **metrics}
        with open(self.path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)):  # lists go to log.jsonl only
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def rows(self):
        """The logged rows; a line cut short (a process killed mid-write) is skipped."""
        if not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
        return rows

    def plot(self, keys=('train/loss', 'val/loss'), name='loss.png', title='', ylabel='loss (nats/token)'):
        """A PNG of the given metrics against step (None without matplotlib)."""
        plt = pyplot() if self.enabled else None
        if plt is None:
            return None
        rows = self.rows()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in keys:
            pts = [(r['step'], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=k, marker='o' if len(pts) < 30 else None, markersize=3)
        ax.set_xlabel('step')
        ax.set_ylabel(ylabel)
        ax.set_title(title or os.path.basename(os.path.normpath(self.out_dir)))
        ax.grid(alpha=0.3)
        if ax.lines:                   # none before the first logged value of these keys
            ax.legend()
        return self.save(fig, name)

    def heatmap(self, matrix, name, title='', xlabel='expert', ylabel='MoE layer'):
        """A PNG of a (rows, cols) matrix, e.g. the share of tokens each expert received per
        layer (an even load is a flat colour at 1/E); None without matplotlib."""
        plt = pyplot() if self.enabled else None
        if plt is None:
            return None
        m = matrix.float().cpu().numpy()
        fig, ax = plt.subplots(figsize=(min(14, 3 + 0.12 * m.shape[1]), 1.5 + 0.35 * m.shape[0]))
        im = ax.imshow(m, aspect='auto', cmap='viridis', interpolation='nearest')
        fig.colorbar(im, ax=ax, label=f'share (even = 1/{m.shape[1]} = {1 / m.shape[1]:.3f})')
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yticks(range(m.shape[0]))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title, fontsize=9)
        return self.save(fig, name)

    def save(self, fig, name):
        """Write fig to out_dir/name (through a temporary file) and close it."""
        path = os.path.join(self.out_dir, name)
        fig.tight_layout()
        fig.savefig(path + '.tmp.png', dpi=110)
        pyplot().close(fig)
        os.replace(path + '.tmp.png', path)
        return path

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress(iterable=None, **kwargs):
    """A tqdm progress bar that also shows in a log file: redrawn every second on a terminal; where
    stderr is a file (as speedrun.sh's logs are) a line of its own every 30 s and one at the end."""
    from tqdm import tqdm
    if sys.stderr.isatty():
        return tqdm(iterable, mininterval=1, **kwargs)

    class LogLines(tqdm):
        """tqdm in a log file: each state a whole line (no carriage returns that redraw one line,
        which a pager or an editor shows as one long line), written when the count moved since
        the last line; nothing cleared or redrawn around a print (the lines only add up)."""
        monitor_interval = 0          # no monitor thread redrawing between updates: a line at most every
                                      # mininterval, from the loop's own thread
        def display(self, msg=None, pos=None):
            if msg is None and self.n != getattr(self, 'line_n', None):   # msg '': tqdm clearing its line
                self.line_n = self.n
                self.fp.write(self.__str__() + '\n')
                self.fp.flush()
            return True

        def clear(self, nolock=False):
            pass

    class NoBlankWrites:
        """The file under the bar: tqdm's own carriage returns and closing newline are left out."""
        def __init__(self, f):
            self.f = f

        def write(self, text):
            return self.f.write(text) if text.strip() else 0

        def flush(self):
            self.f.flush()

    return LogLines(iterable, mininterval=30, file=NoBlankWrites(kwargs.pop('file', sys.stderr)), **kwargs)


class PrintsAboveBar:
    """sys.stdout while a training loop's progress bar is drawn: each complete line a print() writes
    (a stage's sample answer, a line a researcher adds to the loop) goes out above the bar, which is
    cleared first and drawn again after, instead of running on from the bar's line (a log file holds
    both streams). Partial lines wait for their newline; close() writes what is left and puts the
    real stdout back."""

    def __init__(self, bar, stdout):
        self.bar, self.stdout, self.pending = bar, stdout, ''

    def write(self, text):
        self.pending += text
        if '\n' in self.pending:
            lines, _, self.pending = self.pending.rpartition('\n')
            with self.bar.external_write_mode(file=sys.stderr):     # clears the bars drawn on stderr
                self.stdout.write(lines + '\n')
                self.stdout.flush()
        return len(text)

    def flush(self):
        self.stdout.flush()

    def close(self):
        if sys.stdout is self:
            sys.stdout = self.stdout
        if self.pending:
            self.stdout.write(self.pending)
            self.pending = ''
        self.stdout.flush()

    def __getattr__(self, name):                 # isatty, encoding, fileno, ...: the real stream's
        if name == 'stdout':                     # (not set yet: copy.copy, pickle)
            raise AttributeError(name)
        return getattr(self.stdout, name)


_PYPLOT = []


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (said once) where matplotlib is
    not installed: requirements.txt leaves it out; requirements-dev.txt installs it."""
    if not _PYPLOT:
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            plt = None
            print('note: matplotlib is not installed, so no PNG plots are written '
                  '(pip install matplotlib, or pip install -r requirements-dev.txt)', file=sys.stderr)
        _PYPLOT.append(plt)
    return _PYPLOT[0]
