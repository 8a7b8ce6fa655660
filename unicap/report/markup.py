"""The page's HTML pieces every section uses: escaping, numbers, badges, tables, and the Section record.

Every string that comes from the run (captions are model output, keys, error details, prompts, paths)
goes through `esc` (html.escape); the Content-Security-Policy forbids scripts and every remote load, so
even markup that slipped through could neither run nor fetch anything.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass


def esc(value) -> str:
    """Any value as HTML text: nothing the run wrote can become markup."""
    return html.escape("" if value is None else str(value), quote=True)


def code_spans(text: str) -> str:
    """Escaped text with `backticked` parts as <code>."""
    parts = str(text).split("`")
    return "".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p) for i, p in enumerate(parts))


def num(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.3f}"
    return f"{v:,}" if isinstance(v, int) else esc(v)


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def level_class(v: float | None, good: float = 0.9, mid: float = 0.6, higher_is_better: bool = True) -> str:
    if v is None:
        return ""
    if not higher_is_better:
        v, good, mid = 1 - v, 1 - good, 1 - mid
    return "good" if v >= good else "mid" if v >= mid else "bad"


def badge(text: str, kind: str = "neutral") -> str:
    return f'<span class="badge {esc(kind)}">{esc(text)}</span>'


def status_badge(status: str | None) -> str:
    return badge(status or "no caption row", status if status in ("ok", "partial", "failed") else "neutral")


def status_chips(counts: Iterable[tuple[str, int]]) -> str:
    """(caption status, rows) pairs as badges with their counts, in the order given."""
    return " ".join(status_badge(k) + f" {v:,}" for k, v in counts)


def thumb(uri: str | None, alt: str, no_image: str) -> str:
    """An inlined image, or a grey box that says `no_image` when there is none."""
    return f'<img src="{uri}" alt="{esc(alt)}">' if uri else f'<div class="noimg">{no_image}</div>'


def figure(uri: str | None, alt: str) -> str:
    return f'<img class="figure" src="{uri}" alt="{esc(alt)}">' if uri else ""


def section_head(sec: Mapping) -> str:
    """The missing parts, a read error and the notes of a section."""
    out = []
    if sec.get("error"):
        out.append(f'<div class="error"><b>Could not read this part:</b> {esc(sec["error"])}</div>')
    for what, how in sec.get("missing") or []:
        out.append(f'<div class="missing"><b>Missing:</b> {esc(what)}. Produce it with {code_spans(how)}.</div>')
    out += [f'<div class="note">{code_spans(n)}</div>' for n in sec.get("notes") or []]
    return "".join(out)


def section(sid: str, title: str, lead: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2><p class="lead">{lead}</p>{body}</section>'


def table(head: Iterable[str], rows: Iterable[Iterable[str]], num_cols: Iterable[int] = ()) -> str:
    """A table of already-escaped cells; columns in num_cols right-aligned."""
    nums = set(num_cols)
    h = "".join(f'<th class="num">{c}</th>' if i in nums else f"<th>{c}</th>" for i, c in enumerate(head))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in nums else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f'<div class="scroll"><table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table></div>'


@dataclass(frozen=True)
class Section:
    """One section of the page: its anchor, its link in the nav bar, its heading, the lead under the heading
    (HTML), and the function that writes its body from the collected report."""

    sid: str
    nav: str
    title: str
    lead: str
    body: Callable[[Mapping], str]

    def render(self, report: Mapping) -> str:
        return section(self.sid, self.title, self.lead, self.body(report))
