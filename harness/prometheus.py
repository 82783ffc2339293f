"""Run a real Prometheus (Debian's package) against the locally running stack, with the project's alert rules.

    python -m harness.prometheus --serving 127.0.0.1:3000 --drift 127.0.0.1:9108 [--port 9090] [--scrape-interval 5s]

It writes a config scraping the serving tier as job `fraud-detector` and the drift consumer as job
`drift-consumer` (the job names deploy/prometheus/alerts.yaml and prometheus.yml use), loads the alert
rules, keeps its data in a temporary folder, and runs until Ctrl-C. Point Grafana at the printed URL and
import deploy/grafana/fraud-detector.json. tests/test_prometheus_scrape.py drives the same code.
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from harness.readiness import http_ok, wait_ready
from tools.services import free_port

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or refused a query."""


@dataclass
class PrometheusProcess:
    url: str
    process: subprocess.Popen
    workdir: Path
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error', response.text[:200])}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's series as (labels, value)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def value(self, expr: str) -> float:
        """The single value of a query that returns one series (NaN when it returns none)."""
        result = self.query(expr)
        return result[0][1] if len(result) == 1 else math.nan

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def write_config(path: Path, targets: dict[str, list[str]], scrape_interval: str = "5s",
                 rules: tuple[Path, ...] = (RULES,)) -> Path:
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                   "scrape_timeout": scrape_interval},
        "rule_files": [str(r.resolve()) for r in rules],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addresses}]}
                           for job, addresses in targets.items() if addresses],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start(targets: dict[str, list[str]], workdir: Path, port: int | None = None, scrape_interval: str = "5s",
          host: str = "127.0.0.1", timeout: float = 60) -> PrometheusProcess:
    """Start Prometheus on host:port (a free port when None) and wait until it is ready."""
    exe = shutil.which("prometheus")
    if not exe:
        raise PrometheusError("prometheus not found: run scripts/install.sh (Debian package prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "prometheus.yml", targets, scrape_interval)
    port = port or free_port()
    log_path = workdir / "prometheus.log"
    process = subprocess.Popen(
        [exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address={host}:{port}", "--storage.tsdb.retention.time=1d", "--log.level=warn"],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    prom = PrometheusProcess(f"http://{host}:{port}", process, workdir, log_path)
    why_not = wait_ready(process, http_ok(f"{prom.url}/-/ready"), timeout, interval=0.3)
    if why_not is None:
        return prom
    prom.stop()
    raise PrometheusError(f"prometheus {why_not}:\n{prom.log_tail()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.prometheus", description=__doc__.splitlines()[0])
    parser.add_argument("--serving", action="append", default=[], help="host:port of a bentoml serve (repeatable)")
    parser.add_argument("--drift", action="append", default=[], help="host:port of a drift consumer's metrics")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--scrape-interval", default="5s")
    args = parser.parse_args(argv)
    if not args.serving and not args.drift:
        parser.error("name at least one --serving or --drift target")
    with tempfile.TemporaryDirectory(prefix="mlops-prometheus-") as tmp:
        try:
            prom = start({"fraud-detector": args.serving, "drift-consumer": args.drift}, Path(tmp), args.port,
                         args.scrape_interval)
        except PrometheusError as exc:
            print(f"prometheus: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
        print(f"Prometheus on {prom.url} (rules: {RULES.relative_to(ROOT)}); Ctrl-C stops it", flush=True)
        try:
            prom.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            prom.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
