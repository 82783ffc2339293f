"""The benchmark page's serving tables, generated from the committed result files (never typed by hand).

    python -m bench.report [--runs serving-run1,serving-run2] [--check | --write]

Prints the Markdown that sits between ``<!-- bench:serving:begin -->`` and ``<!-- bench:serving:end -->`` in
``docs/benchmarks.md``; ``--check`` exits 1 when the page's copy differs (a test runs it), ``--write`` replaces it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench.common import RESULTS, ROOT

BEGIN, END = "<!-- bench:serving:begin -->", "<!-- bench:serving:end -->"
DEFAULT_RUNS = "serving-run1,serving-run2"
PROFILE = "where-time-goes"
PAGE = "docs/benchmarks.md"


def load(names: list[str]) -> list[dict[str, Any]]:
    return [json.loads((RESULTS / f"{name}.json").read_text()) for name in names]


def _rows(run: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in run["results"] if all(r.get(k) == v for k, v in match.items())]


def _one(run: dict[str, Any], **match: Any) -> dict[str, Any] | None:
    found = _rows(run, **match)
    return found[0] if found else None


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _cells(runs: list[dict[str, Any]], field: str, digits: int = 0, **match: Any) -> str:
    values = [(_one(run, **match) or {}).get(field) for run in runs]
    return " / ".join(_num(v, digits) for v in values)


def closed_loop(runs: list[dict[str, Any]]) -> list[str]:
    workers = sorted({r["workers"] for run in runs for r in _rows(run, system="project", mode="closed")})
    connections = sorted({r["connections"] for run in runs for r in _rows(run, system="batching", mode="closed")})
    head = ["`/predict`, closed loop, 2xx/s"]
    for w in workers:
        head += [f"project x{w}", f"batching peer x{w}", "**ratio**"]
    others = [(name, w) for name in ("tuned", "textbook") for w in workers
              if any(_rows(run, system=name, workers=w, mode="closed") for run in runs)]
    head += [f"{name} x{w}" for name, w in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in connections:
        cells = [f"{c} connection{'s' if c > 1 else ''}"]
        for w in workers:
            group = {"workers": w, "mode": "closed", "protocol": "http", "connections": c}
            cells += [_cells(runs, "rps", system="project", group=_group(runs[0], w), **group),
                      _cells(runs, "rps", system="batching", **group),
                      "**" + _cells(runs, "ratio_vs_peer", 2, system="project", group=_group(runs[0], w), **group)
                      + "**"]
        cells += [_cells(runs, "rps", system=name, workers=w, mode="closed", protocol="http", connections=c)
                  for name, w in others]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _group(run: dict[str, Any], workers: int) -> int | None:
    """The group where the project was measured beside the peers (not the one beside its own variants)."""
    groups = {r.get("group") for r in _rows(run, system="batching", workers=workers, mode="closed")}
    return next(iter(groups)) if len(groups) == 1 else None


def latency_and_cpu(runs: list[dict[str, Any]]) -> list[str]:
    top = max(r["workers"] for run in runs for r in _rows(run, system="project", mode="closed"))
    connections = sorted({r["connections"] for run in runs for r in _rows(run, system="batching", mode="closed")})
    head = [f"x{top} workers", "project P50 / P99, ms", "peer P50 / P99, ms",
            "project CPU per 2xx, ms", "peer CPU per 2xx, ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in connections:
        match = {"workers": top, "mode": "closed", "protocol": "http", "connections": c}
        project = {**match, "system": "project", "group": _group(runs[0], top)}
        lines.append("| " + " | ".join([
            f"{c} connection{'s' if c > 1 else ''}",
            _cells(runs, "p50_ms", 1, **project) + " ; " + _cells(runs, "p99_ms", 1, **project),
            _cells(runs, "p50_ms", 1, system="batching", **match) + " ; "
            + _cells(runs, "p99_ms", 1, system="batching", **match),
            _cells(runs, "cpu_ms_per_request", 3, **project),
            _cells(runs, "cpu_ms_per_request", 3, system="batching", **match),
        ]) + " |")
    return lines


def other_measures(runs: list[dict[str, Any]]) -> list[str]:
    top = max(r["workers"] for run in runs for r in _rows(run, system="project", mode="closed"))
    lines = [f"| other measures, x{top} (run 1 / run 2) | |", "|---|---|"]
    sustained = []
    for system in ("project", "batching"):
        rates = " / ".join(_num((_one(run, system=system, mode="open-sustained") or {}).get("sustained_rate"))
                           for run in runs)
        sustained.append(f"{system} {rates}/s")
    lines.append("| open loop, highest rate with P99 < 50 ms and no error | " + ", ".join(sustained) + " |")
    variants_group = {r.get("group") for run in runs for r in _rows(run, system="project, log off")}
    beside = {"system": "project", "mode": "closed", "protocol": "http", "connections": 32,
              "group": next(iter(variants_group)) if len(variants_group) == 1 else None}
    lines.append(f"| the project (`async` log), beside its variants, 32 connections | "
                 f"{_cells(runs, 'rps', **beside)} 2xx/s, P50 {_cells(runs, 'p50_ms', 1, **beside)} ms, "
                 f"P99 {_cells(runs, 'p99_ms', 1, **beside)} ms |")
    for name, label in (("project, batching off", "adaptive batching off"), ("project, log off", "prediction log off"),
                        ("project, BentoML path", "prediction routes through BentoML's ASGI stack "
                                                  "(`MLOPS_HTTP_FAST_PATH=false`)"),
                        ):
        if not any(_rows(run, system=name) for run in runs):
            continue
        rps = _cells(runs, "rps", system=name, mode="closed")
        ratio = _cells(runs, "project_vs_this", 2, system=name, mode="closed")
        latency = (f"P50 {_cells(runs, 'p50_ms', 1, system=name, mode='closed')} ms, "
                   f"P99 {_cells(runs, 'p99_ms', 1, system=name, mode='closed')} ms")
        lines.append(f"| {label}, 32 connections | {rps} 2xx/s, {latency}; the default over it: ×{ratio} |")
    grpc = "; ".join(f"{c} connection{'s' if c > 1 else ''}: " + _cells(runs, "rps", system="project", mode="closed",
                                                                          protocol="grpc", connections=c)
                     for c in (1, 32))
    lines.append(f"| gRPC (`ghz`), 2xx/s | {grpc} |")
    if any(_rows(run, mode="outcomes") for run in runs):
        rows = [_one(run, mode="outcomes") or {} for run in runs]
        lines.append(f"| POST /outcomes, 1 worker (`ack`), 8 connections, {rows[0].get('rows_per_request')} rows a "
                     f"request | {' / '.join(_num(r.get('rows_per_s')) for r in rows)} rows/s, P99 "
                     f"{' / '.join(_num(r.get('p99_ms'), 1) for r in rows)} ms; every accepted row on the topic: "
                     f"{' / '.join(str(r.get('lost')) for r in rows)} lost |")
    lost = []
    for run in runs:
        kafka = _rows(run, mode="kafka")
        lost.append(f"{sum(r['answered_2xx'] for r in kafka):,} answered, {sum(r['lost'] for r in kafka)} lost")
    lines.append("| every 200 an event on Kafka (all systems that log) | " + " / ".join(lost) + " |")
    return lines


def durability(runs: list[dict[str, Any]]) -> list[str]:
    """What the default ``ack`` mode costs: the project answering only after the broker's acknowledgement,
    beside itself answering once the Kafka client holds the events (what the peers do)."""
    rows = [r for run in runs for r in _rows(run, system="project, ack", mode="closed")]
    if not rows:
        return []
    group = rows[0]["group"]
    top = rows[0]["workers"]
    connections = sorted({r["connections"] for r in rows})
    head = [f"log durability, x{top}, 2xx/s (P50 ; P99 ms)", "`async` (the peers' work)", "`ack` (the default)",
            "**ack / async**"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in connections:
        match = {"mode": "closed", "protocol": "http", "connections": c, "group": group}
        cells = [f"{c} connection{'s' if c > 1 else ''}"]
        for system in ("project", "project, ack"):
            cells.append(_cells(runs, "rps", system=system, **match) + " (" + _cells(runs, "p50_ms", 1, system=system,
                         **match) + " ; " + _cells(runs, "p99_ms", 1, system=system, **match) + ")")
        ratios = []
        for run in runs:
            a, b = _one(run, system="project", **match), _one(run, system="project, ack", **match)
            ratios.append(_num(b["rps"] / a["rps"], 2) if a and b and a["rps"] else "–")
        cells.append("**" + " / ".join(ratios) + "**")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def where_time_goes() -> list[str]:
    path = RESULTS / f"{PROFILE}.json"
    if not path.exists():
        return []
    run = json.loads(path.read_text())
    rows = run["results"]
    names = sorted({k for r in rows for k in r["gil_us_per_request"]},
                   key=lambda k: -max(r["gil_us_per_request"].get(k, 0) for r in rows))
    head = ["µs of a worker's GIL per 2xx (py-spy `--gil`)"] + [
        f"{'project' if r['system'] == 'project' else 'peer'} c={r['connections']}" for r in rows]
    lines = [f"Where the time goes (`python -m bench.where_time_goes`, `bench/results/{PROFILE}.json`, commit "
             f"`{run['git']['sha'][:10]}`):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        lines.append("| " + " | ".join([name, *(_num(r["gil_us_per_request"].get(name), 1) for r in rows)]) + " |")
    lines.append("| **total under the GIL** | " + " | ".join(f"**{_num(r['gil_us_total'], 1)}**" for r in rows) + " |")
    lines.append("| CPU per 2xx from /proc, µs (all threads) | "
                 + " | ".join(_num((r["cpu_ms_per_request"] or 0) * 1000, 1) for r in rows) + " |")
    lines.append("| 2xx/s while sampled | " + " | ".join(_num(r["rps"]) for r in rows) + " |")
    return lines


GRPC_SERVERS = {"thread pool (kept)": "grpc-server-sync", "grpc.aio (tried, reverted)": "grpc-server-aio"}


def grpc_servers() -> list[str]:
    """gRPC's two servers, each measured twice from its own commit, alternating (bench/results/grpc-server-*)."""
    runs = {label: [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{stem}-*.json"))]
            for label, stem in GRPC_SERVERS.items()}
    if not all(runs.values()):
        return []
    lines = ["gRPC server, 2 workers, `ghz`, 2xx/s, run 1 / run 2 (each from its own commit, the two alternated: "
             "`git worktree add` the commit, `python -m bench.serving --workers 2 --connections 32 --peers batching "
             "--quick`):", "", "| server | commit | 1 connection | 32 connections |", "|---|---|---|---|"]
    for label, found in runs.items():
        cells = [" / ".join(_num((_one(run, protocol="grpc", connections=c) or {}).get("rps")) for run in found)
                 for c in (1, 32)]
        lines.append(f"| {label} | `{found[0]['git']['sha'][:10]}` | {cells[0]} | {cells[1]} |")
    return lines


GPU_BATCHES = (1, 32, 256, 1024, 8192, 65536)


def routing() -> list[str]:
    """What a rollout adds to scoring a batch (`python -m bench.routing`, bench/results/routing-run*.json)."""
    found = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("routing-run*.json"))]
    if not found:
        return []
    batches = found[0]["settings"]["batches"]
    shas = ", ".join(f"`{run['git']['sha'][:10]}`" for run in found)
    lines = [f"Rollout routing, in process (the scorer alone: no HTTP, no store), P50 µs per batch and × Production "
             f"alone, run 1 / run 2 (`python -m bench.routing`, commits {shas}):", "",
             "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for variant in dict.fromkeys(r["variant"] for r in found[0]["results"]):
        cells = []
        for batch in batches:
            got = [next(r for r in run["results"] if r["variant"] == variant and r["batch"] == batch)
                   for run in found]
            cells.append(" / ".join(_num(r["p50_us"]) for r in got) + " (×"
                         + " / ".join(_num(r["ratio"], 2) for r in got) + ")")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def batch() -> list[str]:
    """Batch scoring at size (`python -m bench.batch`, bench/results/batch-run*.json)."""
    found = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("batch-run*.json"))]
    if not found:
        return []
    sizes = found[0]["settings"]["sizes"]
    systems = list(dict.fromkeys(r["system"] for r in found[0]["results"] if "rows" in r))
    shas = ", ".join(f"`{run['git']['sha'][:10]}`" for run in found)
    steps = "; ".join(
        f"{system.removeprefix('model step alone (').split(',')[0]} "
        + " / ".join(_num(next(r["rows_per_s_per_core"] for r in run["results"] if r["system"] == system))
                     for run in found)
        for system in dict.fromkeys(r["system"] for r in found[0]["results"] if "rows_per_s_per_core" in r))
    lines = [f"Batch scoring, end to end (process start to exit), rows/s and peak resident memory of the process "
             f"tree, run 1 / run 2 (`python -m bench.batch`, commits {shas}, {found[0]['settings']['cpus']} "
             f"CPUs); the model step alone, rows/s on one core: {steps}.", "",
             "| system | " + " | ".join(f"{n:,} rows" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for system in systems:
        cells = []
        for size in sizes:
            got = [_one(run, system=system, rows=size) or {} for run in found]
            cells.append(" / ".join(_num(r.get("rows_per_s")) for r in got) + " rows/s ("
                         + " / ".join(_num(r.get("peak_rss_mb")) for r in got) + " MB)")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return lines


def pipeline() -> list[str]:
    """The training pipeline in this process and on Ray (`python -m bench.pipeline`, pipeline-run*.json)."""
    found = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("pipeline-run*.json"))]
    if not found:
        return []
    shas = ", ".join(f"`{run['git']['sha'][:10]}`" for run in found)
    lines = [f"The training pipeline in this process and on Ray in this process, seconds end to end (process "
             f"start to exit) and peak resident memory of the process tree, run 1 / run 2 (`python -m "
             f"bench.pipeline`, commits {shas}, {found[0]['settings']['cpus']} CPUs); × this process: > 1 where "
             "faster.", ""]
    for part, title, engines in (("whole", "`pipeline run` (pipeline.yaml)", ("local", "ray")),
                                 ("join", "the point-in-time join alone", ("local", "ray", "feast-file",
                                                                           "feast-ray"))):
        sizes = sorted({r["transactions"] for r in _rows(found[0], part=part)})
        lines += [f"| {title} | " + " | ".join(f"{n:,} transactions" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for engine in engines:
            cells = []
            for size in sizes:
                got = [_one(run, part=part, engine=engine, transactions=size) for run in found]
                if not any(got):
                    cells.append("–")
                    continue
                cell = (" / ".join(_num(r and r["seconds"], 1) for r in got) + " s ("
                        + " / ".join(_num(r and r["peak_rss_mb"]) for r in got) + " MB)")
                if engine != "local":
                    cell += " ×" + " / ".join(_num(r and r.get("vs_local"), 2) for r in got)
                cells.append(cell)
            lines.append(f"| {ENGINE_NAMES[engine]} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines[:-1]


ENGINE_NAMES = {"local": "this process", "ray": "Ray (in this process)", "feast-file": "Feast's file offline store",
                "feast-ray": "Feast's Ray offline store"}
ROLLOUT_SYSTEMS = ("project", "project, shadow", "project, split 5 %")


def rollout_serving() -> list[str]:
    """A rollout under load (`python -m bench.serving --groups rollout`, bench/results/serving-rollout-run*.json):
    the same service and model with no rollout, a shadow, a 5 % split, measured side by side."""
    found = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("serving-rollout-run*.json"))]
    if not found:
        return []
    top = found[0]["results"][0]["workers"]
    shas = ", ".join(f"`{run['git']['sha'][:10]}`" for run in found)
    connections = sorted({r["connections"] for r in _rows(found[0], system="project, shadow", mode="closed")})
    head = [f"rollout under `wrk`, x{top}, 2xx/s (P50 ; P99 ms)", *ROLLOUT_SYSTEMS[:1],
            *(f"{s} (× none)" for s in ROLLOUT_SYSTEMS[1:])]
    lines = [f"A rollout under load, end to end, run 1 / run 2 (`python -m bench.serving --groups rollout`, commits "
             f"{shas}): \"project\" with no rollout beside the same model under a rollout held at a shadow step "
             "and at a 5 % split.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in connections:
        match = {"mode": "closed", "protocol": "http", "connections": c}
        cells = [f"{c} connection{'s' if c > 1 else ''}"]
        for system in ROLLOUT_SYSTEMS:
            cell = (_cells(found, "rps", system=system, **match) + " (" + _cells(found, "p50_ms", 1, system=system,
                    **match) + " ; " + _cells(found, "p99_ms", 1, system=system, **match) + ")")
            if system != "project":
                ratios = []
                for run in found:
                    a, b = _one(run, system="project", **match), _one(run, system=system, **match)
                    ratios.append(_num(b["rps"] / a["rps"], 2) if a and b and a["rps"] else "–")
                cell += " **×" + " / ".join(ratios) + "**"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lost = [f"{sum(r['answered_2xx'] for r in _rows(run, mode='kafka')):,} answered, "
            f"{sum(r['lost'] for r in _rows(run, mode='kafka'))} lost" for run in found]
    lines += ["", "Every 200 of the rollout runs an event on Kafka: " + " / ".join(lost) + "."]
    return lines


def gpu() -> list[str]:
    """The CUDA provider path on a lent GPU (`python -m bench.gpu`, bench/results/gpu-run*.json)."""
    found = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("gpu-run*.json"))]
    if not found:
        return []
    env = found[0]["environment"]
    lines = [f"GPU: the model alone, one call per batch, numpy in and out, P50 ms, run 1 / run 2 "
             f"(`python -m bench.gpu`, {env['gpu'].split(',')[0]}, {env['cpu_count']} CPUs, "
             f"onnxruntime-gpu {env['onnxruntime']}):", "",
             "| variant | nodes by provider | " + " | ".join(f"batch {b:,}" for b in GPU_BATCHES) + " |",
             "|---|---|" + "---|" * len(GPU_BATCHES)]
    for variant in [v["variant"] for v in found[0]["variants"]]:
        runs = [next(v for v in run["variants"] if v["variant"] == variant) for run in found]
        placed = runs[0].get("nodes_by_provider")
        cells = []
        for batch in GPU_BATCHES:
            cells.append(" / ".join(_num(next(b["p50_ms"] for b in r["batches"] if b["batch"] == batch), 3)
                                    for r in runs))
        where = ", ".join(f"{k.removesuffix('ExecutionProvider')} {n}" for k, n in placed.items()) if placed else "–"
        lines.append(f"| {variant} | {where} | " + " | ".join(cells) + " |")
    return lines


