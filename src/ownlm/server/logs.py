"""The access log: one line per request, written when its response has ended (for a stream, its
last event), as text for people or as one JSON object for log collectors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

LOG_FORMATS = ("text", "json")
MAX_REASON = 200  # characters of an error message kept in the log


@dataclass
class Entry:
    """What a request tells the log as it runs; the Guard fills in the rest."""

    model: str | None = None
    usage: Callable[[], dict[str, int]] | None = None  # read at the end: a stream's final counts
    error: str | None = None


def reason(message: str) -> str:
    """An error message on one line, at most MAX_REASON characters."""
    line = " ".join(message.split())
    return line if len(line) <= MAX_REASON else line[:MAX_REASON - 1] + "…"


def record(start: datetime, client: Any, method: str, route: str, status: int, ms: float,
           entry: Entry) -> dict[str, Any]:
    usage = entry.usage() if entry.usage else {}
    return {"time": start.isoformat(timespec="milliseconds"),
            "client": f"{client[0]}:{client[1]}" if client else None, "method": method, "route": route,
            "status": status, "ms": round(ms, 1), "model": entry.model,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "error": reason(entry.error) if entry.error else None}


def line(rec: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rec, ensure_ascii=False)
    out = f"{rec['time']} {rec['client'] or '-'} {rec['method']} {rec['route']} {rec['status']} {rec['ms']:.0f}ms"
    if rec["model"] is not None:
        out += f" model={_word(rec['model'])}"
    if rec["prompt_tokens"] is not None:
        out += f" prompt_tokens={rec['prompt_tokens']} completion_tokens={rec['completion_tokens']}"
    if rec["error"]:
        out += f" error={json.dumps(rec['error'], ensure_ascii=False)}"
    return out


def _word(value: str) -> str:
    """A client's string as one word of the text line: as is when plain, else quoted and escaped."""
    plain = value and value.isprintable() and not any(c in value for c in ' "=\\')
    return value if plain else json.dumps(value)
