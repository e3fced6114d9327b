"""
How a run's curves are shown: train/val loss and the learning rate against tokens as an SVG written by hand
(axes, ticks, a legend, one polyline per series), so a browser shows it and no plotting library is needed;
and the trackers people already use, TensorBoard and Weights & Biases, fed the same scalars as metrics.jsonl.

training.fit draws loss.svg at the end of every run through write_loss_plot, which never raises, and logs to
the trackers of its `log` key (`--log=tensorboard,wandb`) through Trackers; run as a command it draws one or
several runs together:

    python lumi.py plot RUN [RUN ...] [--out=FILE.svg] [--title=TEXT]     # or python curves.py ...

Deliberately left out: any picture but loss curves, any output format but SVG, and trackers beyond those two
(metrics.jsonl is the record: MLflow, CSV and the rest read it).
"""
import difflib
import importlib.util
import math
import os
from xml.sax.saxutils import escape, quoteattr

import lumi
from lumi import LumiError, atomic_write, log, read_jsonl

# -----------------------------------------------------------------------------
# keys of `lumi.py plot`: --key=value
out = ''            # the SVG to write; '' is RUN/loss.svg for one run directory, else loss.svg
title = ''          # '' names the runs
KEYS = lumi.declared_keys(__file__)
USAGE = "usage: python lumi.py plot RUN [RUN ...] [--out=FILE.svg] [--title=TEXT]"

PALETTE = ('#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b', '#e377c2')
MAX_PLOT_POINTS = 5000  # a longer series keeps every k-th point (its first and last included)


def _nice_ticks(lo, hi, count=5):
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


def _fmt_tick(v, step):
    if v == 0:
        return '0'
    if abs(v) >= 1e9:
        return f"{v / 1e9:g}B"
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e3 and step >= 100:
        return f"{v / 1e3:g}k"
    return f"{round(v, 12):.3g}"


def _thin(points):
    if len(points) <= MAX_PLOT_POINTS:
        return points
    k = math.ceil(len(points) / MAX_PLOT_POINTS)
    return points[::k] + ([points[-1]] if (len(points) - 1) % k else [])


def plot_series(runs):
    """From (label, metrics records) pairs, the series to draw: per run its train loss, val loss and LR
    against tokens (or steps when the records lack token counts)."""
    x_key = 'tokens' if all('tokens' in r for _, recs in runs for r in recs) else 'step'
    series = []
    for i, (label, recs) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        for panel, key, name, dashed in (('loss', 'loss', 'train loss', False),
                                         ('loss', 'val_loss', 'val loss', True),
                                         ('lr', 'lr', 'learning rate', False)):
            pts = [(float(r[x_key]), float(r[key])) for r in recs
                   if isinstance(r.get(key), (int, float)) and isinstance(r.get(x_key), (int, float))
                   and math.isfinite(r[key])]
            if pts:
                series.append(dict(run=label, name=name, panel=panel, color=color, dashed=dashed,
                                   points=_thin(pts)))
    return x_key, series


