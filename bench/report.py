"""The results as tables: kv against etcd (ratios), the targets, and how each figure was taken."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:results:begin (written by bench/run.py; edits inside are overwritten) -->"
END = "<!-- bench:results:end -->"
CEILING = "grpcio"  # the system name of the Get answered by an empty grpc.aio handler


def fmt(value: float | None, spec: str = "{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def ratio(kv: float | None, etcd: float | None) -> float | None:
    return kv / etcd if kv is not None and etcd else None


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run


class Summary:
    """Reads the figures out of one run's results (the dict run.py writes as JSON)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.cfg: dict[str, Any] = data["config"]

    # -- lookups

    def load(self, system: str, op: str, label: str = "saturated") -> dict[str, Any] | None:
        for m in reversed(self.data["measurements"]):
            if (m["system"], m["operation"], m["label"]) == (system, op, label):
                load: dict[str, Any] = m["load"]
                return load
        return None

    def rps(self, system: str, op: str, label: str = "saturated") -> float | None:
        load = self.load(system, op, label)
        return None if load is None else float(load["requests_per_s"])

    def lat(self, system: str, op: str, label: str = "saturated") -> tuple[float | None, float | None]:
        load = self.load(system, op, label)
        return (None, None) if load is None else (load["p50_ms"], load["p99_ms"])

    def paced(self, system: str, op: str) -> dict[str, Any] | None:
        return next(
            (p for p in self.data.get("paced", []) if (p["system"], p["operation"]) == (system, op)), None
        )

    def rest(self, system: str) -> dict[str, Any] | None:
        return next((r for r in self.data.get("rest", []) if r["system"] == system), None)

    def watch(self, system: str, writes: float) -> dict[str, Any] | None:
        return next(
            (w for w in self.data.get("watch", []) if w["system"] == system and w["rate"] == writes), None
        )

    def bulk(self, system: str) -> float | None:
        entry = self.data.get("bulk", {}).get(system)
        return None if entry is None else float(entry["keys_per_s"])

    def random(self, system: str, op: str, big: bool) -> dict[str, Any] | None:
        keys = self.cfg["big_keys"] if big else self.cfg["keys"]
        return next(
            (
                r
                for r in self.data.get("random", [])
                if (r["system"], r["operation"], r["keys_in_store"]) == (system, op, keys)
            ),
            None,
        )

    # -- the comparison

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(measurement, etcd, kv, kv/etcd) rows."""
        small, big = f"{self.cfg['keys']:,}", f"{self.cfg['big_keys']:,}"
        shape = f"h2load -c{self.cfg['concurrency']} -m{self.cfg['streams']}"
        out: list[tuple[str, str, str, str]] = []

        def unary(title: str, op: str, label: str = "saturated", per: int = 1) -> None:
            etcd, kv = self.rps("etcd", op, label), self.rps("kv", op, label)
            if etcd is None and kv is None:
                return
            unit = " keys/s" if per > 1 else " req/s"
            scaled = [None if v is None else v * per for v in (etcd, kv)]
            out.append((f"{title}{unit}", rate(scaled[0]), rate(scaled[1]), times(ratio(kv, etcd))))
            out.append(
                (
                    f"{title} p50 / p99 ms",
                    pair(*self.lat("etcd", op, label)),
                    pair(*self.lat("kv", op, label)),
                    "",
                )
            )

        unary(f"Get one key ({small} keys, {shape})", "get")
        ceiling = self.rps(CEILING, "get")
        if ceiling is not None:
            etcd_get, kv_get = self.rps("etcd", "get"), self.rps("kv", "get")
            title = "Get answered by an empty grpc.aio handler (the most a Python gRPC server serves) req/s"
            out.append((title, rate(etcd_get), rate(ceiling), times(ratio(ceiling, etcd_get))))
            out.append(("kv Get / empty grpc.aio handler", "", times(ratio(kv_get, ceiling)), ""))
            two = self.rps(CEILING, "get", "saturated-2-processes")
            if two is not None:
                title = "Get answered by 2 empty-handler processes sharing the port (SO_REUSEPORT) req/s"
                out.append((title, rate(etcd_get), rate(two), times(ratio(two, etcd_get))))
        unary(f"Put durable ({shape})", "put")
        unary(f"List page of 100 ({shape})", "list", per=100)
        etcd_rest, kv_rest = self.rest("etcd"), self.rest("kv")
        if etcd_rest or kv_rest:
            conns = self.cfg["rest_connections"]
            title = f"REST GET one key (wrk -c{conns}; kv via Envoy, etcd's gateway) req/s"
            e_rest, k_rest = per_s(etcd_rest, "requests_per_s"), per_s(kv_rest, "requests_per_s")
            out.append((title, rate(e_rest), rate(k_rest), times(ratio(k_rest, e_rest))))
            out.append(("REST GET p50 / p99 ms", lat_pair(etcd_rest), lat_pair(kv_rest), ""))
        for op, title in (("get", "Get"), ("put", "Put")):
            e_at, k_at = self.load("etcd", op, "rate-1000"), self.load("kv", op, "rate-1000")
            if e_at or k_at:
                title_h = f"{title} p99 ms at 1,000 req/s, h2load --rps (rate achieved)"
                out.append((title_h, at_rate(e_at), at_rate(k_at), ""))
            e_p, k_p = self.paced("etcd", op), self.paced("kv", op)
            if e_p or k_p:
                title_p = f"{title} p50 / p99 ms at 1,000 req/s evenly paced (Python client)"
                out.append((title_p, lat_pair(e_p), lat_pair(k_p), ""))
        singles = self.data.get("bulk_single", {})
        e_one, k_one = per_s(singles.get("etcd"), "keys_per_s"), per_s(singles.get("kv"), "keys_per_s")
        if e_one or k_one:
            some = next(iter(singles.values()))
            flight = some["calls_in_flight"]
            title = f"Bulk load, {some['keys']:,} keys by single Puts ({flight} in flight) keys/s"
            out.append((title, rate(e_one), rate(k_one), times(ratio(k_one, e_one))))
        e_bulk, k_bulk = self.bulk("etcd"), self.bulk("kv")
        if e_bulk or k_bulk:
            sizes = {name: b.get("puts_per_call", 1) for name, b in self.data.get("bulk", {}).items()}
            how = f"etcd Txn of {sizes.get('etcd', '-')}, kv BatchPut of {sizes.get('kv', '-')}"
            out.append(
                (
                    f"Bulk load to {big} keys in batches ({how}) keys/s",
                    rate(e_bulk),
                    rate(k_bulk),
                    times(ratio(k_bulk, e_bulk)),
                )
            )
        for op, title in (("get", "Get"), ("put", "Put")):
            e0, k0 = self.rps("etcd", op), self.rps("kv", op)
            e1, k1 = self.rps("etcd", op, "saturated-big"), self.rps("kv", op, "saturated-big")
            if e1 or k1:
                cells = (f"{rate(e1)} ({times(ratio(e1, e0))})", f"{rate(k1)} ({times(ratio(k1, k0))})")
                out.append(
                    (f"{title} one key at {big} keys req/s (vs {small})", *cells, times(ratio(k1, e1)))
                )
            flight = self.cfg["random_concurrency"]
            for is_big, size in ((False, small), (True, big)):
                e_r = per_s(self.random("etcd", op, is_big), "per_s")
                k_r = per_s(self.random("kv", op, is_big), "per_s")
                if e_r or k_r:
                    title_r = f"{title} random keys of {size} (Python client, {flight} in flight) /s"
                    out.append((title_r, rate(e_r), rate(k_r), times(ratio(k_r, e_r))))
        for writes in self.cfg["watch_rates"]:
            e_w, k_w = self.watch("etcd", writes), self.watch("kv", writes)
            if e_w or k_w:
                title = f"Watch {self.cfg['watch_streams']:,} streams, {writes:,.0f} writes/s: p50 / p99 ms"
                out.append((title, watch_cell(e_w), watch_cell(k_w), ""))
        return out

    def targets(self) -> list[Target]:
        out: list[Target] = []
        big = f"{self.cfg['big_keys']:,}"

        def versus(name: str, kv: float | None, etcd: float | None, floor: float) -> None:
            r = ratio(kv, etcd)
            out.append(Target(name, f">= {floor}x etcd", times(r), None if r is None else r >= floor))

        versus("unary Get", self.rps("kv", "get"), self.rps("etcd", "get"), 0.5)
        ceiling = ratio(self.rps(CEILING, "get"), self.rps("etcd", "get"))
        if ceiling is not None:
            two = ratio(self.rps(CEILING, "get", "saturated-2-processes"), self.rps("etcd", "get"))
            out[-1].measured += f" (an empty grpc.aio handler: {times(ceiling)}, two of them: {times(two)})"
        versus("durable Put", self.rps("kv", "put"), self.rps("etcd", "put"), 0.5)
        versus("bulk load keys/s", self.bulk("kv"), self.bulk("etcd"), 1.0)
        for op, title, limit in (("get", "Get", 2.0), ("put", "durable Put", 5.0)):
            name, goal = f"{title} p99 at 1,000 req/s", f"< {limit:g} ms"
            load, even = self.load("kv", op, "rate-1000"), self.paced("kv", op)
            if load is None and even is None:
                out.append(Target(name, goal, "-", None))
                continue
            texts: list[str] = []
            met = False
            if even is not None:  # judged on evenly paced calls: h2load's bursts add their own queueing
                texts.append(f"evenly paced {fmt(even['p99_ms'])} ms at {even['per_s']:,.0f}/s")
                met = even["per_s"] >= 950 and even["p99_ms"] is not None and even["p99_ms"] < limit
            if load is not None:
                achieved, p99 = float(load["requests_per_s"]), load["p99_ms"]
                texts.append(f"h2load --rps {fmt(p99)} ms at {achieved:,.0f} req/s")
                if even is None:
                    met = achieved >= 950 and p99 is not None and p99 < limit
            out.append(Target(name, goal, "; ".join(texts), met))
        for op, title in (("get", "Get"), ("put", "Put")):
            name = f"{title} throughput at {big} keys vs {self.cfg['keys']:,}"
            hot = ratio(self.rps("kv", op, "saturated-big"), self.rps("kv", op))
            spread = ratio(
                per_s(self.random("kv", op, True), "per_s"), per_s(self.random("kv", op, False), "per_s")
            )
            if hot is None and spread is None:
                out.append(Target(name, ">= 0.8x", "-", None))
                continue
            met = all(r >= 0.8 for r in (hot, spread) if r is not None)
            out.append(Target(name, ">= 0.8x", f"one key {times(hot)}, random keys {times(spread)}", met))
        r = ratio(per_s(self.rest("kv"), "requests_per_s"), self.rps("kv", "get"))
        name = "REST GET via Envoy vs direct gRPC Get"
        out.append(Target(name, ">= 0.9x", times(r), None if r is None else r >= 0.9))
        for writes, limit in ((100.0, 50.0), (1000.0, 250.0)):
            w = self.watch("kv", writes)
            name = f"watch fan-out {self.cfg['watch_streams']:,} streams, {writes:,.0f} writes/s"
            if w is None:
                out.append(Target(name, f"p99 < {limit:g} ms", "-", None))
                continue
            p99 = w["p99_ms"]
            ok = p99 is not None and p99 < limit and not w["undelivered"] and not w.get("write_failures")
            out.append(Target(name, f"p99 < {limit:g} ms", watch_cell(w), ok))
        return out

    # -- output

    def text(self) -> str:
        rows = [("measurement", "etcd", "kv", "kv/etcd"), *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.append("")
        for t in self.targets():
            verdict = "MET " if t.met else "MISS" if t.met is False else "--  "
            lines.append(f"{verdict} {t.name}: {t.measured} (target {t.goal})")
        env = self.data["environment"]
        start, end = fmt_load(env["loadavg_at_start"]), fmt_load(env["loadavg_at_end"])
        lines.append(f"load average at start {start}, at end {end}")
        return "\n".join(lines)

    def markdown(self, plot_name: str | None) -> str:
        env, cfg = self.data["environment"], self.cfg
        out = [
            f"Run of {self.data['started'][:19].replace('T', ' ')} UTC, {self.data['elapsed_s']:.0f} s: "
            f"`{shlex.join(['bench/run.py', *cfg['argv']])}` on {env['cpus']} cores ({env['platform']}), "
            f"Python {env['python']}, grpcio {env['grpcio']}, {env['etcd'] or 'no etcd'}, {env['h2load']}, "
            f"{env['wrk'] or 'wrk'}. kv store `{cfg['store']}` (durable, `--sync full`), values of "
            f"{cfg['value_size']} bytes. Load average (1, 5, 15 min) at start "
            f"{fmt_load(env['loadavg_at_start'])}, at end {fmt_load(env['loadavg_at_end'])}.",
            "",
            "| measurement | etcd 3.4 | kv | kv / etcd |",
            "|---|---:|---:|---:|",
            *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows()),
            "",
            "| target | measured | goal | met |",
            "|---|---|---|---|",
        ]
        for t in self.targets():
            verdict = "yes" if t.met else "**no**" if t.met is False else "-"
            out.append(f"| {t.name} | {t.measured} | {t.goal} | {verdict} |")
        out.append("")
        if plot_name:
            out += [f"![latency against throughput]({plot_name})", ""]
        out += ["Each figure, how it was taken, and the 1-minute load average when it started:", ""]
        out += ["| system | what | result | load | command |", "|---|---|---|---|---|"]

        def row(system: str, what: str, result: str, load: float, command: str) -> None:
            out.append(f"| {system} | {what} | {result} | {load:.2f} | `{command}` |")

        for m in self.data["measurements"]:
            load = m["load"]
            result = (
                f"{load['requests_per_s']:,.0f} req/s, {lat_text(load)}, server {m['server_cpu_cores']} cores"
            )
            what = f"{m['operation']} {m['label']} ({m['keys_in_store']:,} keys)"
            row(m["system"], what, result, m["loadavg_1m"], m["command"])
        for r in self.data.get("rest", []):
            result = f"{r['requests_per_s']:,.0f} req/s, {lat_text(r)}, cores {r['cpu_cores']}"
            row(r["system"], f"REST {r['what']}", result, r["loadavg_1m"], r["command"])
        for kind in ("bulk_single", "bulk"):
            for system, b in self.data.get(kind, {}).items():
                result = f"{b['keys']:,} keys in {b['seconds']:.1f} s, {b['keys_per_s']:,.0f} keys/s, "
                result += f"server {b['server_cpu_cores']:.2f} cores, client {b['client_cpu_cores']:.2f}"
                how = f"{b['processes']} processes x {b['calls_in_flight']} calls x {b['puts_per_call']} puts"
                row(system, f"bulk load, {how}", result, b["loadavg_1m"], b["command"])
        for r in self.data.get("paced", []):
            result = f"{r['per_s']:,.0f}/s, {lat_text(r)} from when each call was due"
            result += f", client {r['client_cpu_cores']:.2f}"
            what = f"{r['operation']} evenly paced at {r['rate']:,.0f}/s"
            row(r["system"], what, result, r["loadavg_1m"], r["command"])
        for r in self.data.get("random", []):
            result = f"{r['per_s']:,.0f}/s, {lat_text(r)}, server {r['server_cpu_cores']} cores, "
            result += f"client {r['client_cpu_cores']:.2f}"
            what = f"random-key {r['operation']} ({r['keys_in_store']:,} keys)"
            row(r["system"], what, result, r["loadavg_1m"], r["command"])
        for w in self.data.get("watch", []):
            result = f"p50 {fmt(w['p50_ms'])} / p99 {fmt(w['p99_ms'])} / max {fmt(w['max_ms'])} ms, "
            result += f"{w['deliveries']:,} of {w['deliveries_expected']:,} delivered, "
            result += (
                f"{w['events_per_message']} events/message, write ack p99 {fmt(w['write_ack_p99_ms'])} ms, "
            )
            result += f"cores {w['cpu_cores']}"
            what = f"watch {w['streams']:,} streams, {w['rate']:,.0f} writes/s ({w['write_rate']:,.0f} sent)"
            row(w["system"], what, result, w["loadavg_1m"], "python -m bench.watch_fanout")
        out += self.profiles()
        return "\n".join(out) + "\n"

    def profiles(self) -> list[str]:
        found = [(f"{m['operation']} {m['label']}", m.get("profile")) for m in self.data["measurements"]]
        found += [(f"watch {w['rate']:g} writes/s", w.get("profile")) for w in self.data.get("watch", [])]
        found += [("bulk load", b.get("profile")) for b in self.data.get("bulk", {}).values()]
        chosen = [(label, prof) for label, prof in found if prof]
        if not chosen:
            return []
        out = [
            "",
            "py-spy profiles of kv-server (share of samples by where the innermost Python frame is):",
            "",
        ]
        for label, prof in chosen:
            groups = ", ".join(f"{k} {v:.0%}" for k, v in prof.get("by_group", {}).items())
            top = "; ".join(f"{k} {v:.0%}" for k, v in prof.get("top_self", [])[:6])
            out.append(f"- **{label}** (py-spy, {prof['samples']} samples): {groups}. Top self: {top}.")
            native = prof.get("native")
            if native:
                shares = ", ".join(f"{k} {v:.0%}" for k, v in native.items())
                out.append(f"  perf, by thread / shared object: {shares}.")
        return out


def per_s(entry: dict[str, Any] | None, key: str) -> float | None:
    return None if entry is None else float(entry[key])


def pair(p50: float | None, p99: float | None) -> str:
    return f"{fmt(p50)} / {fmt(p99)}"


def lat_pair(entry: dict[str, Any] | None) -> str:
    return "-" if entry is None else pair(entry["p50_ms"], entry["p99_ms"])


def lat_text(entry: dict[str, Any]) -> str:
    return f"p50 {fmt(entry['p50_ms'])} / p99 {fmt(entry['p99_ms'])} ms"


def at_rate(load: dict[str, Any] | None) -> str:
    return "-" if load is None else f"{fmt(load['p99_ms'])} ({load['requests_per_s']:,.0f}/s)"


def watch_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    late = f">{entry['drain_s']:g} s"
    p50 = fmt(entry["p50_ms"], "{:.1f}") if entry["p50_ms"] is not None else late
    p99 = fmt(entry["p99_ms"], "{:.1f}") if entry["p99_ms"] is not None else late
    text = f"{p50} / {p99}"
    if entry.get("write_failures"):
        text += f" ({entry['write_failures']:,} writes failed)"
    if entry["undelivered"]:
        late = f"{entry['undelivered']:,} of {entry['deliveries_expected']:,}"
        text += f" ({late} not delivered in {entry['drain_s']:g} s)"
    return text


def fmt_load(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def update_docs(path: Path, markdown: str) -> None:
    """Replace the text between the result markers of docs/benchmarks.md (append them if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{markdown}{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n## Latest results\n\n" + block + "\n"
    path.write_text(text)
