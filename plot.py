"""
The plot stage: train and val loss against tokens, with the learning rate below, for one or several runs,
as an SVG written without matplotlib (the drawing is curves.py's, which every training run also uses for
its own loss.svg).

    python lumi.py plot RUN [RUN ...] [--out=FILE.svg] [--title=TEXT]     # or python plot.py ...

Deliberately left out: any picture but loss curves.
"""
import os

import lumi
from curves import plot_svg, read_run

# -----------------------------------------------------------------------------
# keys: --key=value
out = ''            # the SVG to write; '' is RUN/loss.svg for one run directory, else loss.svg
title = ''          # '' names the runs
KEYS = lumi.declared_keys(__file__)

USAGE = "usage: python lumi.py plot RUN [RUN ...] [--out=FILE.svg] [--title=TEXT]"


def main(argv):
    """Draw the runs (directories or metrics.jsonl files); returns the SVG's path."""
    runs, flags = lumi.split_args(argv, KEYS)
    if not runs:
        raise lumi.LumiError(USAGE)
    cfg = lumi.load_config(KEYS, flags, shares_with=())
    out = cfg.out or (os.path.join(runs[0], 'loss.svg') if len(runs) == 1 and os.path.isdir(runs[0])
                      else 'loss.svg')
    path = plot_svg([read_run(r) for r in runs], out,
                    title=cfg.title or ', '.join(map(os.path.normpath, runs)))
    lumi.log(f"wrote {path}")
    return path


if __name__ == '__main__':
    lumi.cli(main, KEYS, USAGE)
