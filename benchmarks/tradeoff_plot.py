"""FID-1k against step compression for every decoding method: the PNG a user picks a setting from.

    python benchmarks/tradeoff_plot.py speed.json fid_*.json --out benchmarks/lantern_tradeoff.png [--table] [--save-rows rows.json]

Reads the JSONs ``benchmarks/decoding.py --json`` writes (speed rows from one run, FID rows from one process per
method: rows with the same method label are merged, later files filling missing fields, and ar's seed FIDs are
pooled). One labelled point per row that has both a step compression and a FID; ar's seed-to-seed FID range is
the grey band (and 2x the spread the dashed lines: the targets' tolerance). Drawn with PIL (matplotlib is not a
dependency). ``--table``: also print the merged markdown table (benchmarks/decoding.py's columns); ``--save-rows``:
write the merged rows as one JSON, which redraws the same plot on its own (benchmarks/lantern_tradeoff*.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = [  # (test on the label, legend, colour)
    (lambda m: m == "ar", "ar", (0, 0, 0)),
    (lambda m: m.startswith("lantern") and "lam=" in m and "lam=null" not in m, "LANTERN++ (λ)", (214, 39, 40)),
    (lambda m: m.startswith("lantern") and ("delta=0," in m or m.endswith("delta=0") or "k=0" in m),
     "draft-head SD (δ=0)", (31, 119, 180)),
    (lambda m: m.startswith("lantern"), "LANTERN (δ)", (255, 127, 14)),
    (lambda m: m.startswith("sjd") and "relax=lantern" in m, "sjd relaxed", (44, 160, 44)),
    (lambda m: m.startswith("sjd"), "sjd (exact)", (148, 103, 189)),
]


def family(method: str) -> tuple[str, tuple]:
    for test, name, colour in FAMILIES:
        if test(method):
            return name, colour
    return "other", (127, 127, 127)


def merge(paths: list[Path]) -> tuple[list[dict], dict]:
    """Rows merged by method label (first appearance order) and ar's FID per seed, from several result JSONs."""
    rows, ar_fids = {}, {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        ar_fids.update(data.get("ar_fids", {}))
        for r in data["rows"]:
            rows.setdefault(r["method"], {}).update({k: v for k, v in r.items() if v is not None})
    if "0" in ar_fids and "ar" in rows:
        rows["ar"]["fid"] = ar_fids["0"]  # the ar row is seed 0, like every other row
    return list(rows.values()), ar_fids


def short(method: str) -> str:
    """A point's label: the settings without the drafter path."""
    name, _, rest = method.partition(":")
    items = [i for i in rest.split(",") if i and not i.startswith("drafter_ckpt=")]
    return name + (":" + ",".join(items) if items else "")


def label(d, font, text: str, cx: float, cy: float, colour, taken: list, right: float) -> tuple:
    """Write ``text`` next to the point (cx, cy) at the first nearby spot whose box overlaps no box in ``taken``
    (right of the point, else left of it, stepping away vertically), joined to the point by a line when moved
    off it; returns the box used."""
    l, t, r, b = d.textbbox((0, 0), text, font=font)
    w, h = r - l, b - t

    def free(box):
        return box[2] <= right and all(box[2] < o[0] or box[0] > o[2] or box[3] < o[1] or box[1] > o[3] for o in taken)

    for dy in [0] + [s * k * (h + 3) for k in range(1, 12) for s in (-1, 1)]:
        for x0 in (cx + 9, cx - 9 - w):
            box = (x0, cy - h / 2 - 2 + dy, x0 + w, cy + h / 2 + 2 + dy)
            if free(box):
                if dy:
                    d.line([cx, cy, x0 if x0 > cx else x0 + w, cy + dy], fill=colour)
                d.text((x0, box[1] - t + 2), text, fill=colour, font=font)
                return box
    box = (cx + 9, cy - h / 2, cx + 9 + w, cy + h / 2)  # nowhere free: beside the point
    d.text((box[0], box[1] - t), text, fill=colour, font=font)
    return box


def plot(rows: list[dict], ar_fids: dict, out: Path, x_key: str = "sc1", title: str = "") -> int:
    """Draw the PNG; returns the number of points."""
    from PIL import Image, ImageDraw, ImageFont

    pts = [(r[x_key], r["fid"], r["method"]) for r in rows if r.get(x_key) is not None and r.get("fid") is not None]
    no_fid = [(r[x_key], r["method"]) for r in rows if r.get(x_key) is not None and r.get("fid") is None]
    if not pts:
        raise ValueError(f"no row has both {x_key} and fid: run benchmarks/decoding.py with FID (or pass the FID JSONs)")
    W, H, ml, mr, mt, mb = 1400, 900 + 14 * len(no_fid), 90, 330, 50, 96 + 14 * len(no_fid)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    try:  # DejaVu has δ and λ; PIL's built-in font (Pillow >= 10.1: scalable) otherwise
        font = ImageFont.truetype("DejaVuSans.ttf", 13)
    except OSError:
        font = ImageFont.load_default(size=13)
    xs, ys = [p[0] for p in pts] + [p[0] for p in no_fid], [p[1] for p in pts] + [float(v) for v in ar_fids.values()]
    x0, x1 = 0.9, max(xs) * 1.08 + 0.1
    spread = max(map(float, ar_fids.values())) - min(map(float, ar_fids.values())) if len(ar_fids) > 1 else 0.0
    ar_fid = float(ar_fids.get("0", next(iter(ar_fids.values()), 0.0))) if ar_fids else None
    y_lo = min(ys + ([ar_fid - 2 * spread] if ar_fid is not None else []))
    y_hi = max(ys + ([ar_fid + 2 * spread] if ar_fid is not None else []))
    pad = max(0.5, 0.08 * (y_hi - y_lo))
    y0, y1 = y_lo - pad, y_hi + pad

    def X(v):
        return ml + (v - x0) / (x1 - x0) * (W - ml - mr)

    def Y(v):
        return H - mb - (v - y0) / (y1 - y0) * (H - mt - mb)

    if len(ar_fids) > 1:  # ar's seed range, and 2x the spread around seed 0
        lo, hi = min(map(float, ar_fids.values())), max(map(float, ar_fids.values()))
        d.rectangle([X(x0), Y(hi), X(x1), Y(lo)], fill=(225, 225, 225))
        for yy in (ar_fid - 2 * spread, ar_fid + 2 * spread):
            for xx in range(int(X(x0)), int(X(x1)), 12):
                d.line([xx, Y(yy), xx + 6, Y(yy)], fill=(120, 120, 120))
    d.rectangle([ml, mt, W - mr, H - mb], outline="black")
    for i in range(6):  # ticks
        xv, yv = x0 + i * (x1 - x0) / 5, y0 + i * (y1 - y0) / 5
        d.line([X(xv), H - mb, X(xv), H - mb + 5], fill="black")
        d.text((X(xv) - 12, H - mb + 8), f"{xv:.2f}", fill="black", font=font)
        d.line([ml - 5, Y(yv), ml, Y(yv)], fill="black")
        d.text((ml - 55, Y(yv) - 6), f"{yv:.1f}", fill="black", font=font)
    d.text(((W - mr + ml) / 2 - 140, H - mb + 26), f"step compression (tokens / target forwards, {x_key})", fill="black",
           font=font)
    d.text((10, mt - 18), "FID-1k (seed 0)", fill="black", font=font)
    d.text((ml + 120, 6), title or "FID-1k against step compression, one point per setting", fill="black", font=font)
    taken = [(X(xv) - 6, Y(yv) - 6, X(xv) + 6, Y(yv) + 6) for xv, yv, _ in pts]  # boxes labels must avoid
    for xv, yv, m in sorted(pts):
        _, colour = family(m)
        cx, cy = X(xv), Y(yv)
        d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=colour, outline="black")
        taken.append(label(d, font, short(m), cx, cy, colour, taken, W - mr))
    base = H - mb + 68  # rows without a FID: hollow markers under the axes, at their x
    if no_fid:
        d.text((10, base - 16), "no FID-1k run (step compression only):", fill="black", font=font)
    for i, (xv, m) in enumerate(sorted(no_fid)):
        _, colour = family(m)
        cy = base + 14 * i
        d.ellipse([X(xv) - 4, cy - 4, X(xv) + 4, cy + 4], outline=colour)
        d.text((X(xv) + 8, cy - 6), f"{short(m)} ({xv:.2f})", fill=colour, font=font)
    ly = mt
    for _, name, colour in FAMILIES:  # legend
        d.ellipse([W - mr + 20, ly + 2, W - mr + 30, ly + 12], fill=colour, outline="black")
        d.text((W - mr + 38, ly), name, fill="black", font=font)
        ly += 18
    if len(ar_fids) > 1:
        d.rectangle([W - mr + 20, ly + 2, W - mr + 30, ly + 12], fill=(225, 225, 225), outline="black")
        d.text((W - mr + 38, ly), f"ar FID, seeds {', '.join(sorted(ar_fids))}", fill="black", font=font)
        d.text((W - mr + 38, ly + 18), f"- - ar seed 0 ± 2x spread ({spread:.2f})", fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return len(pts) + len(no_fid)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="result JSONs of benchmarks/decoding.py --json")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/lantern_tradeoff.png"))
    parser.add_argument("--x", default="sc1", help="the step-compression field: sc1 (batch 1) or sc16 (batch 16)")
    parser.add_argument("--title", default="")
    parser.add_argument("--table", action="store_true", help="print the merged markdown table")
    parser.add_argument("--save-rows", type=Path, default=None,
                        help="also write the merged rows as one JSON (commit it beside the PNG: it redraws the plot)")
    args = parser.parse_args(argv)
    rows, ar_fids = merge(args.json)
    if args.save_rows:
        args.save_rows.write_text(json.dumps({"note": "merged by benchmarks/tradeoff_plot.py from " + ", ".join(
            str(p) for p in args.json), "rows": rows, "ar_fids": ar_fids}, indent=1, ensure_ascii=False))
    n = plot(rows, ar_fids, args.out, args.x, args.title)
    print(f"{args.out}: {n} points")
    if args.table:
        from benchmarks.decoding import table

        print(table(rows, 1, 16))
        print("ar FID by seed: " + ", ".join(f"{k}: {float(v):.2f}" for k, v in sorted(ar_fids.items())))


if __name__ == "__main__":
    main()
