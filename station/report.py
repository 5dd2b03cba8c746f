"""``station report RESULTS… --out report.html``: defect trends over result records.

RESULTS are JSONL files as ``station run --jsonl`` and ``station replay`` write them,
or archive folders (``archive.path``: their ``*_record.json`` files, and their images).
The report is one self-contained HTML file (plots drawn as inline SVG, images
embedded): counts and rates per grade and per class, the counts over time (per
hour, shift or day), a heatmap per class of where defects sit on the part, and
the worst parts with their images when an archive holds them. Where a class's
defects cluster is said in words as well (``trends.Heatmap.where``).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

from .archive import entry_files, file_id
from .config import SHIFT_START
from .errors import EXIT_OK, InputError
from .trends import GRADES, GRID, GradeCounts, Heatmap, grade_totals, hour_start, local_label, record_time, shift_bounds

SEVERITY = {"PASS": 0, "DISCOUNT": 1, "REJECT": 2}
IMAGE_WIDTH = 360  # pixels of a worst part's image in the report
GRADE_COLOURS = {"PASS": "#2e9e52", "DISCOUNT": "#e59a16", "REJECT": "#d93a3a"}
PER_AUTO_HOURS = 48  # a span up to this many hours is shown per hour, a longer one per shift


@dataclass
class Loaded:
    """Records read from RESULTS: unique by id, with what could not be read, and the
    archives' files (``archive.entry_files``) merged."""

    records: list[dict] = field(default_factory=list)
    unreadable: int = 0
    duplicates: int = 0
    images: dict[str, dict[str, Path]] = field(default_factory=dict)


def _lines(path: Path) -> Iterator[str]:
    """The records' lines: a JSONL file's, or one per ``*_record.json`` of an archive folder."""
    if path.is_dir():
        for record in sorted(path.glob("*/*_record.json")):
            yield record.read_text(encoding="utf-8", errors="replace").replace("\n", " ")
    elif path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            yield from f
    else:
        raise InputError(f"{path}: no such file or folder")


def load(paths: Sequence[Path], archives: Sequence[Path] = ()) -> Loaded:
    """Read JSONL files and archive folders (``paths``); ``archives``: folders that only
    lend their images. InputError for a path that is not there."""
    out, seen = Loaded(), set()
    for folder in [*archives, *(p for p in paths if p.is_dir())]:
        if not folder.is_dir():
            raise InputError(f"{folder}: no such archive folder")
        out.images.update(entry_files(folder))
    for path in paths:
        for line in _lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                out.unreadable += 1
                continue
            if not isinstance(record, dict) or "id" not in record or ("grade" not in record and "error" not in record):
                out.unreadable += 1
            elif record["id"] in seen:
                out.duplicates += 1  # a re-sent MQTT result, or a file named twice
            else:
                seen.add(record["id"])
                out.records.append(record)
    return out


def heatmap_of(records: Iterable[dict]) -> Heatmap:
    heatmap = Heatmap()
    for r in records:
        heatmap.add(r)
    return heatmap


# --- figures ------------------------------------------------------------------------------


def class_rows(records: Sequence[dict]) -> list[dict]:
    """Per class, the most defects first: defects, parts with one, % of parts, mean and
    largest defect area (% of a part)."""
    results = [r for r in records if "grade" in r]
    defects: dict[str, list[float]] = {}
    parts: Counter[str] = Counter()
    for r in results:
        for d in r["defects"]:
            defects.setdefault(d["class"], []).append(float(d["area_pct"]))
        parts.update({d["class"] for d in r["defects"]})
    return [{"class": c, "defects": len(a), "parts": parts[c], "parts_pct": 100 * parts[c] / len(results),
             "mean_area_pct": float(np.mean(a)), "max_area_pct": max(a)}
            for c, a in sorted(defects.items(), key=lambda kv: (-len(kv[1]), kv[0]))]


