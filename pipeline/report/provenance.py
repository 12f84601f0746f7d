"""Where the results came from: the store's method, config hash and versions, the hosts and
devices its pairs ran on, and one line per run from ``STORE/logs/run-*.jsonl``."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["store_summary", "run_summaries"]

log = logging.getLogger(__name__)


def _counted(values: pd.Series) -> str:
    c = Counter(str(v) for v in values if str(v))
    return ", ".join(f"{k} ({n})" for k, n in c.most_common()) or "none recorded"


def _versions(v: Any) -> str:
    return ", ".join(f"{k} {val}" for k, val in v.items()) if isinstance(v, dict) and v else "not recorded"


def store_summary(attrs: dict[str, Any], table: pd.DataFrame) -> list[str]:
    """Plain-text lines: the store's method and config, the per-pair methods/configs, versions,
    hosts, devices and the time span of the pairs."""
    lines = [f"method {attrs.get('method', '?')}, config hash {str(attrs.get('config_hash', '?'))[:12]} "
             f"(the store's current config)"]
    done = table[table["status"].isin(["complete", "failed"])] if "status" in table else table
    if "method" in done and "config_hash" in done and len(done):
        combos = Counter(f"{m} / {str(h)[:12]}" for m, h in zip(done["method"], done["config_hash"]) if str(m))
        lines.append("pairs by method / config hash: " + (", ".join(f"{k} ({n})" for k, n in combos.most_common())
                                                           or "none recorded"))
    lines.append(f"versions: {_versions(attrs.get('versions'))}")
    if "host" in done:
        lines.append(f"hosts: {_counted(done['host'])}; devices: {_counted(done.get('device', pd.Series([])))}")
    started = sorted(str(v) for v in done.get("started", []) if str(v))
    finished = sorted(str(v) for v in done.get("finished", []) if str(v))
    if started or finished:
        lines.append(f"pairs started {started[0] if started else '?'}, last finished {finished[-1] if finished else '?'}")
    return lines


def _read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events


def run_summaries(store: str | Path) -> list[str]:
    """One plain-text line per run log of ``store``, oldest first."""
    lines = []
    for path in sorted((Path(store) / "logs").glob("run-*.jsonl")):
        try:
            events = _read_events(path)
        except OSError as exc:
            log.warning("cannot read run log %s: %s", path, exc)
            continue
        start = next((e for e in events if e.get("event") == "start"), {})
        end = next((e for e in reversed(events) if e.get("event") in ("end", "interrupted")), None)
        done = [e for e in events if e.get("event") == "pair"]
        status = Counter(str(e.get("status", "")) for e in done)
        hosts = Counter(str(e.get("host", "")) for e in done if e.get("host"))
        devices = Counter(str(e.get("device", "")) for e in done if e.get("device"))
        parts = [f"{path.stem}: method {start.get('method', '?')}, config hash {str(start.get('config_hash', '?'))[:12]}",
                 f"{start.get('pairs', '?')} pairs ({start.get('to_run', '?')} to run, {start.get('skipped', '?')} skipped)",
                 f"started {start.get('time', '?')}"]
        if end is None:
            parts.append("no end event (still running, or killed)")
        else:
            wall = end.get("wall_s")
            parts.append(f"{'interrupted' if end.get('event') == 'interrupted' else 'ended'} {end.get('time', '?')}"
                         + (f" after {float(wall):.1f} s" if isinstance(wall, (int, float)) else ""))
        parts.append(f"{status.get('complete', 0)} complete, {status.get('failed', 0)} failed")
        if hosts:
            parts.append("hosts " + ", ".join(f"{k} ({n})" for k, n in hosts.most_common()))
        if devices:
            parts.append("devices " + ", ".join(f"{k} ({n})" for k, n in devices.most_common()))
        parts.append(f"versions: {_versions(start.get('versions'))}")
        lines.append("; ".join(parts))
    return lines
