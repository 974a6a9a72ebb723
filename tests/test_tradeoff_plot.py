"""benchmarks/tradeoff_plot.py: speed and FID result JSONs merge by method; one point per row with both."""
import json

import pytest
from PIL import Image

from benchmarks.decoding import table, tv_bounds
from benchmarks.tradeoff_plot import ROOT, family, label, main, merge, plot


def test_merge_plot_and_table(tmp_path):
    speed = {"rows": [{"method": "ar", "sc1": 1.0, "sc16": 1.0, "acc1": 1.0},
                      {"method": "lantern:delta=0", "sc1": 2.5, "sc16": 2.1, "acc1": 2.5, "tv_per_position": 0.0,
                       "tv_composed": 0.0},
                      {"method": "lantern:delta=0.1,k=100", "sc1": 3.0, "sc16": 2.6, "acc1": 3.0,
                       "tv_per_position": 0.04, "tv_composed": 0.9, "tv_bound": 0.1, "tv_composed_bound": 6.4},
                      {"method": "lantern:delta=null,lam=5,k=10", "sc1": 3.4, "sc16": 2.9, "acc1": 3.4}],
             "ar_fids": {}}
    fids = [{"rows": [{"method": "ar", "fid": 100.0}], "ar_fids": {"0": 100.0, "1": 101.0}},
            {"rows": [{"method": "lantern:delta=0.1,k=100", "fid": 102.5}], "ar_fids": {}}]
    paths = []
    for i, d in enumerate([speed] + fids):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(d))
    rows, ar_fids = merge(paths)
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == [r["method"] for r in speed["rows"]]  # the speed run's order
    assert by["lantern:delta=0.1,k=100"]["fid"] == 102.5 and by["lantern:delta=0.1,k=100"]["sc1"] == 3.0
    assert ar_fids == {"0": 100.0, "1": 101.0} and by["ar"]["fid"] == 100.0
    n = plot(rows, ar_fids, tmp_path / "p.png")
    assert n == 4  # two with a FID, two drawn without
    img = Image.open(tmp_path / "p.png").convert("RGB")
    colours = set(img.getdata())
    assert family("lantern:delta=0.1,k=100")[1] in colours and family("ar")[1] in colours
    assert family("lantern:delta=0")[0] == "draft-head SD (δ=0)" and family("lantern:delta=null,lam=5")[0].startswith("LANTERN++")
    md = table(rows, 1, 16)
    assert "| lantern:delta=0.1,k=100 | 2.60 | 3.00 | 3.00 | – | – | 102.50 | 0.040 (≤ 0.1) | 0.900 (≤ 6.4) |" in md
    main([str(p) for p in paths] + ["--out", str(tmp_path / "m.png"), "--save-rows", str(tmp_path / "rows.json")])
    assert merge([tmp_path / "rows.json"]) == (rows, ar_fids)  # the saved rows redraw the same plot
    with pytest.raises(ValueError, match="no row has both"):
        plot([{"method": "ar", "sc1": 1.0}], {}, tmp_path / "q.png")


def test_tv_bounds_only_for_the_delta_rule():
    from decoding.lantern import LanternSettings
    from decoding.sjd import SjdSettings

    assert tv_bounds(LanternSettings(delta=0.1, k=10), 64) == (0.1, 6.4)
    assert tv_bounds(LanternSettings(delta=0.0), 64) is None and tv_bounds(LanternSettings(delta=0.1, k=0), 64) is None
    assert tv_bounds(LanternSettings(delta=None, lam=5), 64) is None
    assert tv_bounds(LanternSettings(delta=0.1, target="pointwise"), 64) is None
    assert tv_bounds(LanternSettings(delta=0.1, target="pointwise", draft="greedy"), 64) == (0.1, 6.4)
    assert tv_bounds(SjdSettings(relax="lantern", delta=0.2), 64)[1] == pytest.approx(12.8)
    assert tv_bounds(SjdSettings(), 64) is None and tv_bounds(None, 64) is None


def _overlap(a, b) -> bool:
    return not (a[2] < b[0] or a[0] > b[2] or a[3] < b[1] or a[1] > b[3])


def test_labels_avoid_the_points_and_each_other():
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", (400, 300), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    points = [(200, 150), (204, 152), (196, 160), (385, 40)]  # a cluster, and one at the right edge
    taken = [(x - 6, y - 6, x + 6, y + 6) for x, y in points]
    boxes = []
    for i, (x, y) in enumerate(points + [(200, 150)] * 4):  # more labels than fit beside the cluster
        boxes.append(label(d, font, f"lantern:delta=0.{i},k=100", x, y, (0, 0, 0), list(taken) + boxes, right=400))
    assert all(b[2] <= 400 for b in boxes)  # the edge point's label went to its left
    assert not any(_overlap(b, t) for b in boxes for t in taken)
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_the_committed_rows_redraw_the_plot(tmp_path):
    """benchmarks/lantern_tradeoff.json (the tables of RESULTS.md) redraws benchmarks/lantern_tradeoff.png."""
    rows, ar_fids = merge([ROOT / "benchmarks" / "lantern_tradeoff.json"])
    by = {r["method"]: r for r in rows}
    assert set(ar_fids) == {"0", "1", "2"} and by["ar"]["fid"] == ar_fids["0"]
    assert {"lantern:delta=0", "lantern:delta=0,tree=static", "lantern:delta=0.1,k=100",
            "sjd:relax=lantern,delta=0.1,k=100", "sjd:draft_coupling=maximal"} <= set(by)
    assert all(r["sc1"] >= 1 for r in rows)
    assert plot(rows, ar_fids, tmp_path / "p.png") == len(rows)