def trend(records: Sequence[dict], per: str, shifts: Sequence[str]) -> tuple[str, list[tuple[str, dict[str, int]]]]:
    """Counts per grade per time bucket: (the bucket actually used, [(label, counts)]).
    ``per``: hour, shift, day or auto (hour for a span up to PER_AUTO_HOURS, else shift)."""
    times = [(t, r) for r in records if (t := record_time(r)) is not None]
    if per == "auto":
        span = max(t for t, _ in times) - min(t for t, _ in times) if times else 0.0
        per = "hour" if span <= PER_AUTO_HOURS * 3600 else "shift"
    counts = GradeCounts()
    for t, r in times:
        if per == "hour":
            bucket = hour_start(t)
        elif per == "shift":
            bucket = shift_bounds(t, shifts)[0]
        else:
            bucket = datetime.fromtimestamp(t).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        counts.add(bucket, r)
    return per, [(local_label(b), c) for b, c in counts.rows()]


def worst(records: Sequence[dict], n: int) -> list[dict]:
    """The ``n`` worst results with a defect: by grade, then by defect area."""
    results = [r for r in records if "grade" in r and r["defects"]]
    return sorted(results, key=lambda r: (-SEVERITY.get(r["grade"], 0), -float(r["defect_area_pct"])))[:n]


# --- drawing --------------------------------------------------------------------------------


