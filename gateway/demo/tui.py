"""The live terminal view (rich): traffic, faults, rejections, latency, outboxes, backends."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gateway.demo.view import View


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} ms"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _table(title: str, *cols: str) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, expand=True, pad_edge=False)
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    return t


def _traffic(v: View) -> Table:
    t = _table("Traffic", "", "/s", "total")
    t.add_row("sensor windows", f"{v.windows_seen_rate:,.1f}", f"{v.windows_seen:,.0f}")
    t.add_row("forwarded", f"{v.forwarded_rate:,.1f}", f"{v.forwarded:,.0f}")
    t.add_row("  fraction", "", _pct(v.fraction_forwarded))
    t.add_row("gateway in", f"{v.gateway_in_rate:,.1f}", f"{v.gateway_accepted + v.gateway_rejected:,.0f}")
    t.add_row("results out", f"{v.results_rate:,.1f}", f"{v.results:,}")
    if v.duplicates:
        t.add_row(Text("duplicates", style="red"), "", f"{v.duplicates:,}")
    return t


def _faults(v: View) -> Table:
    t = _table("Faults detected", "class", "results")
    if not v.faults:
        t.add_row(Text("none yet", style="dim"), "")
    for label, n in sorted(v.faults.items(), key=lambda kv: -kv[1]):
        t.add_row(label, f"{n:,}")
    return t


def _rejections(v: View) -> Table:
    t = _table("Rejections", "reason", "count")
    rows = {r: n for r, n in v.rejections.items() if n}
    if not rows:
        t.add_row(Text("none", style="green"), "")
    for reason, n in sorted(rows.items()):
        t.add_row(Text(reason, style="yellow"), f"{n:,.0f}")
    return t


def _latency(v: View) -> Table:
    t = _table("E2E latency", "", "p50", "p99")
    t.add_row("last 10 s", _ms(v.latency_p50_ms), _ms(v.latency_p99_ms))
    t.add_row("whole run", _ms(v.latency_all_p50_ms), _ms(v.latency_all_p99_ms))
    return t


def _outbox(v: View) -> Table:
    t = _table("Outboxes", "device", "waiting")
    if not v.outbox:
        t.add_row(Text("no agent metrics yet", style="dim"), "")
        return t
    total = sum(v.outbox.values())
    deepest = sorted(v.outbox.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
    t.add_row(f"all {len(v.outbox)}", f"{total:,.0f}")
    for dev, n in deepest:
        t.add_row(Text(dev, style="dim"), f"{n:,.0f}")
    return t


def _downlink(v: View) -> Text:
    """Receipts outstanding (PUBACKed by the broker, not yet receipted by the gateway), per device for
    the ones waiting most, receipts sent and command replies."""
    waiting = sorted(((d, n) for d, n in v.unreceipted.items() if n), key=lambda kv: (-kv[1], kv[0]))[:3]
    per_device = ", ".join(f"{d} {n:,.0f}" for d, n in waiting) or "none"
    replies = " ".join(f"{k} {n:,.0f}" for k, n in sorted(v.command_replies.items()) if n) or "none yet"
    return Text.assemble(("unreceipted: ", "dim"), f"{sum(v.unreceipted.values()):,.0f} ({per_device})",
                         ("   receipts sent ", "dim"), f"{v.receipts_sent:,.0f}",
                         ("   command replies: ", "dim"), replies)


def _commissioning(v: View) -> Text | None:
    """Each machine learning its normal before any anomaly is forwarded (the least advanced first)."""
    if not v.commissioning:
        return None
    slowest = sorted(v.commissioning.items(), key=lambda kv: (kv[1], kv[0]))[:4]
    per_device = ", ".join(f"{d} {100 * p:.0f}%" for d, p in slowest)
    more = f" +{len(v.commissioning) - len(slowest)} more" if len(v.commissioning) > len(slowest) else ""
    return Text.assemble(("commissioning: ", "bold yellow"),
                         f"{len(v.commissioning)} learning their machine's normal ({per_device}{more}), "
                         f"{v.commissioned} done; no anomaly is forwarded until a device is done")


def _backends(v: View) -> Table:
    t = _table("Models", "model", "runs on")
    if not v.backends:
        t.add_row(Text("not reported yet", style="dim"), "")
    for model, backend, requested in v.backends:
        asked = Text(f" ({requested})", style="dim") if requested and requested != backend else ""
        t.add_row(model, Text.assemble((backend, "bold cyan"), asked))
    return t


def _attack(v: View) -> Table:
    t = _table("Hostile device sent", "kind", "count")
    for kind, n in sorted(v.attack_sent.items()):
        t.add_row(kind, f"{n:,}")
    return t


def _grid(*cells: tuple[RenderableType, int]) -> Table:
    g = Table.grid(expand=True, padding=(0, 2))
    for _, ratio in cells:
        g.add_column(ratio=ratio)
    g.add_row(*(c for c, _ in cells))
    return g


def render(v: View) -> RenderableType:
    state = "connected" if v.gateway_connected else ("up" if v.gateway_up else "down")
    head = Text.assemble(
        ("sgw demo", "bold"), f"  {v.devices} devices, {v.agents_alive} agents running  ",
        ("gateway ", ""), (state, "green" if v.gateway_connected else "red"),
        f"  {int(v.elapsed_s) // 60:02d}:{int(v.elapsed_s) % 60:02d}",
    )
    rejections = _rejections(v) if not v.attack else Group(_rejections(v), _attack(v))
    rows: list[RenderableType] = [
        head,
        _grid((_traffic(v), 4), (_faults(v), 3), (rejections, 3)),
        _grid((_latency(v), 4), (_outbox(v), 3), (_backends(v), 3)),
        *([learning] if (learning := _commissioning(v)) is not None else []),
        _downlink(v),
        Text.assemble(("metrics: ", "dim"), (v.metrics_url, "underline"), ("   state: ", "dim"), v.state_dir),
    ]
    if v.scada:
        rows.append(Text(v.scada, style="cyan"))
    rows.extend(Text(n, style="yellow") for n in v.notes)
    rows.append(Text("Ctrl-C stops everything and prints a summary", style="dim"))
    return Panel(Group(*rows), box=box.ROUNDED, padding=(0, 1))
