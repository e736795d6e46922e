"""The report's files from its tables: README.md (the first screen, grid and plots; each folded block
as its own Markdown page beside it), a self-contained index.html (plots inlined as base64 PNG, folded
blocks as <details>; no external scripts, fonts or images), CSV and JSON of every table, PNG plots.
"""
import base64
import html
import re

import pandas as pd

from moeq.evaluate.report import page
from moeq.evaluate.report.tables import MISSING, VERDICT_WORDS


def anchor(text: str) -> str:
    """GitHub's heading anchor, so README.md's contents links work there and in index.html alike."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def markdown_table(df: pd.DataFrame) -> str:
    """A pipe table without tabulate's padding to the widest cell, which doubles the README's size."""
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")
    lines = [list(map(cell, df.columns)), [":--"] * len(df.columns)] + [list(map(cell, r)) for r in df.to_numpy()]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def to_markdown(blocks, folder) -> str:
    """Markdown of `blocks`; a folded block becomes a link to its own page, written into `folder`."""
    parts = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            parts.append(rest[0])
        elif kind == "toc":
            parts.append("\n".join(f"- [{t}](#{anchor(t)})" for t in rest[0]))
        elif kind == "table":
            parts.append(markdown_table(rest[0]) if len(rest[0]) else "_(none)_")
        elif kind == "img":
            parts.append(f"![{rest[1]}]({rest[0]})")
        elif kind == "details":
            title, name, inner = rest
            (folder / f"{name}.md").write_text(to_markdown([("h1", title)] + inner, folder))
            parts.append(f"- [{title}]({name}.md)")
    return "\n\n".join(parts) + "\n"


CSS = """body{font:14px/1.35 system-ui,sans-serif;margin:1em 1.5em;max-width:110em;color:#222}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.2em;margin:.9em 0 .3em}h3{font-size:1.05em;margin:.6em 0 .2em}
p{margin:.3em 0}table{border-collapse:collapse;font-size:.85em;margin:.4em 0}
th,td{border:1px solid #ccc;padding:.2em .4em;text-align:left;vertical-align:top}
th{background:#f0f0f0}.holds{background:#d4f4d4}.fails{background:#f8d0d0}.inconclusive{background:#fbf0c0}
.not-measured{background:#e8e8e8;color:#555}.flagged{background:#e6d8f5}figure{margin:1em 0}img{max-width:100%}
code{background:#f4f4f4;padding:0 .2em}details{margin:.3em 0}summary{cursor:pointer;font-weight:600}"""
# a cell that is a verdict word, or ends in "· <verdict>" (grid cells), is coloured by that verdict
VERDICT_CELL = re.compile(r"<td>((?:[^<]* · )?(" + "|".join(VERDICT_WORDS) + r")(?: \([^<]*\))?)</td>")


def inline(text: str) -> str:
    """Markdown's `code`, **bold** and [links](#x) in a paragraph, as HTML."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)


def to_html_body(blocks, folder) -> list[str]:
    parts = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f'<{kind} id="{anchor(rest[0])}">{html.escape(rest[0])}</{kind}>')
        elif kind == "p":
            parts.append(f"<p>{inline(rest[0])}</p>")
        elif kind == "toc":
            parts.append("<ul>" + "".join(f'<li><a href="#{anchor(t)}">{html.escape(t)}</a></li>' for t in rest[0])
                         + "</ul>")
        elif kind == "table":
            table = rest[0].to_html(index=False, table_id=rest[1], border=0, na_rep=MISSING)
            table = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", table)
            parts.append(VERDICT_CELL.sub(lambda m: f'<td class="{m[2].replace(" ", "-")}">{m[1]}</td>', table))
        elif kind == "img":
            data = base64.b64encode((folder / rest[0]).read_bytes()).decode()
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(rest[1])}">'
                         f"<figcaption>{html.escape(rest[1])}</figcaption></figure>")
        elif kind == "details":
            title, name, inner = rest
            parts.append(f'<details id="{name}"><summary>{html.escape(title)}</summary>'
                         + "\n".join(to_html_body(inner, folder)) + "</details>")
    return parts


def to_html(blocks, folder) -> str:
    title = html.escape(blocks[0][1])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(to_html_body(blocks, folder)) + "\n</body></html>\n")


def write_all(folder, name, ledger_path, tables, unsupported, env, settings, claims, formats, log=print):
    """`tables`: the numeric tables (each written as CSV and JSON), `keys` (the ledger's groups) and
    `anchor_notes` (text beside the published figures)."""
    for table_name, df in tables.items():
        if table_name not in ("keys", "anchor_notes"):
            df.to_csv(folder / f"{table_name}.csv", index=False)
            df.to_json(folder / f"{table_name}.json", orient="records", indent=2, force_ascii=False)
    blocks = page.blocks(name, ledger_path, tables, unsupported, env, settings, claims, formats, folder)
    (folder / "README.md").write_text(to_markdown(blocks, folder))
    (folder / "index.html").write_text(to_html(blocks, folder))
    log(f"wrote {len(tables) - 1} tables (CSV, JSON), README.md, index.html and "
        f"{sum(b[0] == 'img' for b in blocks)} plots")