def render(names: list[str]) -> str:
    runs = load(names)
    for name, run in zip(names, runs, strict=True):  # POST /outcomes measured on its own (--outcomes-only)
        extra = RESULTS / f"{name.replace('serving', 'outcomes')}.json"
        if not _rows(run, mode="outcomes") and extra.exists() and extra.name != f"{name}.json":
            run["results"] = run["results"] + json.loads(extra.read_text())["results"]
    shas = ", ".join(f"`{run['git']['sha'][:10]}`{' (dirty)' if run['git'].get('dirty') else ''}" for run in runs)
    machine = runs[0]["machine"]
    intro = (f"Generated by `python -m bench.report` from `bench/results/{{{','.join(names)}}}.json` (commits "
             f"{shas}; {machine['cpus']} CPUs, {machine.get('cpu_model') or machine['machine']}, Python "
             f"{machine['python']}). Each cell: run 1 / run 2. \"project\" is the project doing the peers' work: "
             f"every 2xx handed to librdkafka and answered without waiting for the broker "
             f"(`MLOPS_LOG_DURABILITY=async`); its default, `ack`, is measured beside it below.")
    profile = where_time_goes()
    durable = durability(runs)
    servers = grpc_servers()
    on_gpu = gpu()
    batched = batch() + (["", *trained] if (trained := pipeline()) else [])
    routed = routing() + (["", *rolled] if (rolled := rollout_serving()) else [])
    return "\n".join([intro, "", *closed_loop(runs), "", *latency_and_cpu(runs), "", *other_measures(runs),
                      *(["", *durable] if durable else []), *(["", *profile] if profile else []),
                      *(["", *servers] if servers else []), *(["", *routed] if routed else []),
                      *(["", *on_gpu] if on_gpu else []), *(["", *batched] if batched else [])])


def page_section(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[start:end].strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="result files (bench/results/<name>.json), comma-sep.")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {PAGE}'s tables differ")
    parser.add_argument("--write", action="store_true", help=f"replace {PAGE}'s tables")
    args = parser.parse_args(argv)
    text = render(args.runs.split(","))
    readme_path = ROOT / PAGE
    readme = readme_path.read_text()
    if args.check:
        if page_section(readme) != text:
            print(f"bench.report: {PAGE}'s serving tables differ from the result files; run "
                  "`python -m bench.report --write`", file=sys.stderr)
            return 1
        return 0
    if args.write:
        start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
        readme_path.write_text(readme[:start] + "\n" + text + "\n" + readme[end:])
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