def _heat(v: float) -> str:
    """0..1 → dark blue, red, yellow (as on the live page)."""
    stops = ((24, 32, 48), (200, 40, 40), (255, 220, 60))
    t = min(max(v, 0.0), 1.0) * 2
    i = min(int(t), 1)
    f = t - i
    r, g, b = (round(a + (z - a) * f) for a, z in zip(stops[i], stops[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def svg_heatmap(grid: np.ndarray, hot: tuple[int, int], label: str) -> str:
    """A GRID × GRID heatmap, row 0 at the top, the hottest cell outlined."""
    most = float(grid.max()) or 1.0
    cells = "".join(f'<rect x="{c}" y="{r}" width="1" height="1" fill="{_heat(grid[r, c] / most)}"/>'
                    for r in range(GRID) for c in range(GRID))
    outline = f'<rect x="{hot[1]}" y="{hot[0]}" width="1" height="1" fill="none" stroke="#fff" stroke-width="0.08"/>'
    return (f'<svg class="heatmap" viewBox="0 0 {GRID} {GRID}" role="img" aria-label="{html.escape(label)}">'
            f"{cells}{outline}</svg>")


def svg_trend(rows: Sequence[tuple[str, dict[str, int]]]) -> str:
    """Stacked bars of the parts per grade in each bucket, with the count on top and
    the bucket's start below (its time alone when all buckets fall on one day)."""
    width, height, left, top, bottom = 760, 220, 56, 16, 44
    n = max(len(rows), 12)  # a few buckets stay bars, not walls
    w = (width - left) / n
    most = max([sum(c[g] for g in GRADES) for _, c in rows] + [1])
    one_day = len({label[:10] for label, _ in rows}) == 1
    parts = []
    for i, (label, counts) in enumerate(rows):
        y, x = float(height - bottom), left + i * w + w / 2
        for g in GRADES:
            h = (height - top - bottom) * counts[g] / most
            y -= h
            if h > 0:
                parts.append(f'<rect x="{x - w / 2 + 1:.1f}" y="{y:.1f}" width="{max(w - 2, 0.5):.1f}" height="{h:.1f}" '
                             f'fill="{GRADE_COLOURS[g]}"><title>{html.escape(label)}: {counts[g]} {g}</title></rect>')
        parts.append(f'<text x="{x:.1f}" y="{y - 3:.1f}" text-anchor="middle">{sum(counts[g] for g in GRADES)}</text>')
        if n <= 24 or i % (n // 12 + 1) == 0:
            base = height - bottom + 14
            parts.append(f'<text x="{x:.1f}" y="{base}" text-anchor="end" transform="rotate(-35 {x:.1f} {base})">'
                         f"{html.escape(label[11:] if one_day else label[5:])}</text>")
    return f'<svg class="trend" viewBox="0 0 {width} {height}" role="img" aria-label="parts per grade over time">{"".join(parts)}</svg>'


def embedded_image(files: dict[str, Path] | None) -> str:
    """The archived overlay (else the frame) as an <img> with a JPEG data URI; "" when none."""
    path = (files or {}).get("overlay") or (files or {}).get("image")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path is not None else None
    if image is None:
        return ""
    h, w = image.shape[:2]
    if w > IMAGE_WIDTH:
        image = cv2.resize(image, (IMAGE_WIDTH, max(1, round(h * IMAGE_WIDTH / w))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(buf.tobytes()).decode()}">' if ok else ""


# --- the page -------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.4 system-ui, "DejaVu Sans", sans-serif; color: #1c232b; max-width: 980px; margin: 0 auto; padding: 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 24px 0 8px; border-bottom: 1px solid #d5dbe1; }
.meta { color: #5b6773; } table { border-collapse: collapse; margin: 6px 0; }
th, td { text-align: right; padding: 3px 10px; border-bottom: 1px solid #e3e7eb; } th:first-child, td:first-child { text-align: left; }
.where { font-size: 15px; } .where li { margin: 2px 0; }
svg.trend { width: 100%; height: auto; } svg.trend text { font-size: 11px; fill: #5b6773; }
.maps { display: flex; flex-wrap: wrap; gap: 18px; } .maps figure { margin: 0; width: 220px; }
svg.heatmap { width: 220px; height: 220px; border: 1px solid #c9d0d6; }
.part { display: flex; gap: 14px; border-bottom: 1px solid #e3e7eb; padding: 8px 0; } .part img { width: 360px; max-width: 45%; height: auto; }
.grade { font-weight: bold; padding: 1px 8px; border-radius: 3px; color: #fff; }
.PASS { background: #2e9e52; } .DISCOUNT { background: #e59a16; color: #000; } .REJECT { background: #d93a3a; }
@media (max-width: 640px) { .part { flex-direction: column; } .part img { max-width: 100%; } }
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _summary(records: Sequence[dict], loaded: Loaded) -> str:
    totals = grade_totals(records)
    parts = sum(totals[g] for g in GRADES)
    rows = "".join(f'<tr><td><span class="grade {g}">{g}</span></td><td>{totals[g]}</td>'
                   f"<td>{100 * totals[g] / parts if parts else 0:.1f} %</td></tr>" for g in GRADES)
    notes = [f"{totals['errors']} error records (frames that could not be inspected)"] if totals["errors"] else []
    if loaded.unreadable:
        notes.append(f"{loaded.unreadable} lines that are not records were skipped")
    if loaded.duplicates:
        notes.append(f"{loaded.duplicates} duplicate records (same id) were counted once")
    return (f"<h2>Grades</h2><table><tr><th>grade</th><th>parts</th><th>rate</th></tr>{rows}"
            f"<tr><td>all</td><td>{parts}</td><td></td></tr></table>"
            + "".join(f'<p class="meta">{_esc(n)}</p>' for n in notes))


def _classes(records: Sequence[dict]) -> str:
    rows = class_rows(records)
    if not rows:
        return "<h2>Defect classes</h2><p>No defect was found.</p>"
    body = "".join(f"<tr><td>{_esc(r['class'])}</td><td>{r['defects']}</td><td>{r['parts']}</td>"
                   f"<td>{r['parts_pct']:.1f} %</td><td>{r['mean_area_pct']:.3f} %</td><td>{r['max_area_pct']:.3f} %</td></tr>"
                   for r in rows)
    return ("<h2>Defect classes</h2><table><tr><th>class</th><th>defects</th><th>parts with one</th>"
            f"<th>of all parts</th><th>mean area</th><th>largest area</th></tr>{body}</table>"
            '<p class="meta">Areas in % of the part (the frame).</p>')


def _positions(heatmap: Heatmap) -> str:
    classes = heatmap.classes()
    if not classes:
        return ""
    where = "".join(f"<li>{_esc(heatmap.where(c))}</li>" for c in classes)
    maps = "".join(f"<figure><figcaption>{_esc(c)} · {heatmap.defects[c]} defects</figcaption>{svg_heatmap(heatmap.grids[c], heatmap.hot_cell(c), heatmap.where(c))}</figure>"
                   for c in classes)
    return (f'<h2>Where defects sit</h2><ul class="where">{where}</ul><div class="maps">{maps}</div>'
            f'<p class="meta">Defect area spread over each defect\'s box, on a {GRID} × {GRID} grid of the part '
            "(top of the image at the top); brighter is more; the hottest cell is outlined.</p>")


def _trend(records: Sequence[dict], per: str, shifts: Sequence[str]) -> str:
    used, rows = trend(records, per, shifts)
    if not rows:
        return ""
    table = "".join(f"<tr><td>{_esc(label)}</td>" + "".join(f"<td>{c[g]}</td>" for g in GRADES)
                    + f"<td>{100 * c['REJECT'] / max(1, sum(c[g] for g in GRADES)):.1f} %</td></tr>" for label, c in rows)
    return (f"<h2>Per {used}</h2>{svg_trend(rows)}<table><tr><th>{used} from</th>"
            + "".join(f"<th>{g}</th>" for g in GRADES) + f"<th>REJECT rate</th></tr>{table}</table>")


def _worst(records: Sequence[dict], n: int, images: dict[str, dict[str, Path]]) -> str:
    items = []
    for r in worst(records, n):
        defects = ", ".join(f"{d['class']} {d['area_pct']:.3f} %" for d in r["defects"])
        when = local_label(t) if (t := record_time(r)) is not None else ""
        items.append(f'<div class="part">{embedded_image(images.get(file_id(str(r["id"]))))}<div>'
                     f'<span class="grade {_esc(r["grade"])}">{_esc(r["grade"])}</span> {r["defect_area_pct"]:.3f} % '
                     f'<p class="meta">{_esc(when)} · {_esc(r.get("part_id") or "#" + str(r.get("seq")))} · {_esc(r.get("source"))}</p>'
                     f"<p>{_esc(r['rule'])}: {_esc(r['reason'])}</p><p>{_esc(defects)}</p></div></div>")
    return f"<h2>Worst parts</h2>{''.join(items)}" if items else ""


def render(loaded: Loaded, sources: Sequence[Path], per: str = "auto", shifts: Sequence[str] = ("06:00", "14:00", "22:00"),
           n_worst: int = 12) -> str:
    """The whole report as one HTML document."""
    records = loaded.records
    heatmap = heatmap_of(records)
    times = [t for r in records if (t := record_time(r)) is not None]
    period = f"{local_label(min(times))} to {local_label(max(times))}" if times else "no timed record"
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Inspection report</title><style>{CSS}</style></head><body>"
            f"<h1>Inspection report</h1><p class=\"meta\">{len(records)} records, {_esc(period)} (local time) · "
            f"from {_esc(', '.join(map(str, sources)))} · made {_esc(local_label(time.time()))}</p>"
            + _summary(records, loaded) + _positions(heatmap) + _classes(records) + _trend(records, per, shifts)
            + _worst(records, n_worst, loaded.images) + "</body></html>\n")


# --- the command ----------------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace) -> int:
    loaded = load(args.results, args.archive or ())
    if not loaded.records:
        raise InputError(f"no records in {', '.join(map(str, args.results))}")
    page = render(loaded, args.results, args.per, args.shifts, args.worst)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    totals = grade_totals(loaded.records)
    print(f"{args.out}: {sum(totals[g] for g in GRADES)} parts (" + ", ".join(f"{totals[g]} {g}" for g in GRADES)
          + f"), {totals['errors']} errors")
    heatmap = heatmap_of(loaded.records)
    for cls in heatmap.classes():
        print(heatmap.where(cls))
    return EXIT_OK


def _shift_starts(text: str) -> list[str]:
    starts = [s.strip() for s in text.split(",")]
    if not starts or not all(re.match(SHIFT_START, s) for s in starts):
        raise argparse.ArgumentTypeError(f"{text!r}: local times HH:MM separated by commas, e.g. 06:00,14:00,22:00")
    return starts


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="an HTML report of result records: grades, classes, trends, heatmaps",
                       description="One self-contained HTML file over result JSONL files and archive folders.")
    p.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                   help="JSONL file (station run --jsonl, station replay --out) or archive folder")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.html", help="the report to write")
    p.add_argument("--archive", type=Path, action="append", metavar="DIR",
                   help="an archive folder whose images show the worst parts (repeatable)")
    p.add_argument("--per", choices=("auto", "hour", "shift", "day"), default="auto",
                   help=f"time buckets of the trend (auto: hour up to {PER_AUTO_HOURS} h, else shift)")
    p.add_argument("--shifts", type=_shift_starts, default=["06:00", "14:00", "22:00"], metavar="HH:MM,…",
                   help="local times at which shifts start (default 06:00,14:00,22:00)")
    p.add_argument("--worst", type=int, default=12, metavar="N", help="how many of the worst parts to show (default 12)")
    p.set_defaults(func=_cmd_report)