def plot_svg(runs, path, title=''):
    """Draw loss against tokens (top panel) and the learning rate (bottom) for one or several runs.

    runs: (label, records) pairs, records as in metrics.jsonl. Written without matplotlib: axes, ticks,
    labels, a legend and one <polyline> per series, which carries data-run and data-series attributes so
    that a reader (or a test) can find each curve. Returns path.
    """
    x_key, series = plot_series(runs)
    if not series:
        raise ValueError("nothing to plot: the runs have no loss, val_loss or lr records")
    W, left, right, top = 1000, 80, 250, 50
    panels = {'loss': (top, 300), 'lr': (top + 300 + 70, 140)}  # panel -> (y of its top, height)
    H = panels['lr'][0] + panels['lr'][1] + 60
    pw = W - left - right
    xs = [x for s in series for x, _ in s['points']]
    xticks = _nice_ticks(min(xs), max(xs), 6)
    x0, x1 = xticks[0], xticks[-1]
    X = lambda x: left + (x - x0) / (x1 - x0) * pw
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="28" font-size="16" font-weight="bold">'
           f'{escape(title or "Lumi training curves")}</text>']
    for panel, (py, ph) in panels.items():
        ps = [s for s in series if s['panel'] == panel]
        ys = [y for s in ps for _, y in s['points']] or [0.0, 1.0]
        yticks = _nice_ticks(min(ys), max(ys), 5)
        y0, y1 = yticks[0], yticks[-1]
        Y = lambda y, py=py, ph=ph, y0=y0, y1=y1: py + ph - (y - y0) / (y1 - y0) * ph
        out.append(f'<g class="panel" data-panel="{panel}">')
        out.append(f'<rect x="{left}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
        ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1
        for t in yticks:
            y = Y(t)
            out.append(f'<line x1="{left}" y1="{y:.2f}" x2="{left + pw}" y2="{y:.2f}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.2f}" text-anchor="end">{_fmt_tick(t, ystep)}</text>')
        xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1
        for t in xticks:
            x = X(t)
            out.append(f'<line x1="{x:.2f}" y1="{py}" x2="{x:.2f}" y2="{py + ph}" stroke="#f0f0f0"/>')
            out.append(f'<text x="{x:.2f}" y="{py + ph + 16}" text-anchor="middle">'
                       f'{_fmt_tick(t, xstep)}</text>')
        out.append(f'<text x="{left + pw / 2}" y="{py + ph + 34}" text-anchor="middle">{x_key}</text>')
        label = 'loss (nats/token)' if panel == 'loss' else 'learning rate'
        out.append(f'<text transform="translate({left - 58},{py + ph / 2}) rotate(-90)" '
                   f'text-anchor="middle">{label}</text>')
        for s in ps:
            pts = ' '.join(f"{X(x):.2f},{Y(y):.2f}" for x, y in s['points'])
            dash = ' stroke-dasharray="6,4"' if s['dashed'] else ''
            out.append(f'<polyline fill="none" stroke="{s["color"]}" stroke-width="1.6"{dash} '
                       f'data-run={quoteattr(s["run"])} data-series="{s["name"]}" points="{pts}"/>')
            if s['dashed'] or len(s['points']) == 1:  # evals are few: mark each; a lone point needs a dot
                out += [f'<circle cx="{X(x):.2f}" cy="{Y(y):.2f}" r="2.8" fill="{s["color"]}"/>'
                        for x, y in s['points']]
        out.append('</g>')
    ly, lx = top + 10, left + pw + 20  # the legend, right of the panels: each run, then its loss curves
    for label, _ in runs:
        mine = [s for s in series if s['run'] == label and s['panel'] == 'loss']
        if not mine:
            continue
        out.append(f'<text x="{lx}" y="{ly + 4}" font-weight="bold" fill="{mine[0]["color"]}">'
                   f'{escape(label if len(label) <= 30 else "…" + label[-29:])}</text>')
        ly += 18
        for s in mine:
            dash = ' stroke-dasharray="6,4"' if s['dashed'] else ''
            out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 28}" y2="{ly}" stroke="{s["color"]}" '
                       f'stroke-width="2"{dash}/>')
            out.append(f'<text x="{lx + 34}" y="{ly + 4}">{s["name"]}, last {s["points"][-1][1]:.3f}</text>')
            ly += 18
        ly += 8
    out.append('</svg>')
    text = '\n'.join(out) + '\n'
    atomic_write(path, lambda f: f.write(text), mode='w')
    return path


def _run_label(path):
    path = os.path.normpath(path)
    return os.path.basename(os.path.dirname(path)) if path.endswith('.jsonl') else os.path.basename(path)


def read_run(path):
    """(label, records) of a run directory or a metrics.jsonl file."""
    metrics = os.path.join(path, 'metrics.jsonl') if os.path.isdir(path) else path
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"no metrics.jsonl at {path}")
    return _run_label(path), read_jsonl(metrics)


def write_loss_plot(out_dir):
    """fit()'s picture at the end of a run: out_dir/loss.svg. Never lets a plotting problem fail training."""
    try:
        path = plot_svg([read_run(out_dir)], os.path.join(out_dir, 'loss.svg'), title=f"{out_dir}")
        log(f"wrote {path}")
    except Exception as e:  # noqa: BLE001 - a picture is never worth a failed run
        log(f"could not draw {out_dir}/loss.svg: {type(e).__name__}: {e}")


# -----------------------------------------------------------------------------
# trackers: the run's scalars in TensorBoard and W&B too, each package imported only when asked for

TRACKERS = {'tensorboard': 'tensorboard', 'wandb': 'wandb'}  # --log name -> the package to pip install
WANDB_ID = 'wandb_run_id'  # in out_dir: the W&B run a resumed run goes on logging to


def parse_trackers(spec):
    """The tracker names of a --log value ('tensorboard,wandb'; '' is none), each once; a name that is not a
    tracker is refused in one line that names the choices."""
    names = [n.strip() for n in str(spec or '').split(',') if n.strip()]
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ''
            raise LumiError(f"--log: unknown tracker {name!r}{hint}; choose from {', '.join(TRACKERS)}, "
                            f"as a comma list, or '' for none")
    return list(dict.fromkeys(names))


