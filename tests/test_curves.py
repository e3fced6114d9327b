"""curves.py and its `lumi.py plot` command: a well-formed SVG whose polylines hold the logged points, several
runs on one axis, a metrics.jsonl line cut short by a kill skipped, and nothing to draw said plainly."""
import json
import math
import os
import xml.etree.ElementTree as ET

import pytest

import curves

SVG = '{http://www.w3.org/2000/svg}'


def _polylines(path):
    root = ET.parse(path).getroot()
    assert root.tag == SVG + 'svg'
    out = {}
    for p in root.iter(SVG + 'polyline'):
        pts = [tuple(map(float, xy.split(','))) for xy in p.get('points').split()]
        out[(p.get('data-run'), p.get('data-series'))] = pts
    return out


def _assert_linear_map(data, drawn, tol=0.02):
    """Screen coordinates must be one affine map of the data (up to the 2-decimal rounding)."""
    (d0, s0), (d1, s1) = min(zip(data, drawn)), max(zip(data, drawn))
    scale = (s1 - s0) / (d1 - d0)
    for d, s in zip(data, drawn):
        assert abs(s0 + (d - d0) * scale - s) < tol


def test_plot_svg_holds_every_point(tmp_path):
    runs = []
    for name, scale in (('small', 1.0), ('wide', 1.3)):
        recs = []
        for step in range(1, 31):
            recs.append(dict(step=step, tokens=step * 128, loss=scale * (3 + 5 * math.exp(-step / 6)),
                             lr=1e-3 * min(1, step / 5)))
            if step % 10 == 0:
                recs.append(dict(step=step, tokens=step * 128,
                                 val_loss=scale * (3.2 + 5 * math.exp(-step / 6))))
        d = tmp_path / name
        d.mkdir()
        (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs) + '{"step": 31, "lo\n')
        runs.append((str(d), recs))
    out = str(tmp_path / 'both.svg')
    curves.main([runs[0][0], runs[1][0], '--out', out, '--title=loss <&> lr'])
    lines = _polylines(out)
    assert len(lines) == 6  # train loss, val loss, lr for each run
    text = open(out).read()
    assert 'loss &lt;&amp;&gt; lr' in text  # escaped, or the XML would not have parsed
    for run_dir, recs in runs:
        label = os.path.basename(run_dir)
        for series, key in (('train loss', 'loss'), ('val loss', 'val_loss'), ('learning rate', 'lr')):
            pts = lines[(label, series)]
            rows = [r for r in recs if key in r]
            assert len(pts) == len(rows)
            _assert_linear_map([r['tokens'] for r in rows], [x for x, _ in pts])
            _assert_linear_map([r[key] for r in rows], [y for _, y in pts])
            # SVG's y grows downwards: a larger value is drawn higher up
            assert (pts[0][1] < pts[-1][1]) == (rows[0][key] > rows[-1][key])
    # both runs share the x axis: the same token count lands at the same x
    assert lines[('small', 'train loss')][4][0] == lines[('wide', 'train loss')][4][0]


def test_plot_without_anything_to_draw_is_an_error(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match='nothing to plot'):
        curves.plot_svg([curves.read_run(str(tmp_path))], str(tmp_path / 'x.svg'))

