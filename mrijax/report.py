"""One report writer for every evaluation (evaluate, studies, cross-validation): the same table as Markdown
for people, CSV for spreadsheets and JSON for programs."""
from __future__ import annotations

import csv
import json
from pathlib import Path


def write_report(out_dir, rows: list[dict], markdown: str, meta: dict | None = None, name: str = "report") -> dict:
    """Write <name>.md (`markdown`), <name>.csv (one line per row, columns in first-seen order) and <name>.json
    ({**meta, "rows": rows}) into `out_dir`; returns {"md", "csv", "json"} paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{name}.{kind}" for kind in ("md", "csv", "json")}
    paths["md"].write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps({**(meta or {}), "rows": rows}, indent=2, default=str) + "\n")
    return paths