def scalars(record):
    """The numbers of a metrics record, by their metrics.jsonl names, but its step."""
    return {k: float(v) for k, v in record.items()
            if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _plain(config):
    """A config as values every tracker takes: numbers, strings and bools as they are, the rest as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in config.items()}


class TensorBoardLog:
    """Event files in out_dir/tensorboard/. A fresh run removes the old ones; a resumed run appends, and its
    purge_step tells TensorBoard to drop what the interrupted run logged after the checkpoint, as
    metrics.jsonl drops it."""

    def __init__(self, out_dir, config, resumed_step):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        logdir = os.path.join(out_dir, 'tensorboard')
        if resumed_step is None and os.path.isdir(logdir):
            for name in os.listdir(logdir):
                if name.startswith('events.out.tfevents.'):
                    os.remove(os.path.join(logdir, name))
        self.writer = SummaryWriter(logdir, purge_step=None if resumed_step is None else resumed_step + 1)
        if resumed_step is None:  # the resolved config as the run's hyperparameters (the HPARAMS tab)
            for summary in hparams(_plain(config), {'loss': 0, 'val_loss': 0}):
                self.writer.file_writer.add_summary(summary)

    def log(self, record):
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record['step'])

    def close(self):
        self.writer.close()


class WandbLog:
    """A W&B run, whose id is kept in out_dir/wandb_run_id so that a resumed run goes on logging to it; W&B's
    own environment decides the rest (WANDB_MODE=offline, WANDB_PROJECT, else project 'lumi'; WANDB_DIR, else
    out_dir). A resumed run logs again what the interrupted one logged after the checkpoint, with the same
    values (Lumi resumes exactly)."""

    def __init__(self, out_dir, config, resumed_step):
        import wandb
        id_path = os.path.join(out_dir, WANDB_ID)
        run_id = None
        if resumed_step is not None and os.path.isfile(id_path):
            with open(id_path, encoding='utf-8') as f:
                run_id = f.read().strip() or None
        self.run = wandb.init(project=os.environ.get('WANDB_PROJECT') or 'lumi', id=run_id, resume='allow',
                              dir=os.environ.get('WANDB_DIR') or out_dir,
                              name=os.path.basename(os.path.normpath(out_dir)))
        if run_id is None:
            atomic_write(id_path, lambda f: f.write(self.run.id + '\n'), mode='w')
        self.run.config.update(_plain(config), allow_val_change=True)

    def log(self, record):
        self.run.log(scalars(record), step=record['step'])

    def close(self):
        self.run.finish()


def check_trackers(spec):
    """parse_trackers, and each tracker's package importable: the stages call it first, so that a misspelt
    or missing tracker costs a second, not the minutes of loading data and a model before Trackers."""
    names = parse_trackers(spec)
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            package = TRACKERS[name]
            raise LumiError(f"--log={name} needs the {package} package: pip install {package}")
    return names


class Trackers:
    """The trackers a run logs to besides metrics.jsonl, which stays the record: `spec` is the --log value.
    A package that is missing is an error before training starts (its pip command in one line); a tracker that
    fails later (no network, no login, a full disk) is said once and dropped, and training goes on.
    resumed_step: the step a resumed run starts from, None for a fresh run."""

    def __init__(self, spec, out_dir, config, resumed_step=None):
        self.active = {}
        for name in check_trackers(spec):
            kind = TensorBoardLog if name == 'tensorboard' else WandbLog
            self._guarded(name, lambda: self.active.__setitem__(name, kind(out_dir, config, resumed_step)))

    def _guarded(self, name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a tracker is never worth a failed run
            self.active.pop(name, None)
            log(f"warning: --log={name} failed ({type(e).__name__}: {lumi.one_line(e)[:200]}); it is off for "
                f"the rest of the run, which goes on (metrics.jsonl keeps every metric)")

    def log(self, record):
        """Log a metrics.jsonl record (it has a step) to every tracker."""
        for name, tracker in list(self.active.items()):
            self._guarded(name, lambda: tracker.log(record))

    def close(self):
        for name, tracker in list(self.active.items()):
            self._guarded(name, tracker.close)
        self.active = {}


# -----------------------------------------------------------------------------
# `python lumi.py plot RUN [RUN ...]` (or python curves.py ...)

def main(argv):
    """Draw the runs (directories or metrics.jsonl files); returns the SVG's path."""
    runs, flags = lumi.split_args(argv, KEYS)
    if not runs:
        raise lumi.LumiError(USAGE)
    cfg = lumi.load_config(KEYS, flags, shares_with=())
    path = cfg.out or (os.path.join(runs[0], 'loss.svg') if len(runs) == 1 and os.path.isdir(runs[0])
                       else 'loss.svg')
    title = cfg.title or ', '.join(map(os.path.normpath, runs))
    path = plot_svg([read_run(r) for r in runs], path, title=title)
    log(f"wrote {path}")
    return path


if __name__ == '__main__':
    lumi.cli(main, KEYS, USAGE)
