"""Derived figures (ratios to the ceiling, targets), the text summary, the PNG plot, py-spy top frames."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt

# Targets from issues 9 and 19. Ratios are judged against the ceilings measured in the same run.
THROUGHPUT_RATIO = 0.75  # issue 9: one gateway vs bare paho (the Python ceiling)
C_CLIENT_RATIO = 0.15  # issue 19: one gateway vs mosquitto_sub (the physical ceiling here)
THROUGHPUT_MIN = 25_000.0  # issue 19: windows/s, one gateway process
WORKERS_SPEEDUP = 1.6  # issue 19: workers = 2 vs one worker
WORKERS_SCALE_RATIO = 0.85  # issue 19: workers = 2 vs two raw paho subscribers
P99_MS = {"1000": 2.0, "5000": 5.0}
RSS_GROWTH = 0.10


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def derive(res: dict[str, Any]) -> None:
    c, s = res["ceiling"], res["sgw"]
    ratios: dict[str, float] = {}
    targets: list[dict[str, Any]] = []

    raw_rate, sgw_rate = _get(c, "drain", "rate"), _get(s, "drain", "rate")
    c_rate = _get(c, "drain_c", "rate")
    if sgw_rate:
        targets.append({"target": f"throughput >= {THROUGHPUT_MIN:,.0f} windows/s (one process)",
                        "measured": sgw_rate, "limit": THROUGHPUT_MIN, "met": sgw_rate >= THROUGHPUT_MIN,
                        "detail": f"{sgw_rate:,.0f} windows/s"})
    if c_rate and sgw_rate:
        ratios["throughput_sgw_over_c_drain"] = sgw_rate / c_rate
        targets.append({"target": "throughput >= 15% of the C client's (mosquitto_sub) drain (one process)",
                        "measured": sgw_rate / c_rate, "limit": C_CLIENT_RATIO,
                        "met": sgw_rate / c_rate >= C_CLIENT_RATIO,
                        "detail": f"{sgw_rate:,.0f} vs {c_rate:,.0f} msg/s"})
    if c_rate and raw_rate:
        ratios["raw_paho_over_c_drain"] = raw_rate / c_rate
    if raw_rate and sgw_rate:
        ratios["throughput_sgw_over_raw_drain"] = sgw_rate / raw_rate
        targets.append({"target": "throughput >= 75% of the raw paho QoS 1 TLS drain (one process)",
                        "measured": sgw_rate / raw_rate, "limit": THROUGHPUT_RATIO,
                        "met": sgw_rate / raw_rate >= THROUGHPUT_RATIO,
                        "detail": f"{sgw_rate:,.0f} vs {raw_rate:,.0f} msg/s"})
    raw2, sgw2 = _get(c, "drain_x2", "rate"), _get(s, "drain_x2", "rate")
    if raw2 and sgw2:
        ratios["scale_two_gateways_over_two_raw"] = sgw2 / raw2
        targets.append({"target": "scale: two gateways vs two raw subscribers (shared subscription)",
                        "measured": sgw2 / raw2, "limit": THROUGHPUT_RATIO,
                        "met": sgw2 / raw2 >= THROUGHPUT_RATIO,
                        "detail": f"{sgw2:,.0f} vs {raw2:,.0f} msg/s; one gateway {sgw_rate or 0:,.0f}"})
    w2 = _get(s, "drain_workers2", "rate")
    if w2 and sgw_rate:
        ratios["workers2_over_one_worker"] = w2 / sgw_rate
        targets.append({"target": f"workers = 2 >= {WORKERS_SPEEDUP:g}x one worker",
                        "measured": w2 / sgw_rate, "limit": WORKERS_SPEEDUP,
                        "met": w2 / sgw_rate >= WORKERS_SPEEDUP,
                        "detail": f"{w2:,.0f} vs {sgw_rate:,.0f} windows/s"})
    if w2 and raw2:
        ratios["workers2_over_two_raw"] = w2 / raw2
        targets.append({"target": "scale: workers = 2 vs two raw subscribers (shared subscription)",
                        "measured": w2 / raw2, "limit": WORKERS_SCALE_RATIO,
                        "met": w2 / raw2 >= WORKERS_SCALE_RATIO,
                        "detail": f"{w2:,.0f} vs {raw2:,.0f} msg/s"})
    for k in (1, 3):  # PostgreSQL against SQLite's one instance, same run
        pg_rate = _get(s, "postgres", f"drain_x{k}", "rate")
        if pg_rate and sgw_rate:
            ratios[f"postgres_x{k}_over_sqlite_one"] = pg_rate / sgw_rate
    raw_cpu, sgw_cpu = _get(c, "drain", "cpu_s_per_1000"), _get(s, "drain", "gateway_cpu_s_per_1000")
    if raw_cpu and sgw_cpu:
        ratios["cpu_raw_over_sgw_per_window"] = raw_cpu / sgw_cpu

    # Latency next to the raw two-hop path at the same offered rate: raw / sgw, so 1 = as fast as bare
    # MQTT and < 1 = slower. Not bounded: where the raw echo (one republish per message) saturates
    # before the gateway (one ResultBatch per batch), sgw is faster and the ratio exceeds 1.
    lat_ratios: dict[str, float] = {}
    for key, lim in [*P99_MS.items(), ("80pct", None)]:
        sgw_l = _get(s, "latency", key, "latency_ms")
        raw_l = _get(c, "two_hop", key, "latency_ms")
        if sgw_l and raw_l:
            for q in ("p50", "p99", "p999"):
                if sgw_l[q] > 0:
                    lat_ratios[f"{q}_raw_two_hop_over_sgw_{key}"] = raw_l[q] / sgw_l[q]
        if sgw_l and lim is not None:
            targets.append({"target": f"e2e p99 <= {lim:g} ms at {int(key):,} windows/s",
                            "measured": sgw_l["p99"], "limit": lim, "met": sgw_l["p99"] <= lim,
                            "detail": f"p50 {sgw_l['p50']:.2f} / p99 {sgw_l['p99']:.2f} / p999 "
                                      f"{sgw_l['p999']:.2f} ms; raw two-hop p99 "
                                      f"{raw_l['p99'] if raw_l else float('nan'):.2f} ms"})
    ov = s.get("overload")
    if ov:
        growth = _get(ov, "gateway_rss_mb", "growth")
        offered = _get(ov, "load", "achieved_rate") or 0.0
        ratios["overload_offered_over_capacity"] = offered / ov["capacity"] if ov["capacity"] else 0.0
        if growth is not None:
            targets.append({"target": "RSS growth <= 10% under 2x overload, 0 lost",
                            "measured": growth, "limit": RSS_GROWTH,
                            "met": growth <= RSS_GROWTH and ov["lost"] == 0,
                            "detail": f"lost {ov['lost']} of {ov['sent']}; offered {offered:,.0f}/s = "
                                      f"{offered / ov['capacity']:.2f}x capacity"})
    for t in targets:
        if not t["met"]:
            lim, m = t["limit"], t["measured"]
            higher_is_better = t["target"].startswith(("throughput", "scale", "workers"))
            t["miss_by"] = (lim - m) / lim if higher_is_better else (m - lim) / lim
    res["ratios"] = ratios
    res["latency_ratios"] = lat_ratios
    res["targets"] = targets


def summary(res: dict[str, Any]) -> str:
    c, s = res["ceiling"], res["sgw"]
    meta = res["meta"]
    lines = [(f"sgw benchmark ({meta['profile']}, {meta['payload_bytes']}-byte sealed windows, "
              f"{meta['devices']} devices, {meta['duration_s']} s)")]

    def lat(x: dict[str, Any] | None) -> str:
        return (f"p50 {x['p50']:.3f} p99 {x['p99']:.3f} p999 {x['p999']:.3f} ms" if x else "-")

    if "drain_c" in c:
        d = c["drain_c"]
        lines.append(f"C client drain (mosquitto_sub): {d['rate']:,.0f} msg/s, "
                     f"redelivered {d['redelivered']}")
    if "drain" in c:
        d = c["drain"]
        lines.append(f"raw paho drain: {d['rate']:,.0f} msg/s, cpu {d['cpu_s_per_1000']:.3f} s/1000")
    if "drain" in s:
        d = s["drain"]
        lines.append(f"sgw drain: {d['rate']:,.0f} windows/s, cpu {d.get('gateway_cpu_s_per_1000') or 0:.3f} "
                     f"s/1000, lost {d['lost']}; ratio to the C client "
                     f"{res['ratios'].get('throughput_sgw_over_c_drain', float('nan')):.3f}, to bare paho "
                     f"{res['ratios'].get('throughput_sgw_over_raw_drain', float('nan')):.3f}")
    for key, name in (("drain_x2", "two sgw gateway processes"),
                      ("drain_workers2", "sgw gateway, workers = 2")):
        if key in s:
            d = s[key]
            lines.append(f"{name}: {d['rate']:,.0f} windows/s, lost {d['lost']}")
    for key in ("1000", "5000", "80pct"):
        for name, d in (("raw 1-hop", c.get("one_hop", {})), ("raw 2-hop", c.get("two_hop", {})),
                        ("sgw e2e", s.get("latency", {}))):
            if key in d:
                rate = d[key]["offered_rate"]
                lines.append(f"{name} @ {key} ({rate:,.0f}/s): {lat(d[key].get('latency_ms'))}")
    if "overload" in s:
        o = s["overload"]
        lines.append(f"overload: offered {o['load']['achieved_rate']:,.0f}/s for {o['load']['sent']:,} "
                     f"windows, lost {o['lost']}, rss {_get(o, 'gateway_rss_mb') or '-'}")
    for k in (1, 3):
        d = _get(s, "postgres", f"drain_x{k}")
        if d:
            l1 = _get(s, "postgres", f"latency_x{k}", "1000")
            lines.append(f"postgresql, {k} instance(s): drain {d['rate']:,.0f} windows/s, lost {d['lost']}, "
                         f"db cpu {d.get('db_cpu_s_per_1000') or 0:.3f} s/1000; e2e @ 1000/s "
                         f"{lat(l1.get('latency_ms') if l1 else None)}")
    lines += [f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {t['measured']:.3f} ({t['detail']})"
              for t in res.get("targets", [])]
    lines += [f"not measured: {m}" for m in res.get("missing", [])]
    return "\n".join(lines)


def top_frames(raw: Path, n: int = 15) -> dict[str, Any]:
    """py-spy --format raw (collapsed stacks): the top functions by own and by inclusive time, and the
    top source lines by own time (fractions of all samples)."""
    if not raw.exists():
        return {"skipped": "py-spy wrote no profile"}
    own_line: Counter[str] = Counter()
    own_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += k
        own_line[frames[-1]] += k
        fns = [_function(f) for f in frames]
        own_fn[fns[-1]] += k
        for f in set(fns):
            if "(threading.py)" not in f:  # every sample is under the thread bootstrap: no information
                incl_fn[f] += k

    def top(c: Counter[str]) -> list[list[Any]]:
        return [[f, round(v / total, 4)] for f, v in c.most_common(n)] if total else []

    return {"samples": total, "own_functions": top(own_fn), "inclusive_functions": top(incl_fn),
            "own_lines": top(own_line)}


def _function(frame: str) -> str:
    """'extract (gateway/inference/features.py:73)' -> 'extract (gateway/inference/features.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def plot(res: dict[str, Any], path: Path) -> None:
    c, s = res["ceiling"], res["sgw"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"sgw vs raw MQTT ceiling, same run ({res['meta']['profile']}, "
                 f"{res['meta']['payload_bytes']} B sealed windows, {res['meta']['started']})")

    ax = axes[0][0]
    bars = [("C client", _get(c, "drain_c", "rate"), "#444"), ("raw paho", _get(c, "drain", "rate"), "#888"),
            ("sgw", _get(s, "drain", "rate"), "#2a7"), ("raw x2", _get(c, "drain_x2", "rate"), "#888"),
            ("sgw x2", _get(s, "drain_x2", "rate"), "#2a7"),
            ("workers=2", _get(s, "drain_workers2", "rate"), "#2a7")]
    bars = [(k, v, col) for k, v, col in bars if v]
    ax.bar([k for k, _, _ in bars], [v for _, v, _ in bars], color=[col for _, _, col in bars])
    ax.set_yscale("log")  # the C client is an order of magnitude above the rest
    for i, (_, v, _) in enumerate(bars):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    ax.set_ylabel("messages (windows) / s")
    ax.set_title("QoS 1 TLS backlog drain")

    ax = axes[0][1]
    keys = [k for k in ("1000", "5000", "80pct") if k in s.get("latency", {}) or k in c.get("two_hop", {})]
    series = [("raw 1-hop", c.get("one_hop", {}), "#bbb"), ("raw 2-hop", c.get("two_hop", {}), "#777"),
              ("sgw e2e", s.get("latency", {}), "#2a7")]
    width = 0.27
    for j, (name, d, color) in enumerate(series):
        for i, k in enumerate(keys):
            lm = _get(d, k, "latency_ms")
            if not lm:
                continue
            x = i + (j - 1) * width
            ax.bar(x, lm["p99"], width, color=color, label=name if i == 0 or name not in
                   ax.get_legend_handles_labels()[1] else None)
            ax.plot([x, x], [lm["p50"], lm["p999"]], color="black", lw=1)
            ax.plot(x, lm["p50"], "k_", ms=8)
    ax.set_xticks(range(len(keys)))
    r80 = _get(s, "latency", "80pct", "offered_rate") or _get(c, "two_hop", "80pct", "offered_rate") or 0
    ax.set_xticklabels([f"{r80:,.0f}/s (80%)" if k == "80pct" else f"{int(k):,}/s" for k in keys])
    ax.set_yscale("log")
    ax.set_ylabel("ms (bar p99; line p50..p999)")
    ax.set_title("latency at fixed offered rates (80% = of sgw max)")
    for lim in P99_MS.values():
        ax.axhline(lim, color="red", lw=0.6, ls="--")
    ax.legend()

    ax = axes[1][0]
    for name, pts in res.get("rss", {}).items():
        if pts and name != "mosquitto":
            floor = 0.5 * max(p[1] for p in pts)  # leave out the first samples of each start-up
            kept = [p for p in pts if p[1] >= floor]
            ax.plot([p[0] for p in kept], [p[1] for p in kept], ".", ms=2, label=name)
    for ph in res.get("phases", []):
        if ph["name"].startswith(("overload", "sgw drain")):
            ax.axvspan(ph["t0"], ph["t1"], color="orange" if "overload" in ph["name"] else "#cde", alpha=0.3)
            ax.text(ph["t0"], ax.get_ylim()[1] if ax.lines else 0, ph["name"], fontsize=7, va="top")
    ax.set_xlabel("s since start")
    ax.set_ylabel("RSS MB")
    ax.set_title("gateway RSS over the run")
    if ax.lines:
        ax.legend(fontsize=7)

    ax = axes[1][1]
    cpu = [("raw drain", _get(c, "drain", "cpu_s_per_1000")),
           ("sgw drain", _get(s, "drain", "gateway_cpu_s_per_1000"))]
    for k in ("1000", "5000", "80pct"):
        v = _get(s, "latency", k, "gateway_cpu_s_per_1000")
        if v:
            cpu.append((f"sgw @{k}", v))
    cpu = [(k, v) for k, v in cpu if v]
    ax.bar([k for k, _ in cpu], [v for _, v in cpu], color=["#888"] + ["#2a7"] * (len(cpu) - 1))
    for i, (_, v) in enumerate(cpu):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    ax.set_ylabel("CPU-seconds per 1,000 windows")
    ax.set_title("CPU cost (subscriber / gateway process)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: dict[str, Any]) -> str:
    """The tables of docs/PERFORMANCE.md's end-to-end section, from one results.json."""
    c, s, meta = res["ceiling"], res["sgw"], res["meta"]

    def lat(d: dict[str, Any] | None) -> str:
        lm = d and d.get("latency_ms")
        return f"{lm['p50']:.2f} / {lm['p99']:.2f} / {lm['p999']:.2f}" if lm else "-"

    def num(v: float | None, fmt: str = ",.0f") -> str:
        return "-" if v is None else format(v, fmt)

    m = meta["machine"]
    out = [(f"Command: `{meta['command']}` (started {meta['started']}, {meta['duration_s']} s; "
            f"load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end; "
            f"{m['cpus']} CPUs; {meta['payload_bytes']}-byte sealed windows from {meta['devices']} "
            "devices)."),
           "",
           (f"Code: commit {meta.get('git', {}).get('commit', '?')}; uncommitted gateway files: "
           f"{', '.join(meta.get('git', {}).get('uncommitted_gateway_files', [])) or 'none'}."),
           "",
           ("| throughput (QoS 1 TLS backlog drain) | msg/s | CPU-s per 1,000 | ratio to the C client "
            "| ratio to bare paho |"),
           "|---|---|---|---|---|"]
    rd, sd, cd = c.get("drain", {}), s.get("drain", {}), c.get("drain_c", {})
    rc_rate, rp_rate = cd.get("rate"), rd.get("rate")

    def ratio(v: float | None, base: float | None) -> str:
        return num(v / base, ".3f") if v and base else "-"

    if cd:
        out.append(f"| `mosquitto_sub` (C, physical ceiling), {num(cd.get('n'))} messages, "
                   f"{num(cd.get('redelivered'))} redelivered | {num(rc_rate)} | "
                   f"{num(cd.get('cpu_s_per_1000'), '.3f')} | 1 | {ratio(rc_rate, rp_rate)} |")
    out.append(f"| bare paho subscriber (Python ceiling), {num(rd.get('n'))} messages | {num(rp_rate)} | "
               f"{num(rd.get('cpu_s_per_1000'), '.3f')} | {ratio(rp_rate, rc_rate)} | 1 |")
    if sd:
        out.append(f"| `sgw gateway`, {num(sd.get('n'))} windows -> ResultBatch results | "
                   f"{num(sd.get('rate'))} | {num(sd.get('gateway_cpu_s_per_1000'), '.3f')} | "
                   f"{ratio(sd.get('rate'), rc_rate)} | {ratio(sd.get('rate'), rp_rate)} |")
    rows = [(c.get("drain_x2"), "two raw paho subscribers, shared subscription", "cpu_s_per_1000"),
            (s.get("drain_x2"), "two `sgw gateway` processes, shared subscription", "gateway_cpu_s_per_1000"),
            (s.get("drain_workers2"), "one `sgw gateway`, `workers = 2`", "gateway_cpu_s_per_1000")]
    raw2_rate = (c.get("drain_x2") or {}).get("rate")
    if any(r for r, _, _ in rows):
        out += ["", ("| scale (QoS 1 TLS backlog drain) | msg/s | CPU-s per 1,000 | ratio to two raw "
                     "subscribers | ratio to one `sgw gateway` |"), "|---|---|---|---|---|"]
        for d, label, cpu_key in rows:
            if d:
                out.append(f"| {label} | {num(d.get('rate'))} | {num(d.get(cpu_key), '.3f')} | "
                           f"{ratio(d.get('rate'), raw2_rate)} | {ratio(d.get('rate'), sd.get('rate'))} |")
    out += ["", ("| latency, ms p50 / p99 / p999 | raw one hop | raw two hops | sgw end to end | "
                 "sgw CPU-s per 1,000 | publisher lag p99 ms |"), "|---|---|---|---|---|---|"]
    for key in ("1000", "5000", "80pct"):
        sl = s.get("latency", {}).get(key)
        rate = (sl or c.get("two_hop", {}).get(key) or {}).get("offered_rate")
        label = f"{num(rate)}/s" + (" (80% of sgw max)" if key == "80pct" else "")
        one, two = c.get("one_hop", {}).get(key), c.get("two_hop", {}).get(key)
        cpu = sl and sl.get("gateway_cpu_s_per_1000")
        out.append(f"| {label} | {lat(one)} | {lat(two)} | {lat(sl)} | {num(cpu, '.3f')} | "
                   f"{num(sl and _get(sl, 'load', 'send_lag_ms', 'p99'), '.2f')} |")
    ov = s.get("overload")
    if ov:
        rss = ov.get("gateway_rss_mb") or {}
        out += ["", "| overload | value |", "|---|---|",
                f"| capacity (sgw drain rate) | {num(ov['capacity'])} windows/s |",
                (f"| offered (achieved by the generator) | {num(ov['load']['achieved_rate'])}/s = "
                 f"{res['ratios'].get('overload_offered_over_capacity', 0):.2f}x capacity, "
                 f"{num(ov['load']['sent'])} windows |"),
                f"| results / lost | {num(ov['results'])} / {num(ov['lost'])} |",
                f"| gateway rejections | {ov.get('rejections') or 'none'} |",
                (f"| gateway RSS start / max / end | {num(rss.get('start'), '.1f')} / "
                 f"{num(rss.get('max'), '.1f')} / {num(rss.get('end'), '.1f')} MB "
                 f"(growth {num(rss.get('growth'), '.1%')}) |")]
    out += _postgres_table(res, lat, num)
    out += ["", "| target (issues 9, 19) | measured | met | miss by | detail |", "|---|---|---|---|---|"]
    for t in res.get("targets", []):
        if "miss_by" not in t:
            miss = "-"
        elif t["target"].startswith(("throughput", "scale", "workers")):
            miss = f"{t['miss_by']:.0%} short"
        else:
            miss = f"{t['measured'] / t['limit']:.1f}x the limit"
        out.append(f"| {t['target']} | {t['measured']:.3f} | {'yes' if t['met'] else 'no'} | {miss} | "
                   f"{t['detail']} |")
    prof = s.get("profile")
    if prof and prof.get("own_functions"):
        out += ["", f"py-spy, gateway draining {num(prof['n'])} windows ({prof['samples']} samples):", "",
                "| function (own time) | share | | function (inclusive) | share |", "|---|---|---|---|---|"]
        for (fo, vo), (fi, vi) in zip(prof["own_functions"], prof["inclusive_functions"], strict=False):
            out.append(f"| `{fo}` | {vo:.1%} | | `{fi}` | {vi:.1%} |")
    return "\n".join(out)


def _postgres_table(res: dict[str, Any], lat: Any, num: Any) -> list[str]:
    """SQLite and PostgreSQL side by side (issue 18): throughput, latency, and what the store costs."""
    s = res["sgw"]
    pg = s.get("postgres")
    if not pg:
        return []
    one = (s.get("drain") or {}).get("rate")
    rows: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = [
        ("SQLite, 1 instance", s.get("drain"), s.get("latency") or {}),
        ("SQLite, 2 instances (one host)", s.get("drain_x2"), {}),
        ("PostgreSQL, 1 instance", pg.get("drain_x1"), pg.get("latency_x1") or {}),
        ("PostgreSQL, 3 instances", pg.get("drain_x3"), pg.get("latency_x3") or {}),
    ]
    out = ["", (f"PostgreSQL {pg.get('server_version', '?')} on loopback with its durable defaults (fsync, "
                "synchronous_commit on), same broker, devices and run; the fleet moved by `sgw store copy`. "
                "Store CPU: the server's processes over the same span as the gateway's."), "",
           ("| store | drain windows/s | ratio to SQLite, 1 instance | e2e p50 / p99 / p999 ms at 1,000/s "
            "| at 5,000/s | gateway CPU-s per 1,000 | store CPU-s per 1,000 (drain) |"),
           "|---|---|---|---|---|---|---|"]
    for label, d, lats in rows:
        if not d:
            continue
        rate = d.get("rate")
        out.append(f"| {label} | {num(rate)} | {num(rate / one, '.3f') if rate and one else '-'} | "
                   f"{lat(lats.get('1000'))} | {lat(lats.get('5000'))} | "
                   f"{num(d.get('gateway_cpu_s_per_1000'), '.3f')} | "
                   f"{num(d.get('db_cpu_s_per_1000'), '.3f')} |")
    out += ["", ("| PostgreSQL cost at a steady offered rate | windows | store CPU-s per 1,000 windows "
                 "(= cores per 1,000 windows/s) | commits per 1,000 | rows written per 1,000 "
                 "| WAL KB per 1,000 |"),
            "|---|---|---|---|---|---|"]
    for k in (1, 3):
        for rate, run in sorted((pg.get(f"latency_x{k}") or {}).items(), key=lambda kv: int(kv[0])):
            db = run.get("db") or {}
            w = db.get("windows") or 0
            out.append(f"| {k} instance(s), {int(rate):,}/s | {num(w)} | "
                       f"{num(run.get('db_cpu_s_per_1000'), '.3f')} | "
                       f"{num(db.get('commits_per_1000'), ',.1f')} | "
                       f"{num(db.get('rows_written', 0) * 1000 / w if w else None, ',.0f')} | "
                       f"{num(db.get('wal_kb_per_1000'), ',.1f')} |")
    return out
