"""A real canary run, recorded by Prometheus and drawn as the dashboard's panels (a PNG).

Run: .venv/bin/python benchmarks/canary_dashboard.py [--out docs/canary-dashboard.png]
As a user runs it, from a scratch folder outside this repository: `servetool package` digits,
`deploy --split`, a version 2.0 loaded beside it (`deploy --no-promote`), Prometheus (Debian's)
on the configuration `servetool monitor` writes, a steady load (4 clients, 1 in 20 requests a bad
body), then `servetool canary digits 2.0 --auto --steps 10,25,50,100 --interval 15`. Afterwards
every panel of the Grafana dashboard (servetool/operate/dashboard.py) is read from Prometheus over the run
(query_range, the same PromQL) and drawn with matplotlib, because Grafana itself does not install
here; the PNG shows what the dashboard shows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import SERVETOOL, cli  # noqa: E402
from servetool.bench.serve import run_load  # noqa: E402
from servetool.engines.torchserve.process import free_ports  # noqa: E402
from servetool.operate.dashboard import PANELS, expressions  # noqa: E402
from tests.test_lifecycle import rewrite_archive  # noqa: E402


def draw(prom: str, start: float, end: float, out: Path, marks: list[tuple[float, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(PANELS) + 2) // 2  # every panel, and the timeline of decisions
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows))
    for ax, (title, unit, _, _) in zip(axes.flat, PANELS, strict=False):
        expr = expressions("digits", "20s")[title]
        data = requests.get(f"{prom}/api/v1/query_range", timeout=30, params={
            "query": expr, "start": start, "end": end, "step": 2}).json()["data"]["result"]
        scale = 1000.0 if unit == "s" else 100.0 if unit == "percentunit" else 1.0
        label_unit = {"s": "ms", "percentunit": "%", "percent": "%", "reqps": "req/s"}[unit]
        for series in data:
            xs = [float(t) - start for t, _ in series["values"]]
            ys = [float(v) * scale for _, v in series["values"]]
            name = " ".join(series["metric"].get(k, "") for k in ("ModelVersion", "version",
                                                                   "Reason")).strip()
            ax.plot(xs, ys, label=name or "candidate share")
        for at, _ in marks:
            ax.axvline(at - start, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(title)
        ax.set_ylabel(label_unit)
        ax.set_xlabel("seconds into the run")
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    axes.flat[len(PANELS)].text(0, 0.9, "\n".join(f"{at - start:5.0f} s  {text}" for at, text in marks),
                       fontsize=9, va="top", family="monospace")
    fig.suptitle("servetool dashboard panels, digits 1.0 -> 2.0 canary (--auto), from Prometheus")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def record(work: Path, tmp: Path, ports: dict[str, int], port_args: list[str],
           png: Path) -> None:
    """Version 2.0 beside the default, Prometheus, load, the canary, and the drawing."""
    v2 = rewrite_archive(work / "model_store" / "digits.mar", tmp / "v2.mar", version="2.0")
    (work / "model_store" / "digits-2.0.mar").write_bytes(v2.read_bytes())
    cli("deploy", "model_store/digits-2.0.mar", "--no-promote", *port_args, cwd=work)
    prom_port = free_ports(("prometheus",))["prometheus"]
    cli("monitor", "--prometheus-config", "prometheus.yml", "--scrape-interval", "1", cwd=work)
    prom = subprocess.Popen(["prometheus", "--config.file=prometheus.yml",
                             f"--web.listen-address=127.0.0.1:{prom_port}",
                             f"--storage.tsdb.path={tmp}/tsdb"], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        keys = json.loads((work / ".servetool" / "key_file.json").read_text())
        headers = {"Authorization": f"Bearer {keys['inference']['key']}"}
        body = (ROOT / "models" / "digits" / "samples" / "digit_3.png").read_bytes()
        payloads = [(body, "image/png")] * 19 + [(b"not an image", "image/png")]
        stop = threading.Event()
        url = f"http://127.0.0.1:{ports['inference']}/predictions/digits"
        load = threading.Thread(target=run_load, args=(url, payloads), kwargs={
            "concurrency": 4, "duration_s": None, "stop": stop, "headers": headers})
        start = time.time()
        marks = [(start, "load starts; 2.0 loaded beside 1.0")]
        load.start()
        try:
            time.sleep(20)
            marks.append((time.time(), "servetool canary digits 2.0 --auto"))
            result = cli("canary", "digits", "2.0", "--auto", "--steps", "10,25,50,100",
                         "--interval", "15", "--json", cwd=work)
            marks.append((time.time(), f"canary: {json.loads(result)['status']}"))
            time.sleep(20)
        finally:
            stop.set()
            load.join()
        draw(f"http://127.0.0.1:{prom_port}", start, time.time(), png, marks)
    finally:
        prom.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "canary-dashboard.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="servetool-canary-") as tmp:
        work = Path(tmp) / "project"
        work.mkdir()
        cli("package", str(ROOT / "models" / "digits"), cwd=work)
        ports = free_ports()
        port_args = [f"--{api.replace('_', '-')}-port={p}" for api, p in ports.items()]
        cli("deploy", "--split", *port_args, cwd=work)
        try:
            record(work, Path(tmp), ports, port_args, args.out)
        finally:  # whatever failed, the server and its HAProxy stop
            subprocess.run([SERVETOOL, "stop"], cwd=work, capture_output=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
