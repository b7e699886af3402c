"""Commands that build and measure artifacts: package, convert, compress, bench formats, bench
serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from servetool.cli.common import (
    FORMAT_NAMES,
    check_model_args,
    emit,
    friendly_errors,
    json_option,
    main,
    make_target,
    progress,
    server_options,
)
from servetool.engines import NAMES as ENGINE_NAMES
from servetool.engines.torchserve.management import model_path
from servetool.errors import ServetoolError

atol_option = click.option(
    "--atol", type=float, default=None,
    help="Parity atol (scaled by each output's max(1, max|value|)), overriding the format's "
         "default and the spec's.")
accept_option = click.option(
    "--accept-drift", is_flag=True,
    help="Package even when the gate finds drift (the problems are still reported).")


def gate_summary(gate: dict[str, Any]) -> str:
    parts = []
    if gate["outputs"]:
        out = gate["outputs"][0]
        parts.append(f"max abs diff {out['max_abs_diff']:.2g} (bound {out['bound']:.2g})")
        if out["top1_agreement"] is not None:
            parts.append(f"top-1 agreement {out['top1_agreement']:.1%}")
        elif out.get("min_cosine") is not None:
            parts.append(f"cosine similarity >= {out['min_cosine']:.6f}")
    if gate["accuracy"]:
        acc = gate["accuracy"]
        parts.append(f"accuracy {acc['original']:.2%} -> {acc['converted']:.2%} "
                     f"({(acc['converted'] - acc['original']) * 100:+.2f} pts)")
    if gate.get("detection"):
        parts += detection_summary(gate["detection"])
    if gate["problems"]:
        parts.append("ACCEPTED DESPITE: " + "; ".join(gate["problems"]))
    return ", ".join(parts)


def detection_summary(found: dict[str, Any]) -> list[str]:
    """A detector's gate in words: mAP before and after (with labels), and box agreement."""
    parts = []
    if found["map_original"] is not None:
        parts.append(f"mAP@0.5:0.95 {found['map_original']:.4f} -> {found['map_converted']:.4f} "
                     f"({-found['drop_points']:+.2f} pts)")
    agree = found["agreement"]
    if not agree["boxes"]:
        return [*parts, f"no boxes from the original on {agree['images']} images to compare"]
    parts.append(f"{agree['matched']:.1%} of the original's {agree['boxes']} boxes found again on "
                 f"{agree['images']} images" + (f" (min IoU {agree['min_iou']:.3f})"
                                               if agree["min_iou"] is not None else ""))
    return parts


@main.command()
@click.argument("model_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model-store", type=click.Path(path_type=Path), envvar="SERVETOOL_MODEL_STORE",
              default="model_store", show_default=True, help="Where to write the .mar archives.")
@click.option("--models-root", type=click.Path(path_type=Path), default="models", show_default=True,
              help="Where to look for models when no MODEL_DIR is given.")
@click.option("--engine", type=click.Choice(ENGINE_NAMES), envvar="SERVETOOL_ENGINE",
              default="torchserve", show_default=True,
              help="The engine the archive is built for: both serve the same .mar (the handler "
                   "and its pre-flight are shared), so this names the deploy it is meant for.")
@atol_option
@accept_option
@json_option
@friendly_errors
def package(model_dirs: tuple[Path, ...], model_store: Path, models_root: Path, engine: str,
            atol: float | None, accept_drift: bool, as_json: bool) -> None:
    """Convert each model to its spec's format, gate it, and build its .mar.

    MODEL_DIRS are folders holding a servetool.yaml (default: every model under --models-root).
    """
    from servetool.model.spec import find_specs
    from servetool.operate.package import package as package_model

    specs = find_specs([str(d) for d in model_dirs], models_root)
    results = [package_model(spec, model_store, atol=atol, accept_drift=accept_drift,
                             engine=engine, progress=progress) for spec in specs]
    lines = [f"{r['archive']}: {r['name']} {r['version']} as {r['format']}, "
             f"{r['archive_bytes'] / 1e6:.2f} MB, {gate_summary(r['parity'])}, {r['seconds']} s"
             for r in results]
    emit({"models": results}, as_json, "\n".join(lines))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--format", "formats", multiple=True, type=click.Choice(FORMAT_NAMES),
              help="A format to produce (repeatable) [default: the spec's format].")
@click.option("--out", type=click.Path(path_type=Path), default="build", show_default=True,
              help="Artifacts go to OUT/NAME/FORMAT/.")
@atol_option
@accept_option
@json_option
@friendly_errors
def convert(model_dir: Path, formats: tuple[str, ...], out: Path, atol: float | None,
            accept_drift: bool, as_json: bool) -> None:
    """Export MODEL_DIR's model to serving formats and check each against the original.

    Every artifact passes the gate (parity on sample inputs with the format's tolerance, and top-1
    accuracy on the spec's validation set) or the command fails naming the drift.
    """
    from servetool.convert import export
    from servetool.convert.pipeline import convert as convert_model
    from servetool.convert.pipeline import describe
    from servetool.model.spec import load_spec

    spec = load_spec(model_dir)
    original = export.load_original(spec)
    rows = []
    for fmt in formats or (spec.format,):
        artifact, report = convert_model(spec, fmt, out / spec.name / fmt, original=original,
                                         atol=atol, accept_drift=accept_drift, progress=progress)
        rows.append(describe(artifact, report))
    lines = [f"{r['format']}: {r['files'][0]} ({r['size_bytes'] / 1e6:.2f} MB), "
             f"{gate_summary(r['gate'])}" for r in rows]
    emit({"model": spec.name, "formats": rows}, as_json, "\n".join(lines))


@main.group()
def bench() -> None:
    """Measure serving formats side by side, or load-test a deployed model."""


@bench.command("formats")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--format", "formats", multiple=True, type=click.Choice(FORMAT_NAMES),
              help="A format to include (repeatable) [default: every format; tensorrt shows why "
                   "it is skipped on a machine without CUDA].")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Batch size for the throughput column.")
@click.option("--iterations", type=click.IntRange(min=10), default=300, show_default=True,
              help="Batch-1 runs per format (fewer if --seconds runs out first).")
@click.option("--seconds", type=float, default=8.0, show_default=True,
              help="Time budget per format and measurement.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads for every format [default: all cores].")
@click.option("--out", type=click.Path(path_type=Path), default="bench", show_default=True,
              help="Folder for NAME-formats.md, .csv and .png.")
@click.option("--with", "others", multiple=True, type=click.Path(path_type=Path),
              help="Another version's model folder (e.g. what `servetool compress` wrote), "
                   "measured in the same run on the same inputs (repeatable).")
@json_option
@friendly_errors
def bench_formats_command(model_dir: Path, formats: tuple[str, ...], batch: int, iterations: int,
                          seconds: float, threads: int | None, out: Path, others: tuple[Path, ...],
                          as_json: bool) -> None:
    """One row per serving format of MODEL_DIR's model: accuracy, latency, throughput, size, memory.

    Everything is measured in one run on the same inputs, each format in its own process after a
    warm-up, with the speedup against eager PyTorch measured the same way.
    """
    from servetool.bench.formats import DEFAULT_FORMATS, bench_formats, markdown_table, write_outputs
    from servetool.model.spec import load_spec

    spec = load_spec(model_dir)
    result = bench_formats(spec, list(formats) or DEFAULT_FORMATS, batch=batch,
                           iterations=iterations, seconds=seconds, threads=threads,
                           others=[load_spec(other) for other in others], progress=progress)
    result["files"] = write_outputs(result, out)
    text = markdown_table(result) + "\nWritten: " + ", ".join(result["files"].values())
    emit(result, as_json, text)


@bench.command("serve")
@click.argument("model")
@click.option("--payload", "payloads", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A request body file or a folder of them (repeatable) "
                   "[default: models/MODEL/samples].")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=8, show_default=True,
              help="Clients, each sending its next request when its last one is answered.")
@click.option("--duration", type=float, default=20.0, show_default=True, help="Seconds to run.")
@click.option("--requests", "count", type=click.IntRange(min=1), default=None,
              help="Send exactly this many requests instead of running for --duration.")
@click.option("--engine", type=click.Choice(["auto", "wrk", "python"]), default="auto",
              show_default=True,
              help="auto: wrk when installed (least CPU), Python when not or with --requests.")
@click.option("--version", "model_version", default=None, help="A model version.")
@click.option("--out", type=click.Path(path_type=Path), default="bench", show_default=True)
@server_options
@json_option
@friendly_errors
def bench_serve_command(model: str, payloads: tuple[Path, ...], concurrency: int, duration: float,
                        count: int | None, engine: str, model_version: str | None, out: Path,
                        run_dir: Path, model_store: Path, target: str, as_json: bool) -> None:
    """Load-test a deployed MODEL: throughput, p50/p90/p99 latency, errors by status, lost requests."""
    from servetool.bench.serve import (
        Auth,
        load_payloads,
        markdown,
        payload_files,
        run_load,
        run_wrk,
        write_outputs,
        wrk_path,
    )

    check_model_args(model, model_version)
    target = make_target(run_dir, model_store, target)
    client = target.client()
    if not client.has_model(model):
        raise ServetoolError(f"no model {model!r} is registered (see `servetool status`)")
    sources = list(payloads) or [Path("models") / model / "samples"]
    if not all(p.exists() for p in sources):
        raise ServetoolError(f"no payloads: pass --payload FILE_OR_FOLDER ({sources[0]} does not exist)")

    def bearer() -> str | None:
        """The inference key as a header: read again, and renewed if it has expired."""
        token = client.token("inference")
        return f"Bearer {token}" if token else None

    auth = Auth(bearer(), bearer)  # renewed before the load if it has already expired
    url = f"{client.state.url('inference')}/predictions{model_path(model, model_version)}"
    if engine == "wrk" and (count or not wrk_path()):
        raise ServetoolError("--engine wrk needs wrk installed (apt-get install wrk) and runs "
                             "for --duration, not --requests")
    use_wrk = engine == "wrk" or (engine == "auto" and not count and wrk_path() is not None)
    progress(f"{concurrency} clients on {url} for "
             + (f"{count} requests" if count else f"{duration:.0f} s")
             + f" ({'wrk' if use_wrk else 'Python'} engine)")
    if use_wrk:
        result = run_wrk(url, payload_files(sources), concurrency=concurrency,
                         duration_s=duration, auth=auth,
                         key_expires_at=lambda: client.key_expiry("inference"), progress=progress)
    else:
        result = run_load(url, load_payloads(sources), concurrency=concurrency,
                          duration_s=None if count else duration, requests=count,
                          auth=auth, progress=progress)
    if result.key_renewals:
        progress(f"the inference key expired during the run: renewed {result.key_renewals} "
                 f"time(s){f', {result.retried} request(s) sent again' if result.retried else ''}")
    if result.key_error:
        progress(f"renewing the inference key failed: {result.key_error}")
    summary = result.summary()
    summary["files"] = write_outputs(result, out, f"{model}-serve")
    emit(summary, as_json, markdown(summary) + "\nWritten: " + ", ".join(summary["files"].values()))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="The new model folder [default: MODEL_DIR-compressed beside MODEL_DIR].")
@click.option("--version", "model_version", default=None,
              help="The new version [default: the original's, last number one up: 1.0 -> 1.1].")
@click.option("--accept", is_flag=True,
              help="Keep the result even when it loses more accuracy than "
                   "compress.max_accuracy_drop allows (the drop is still reported).")
@click.option("--latency-seconds", type=click.FloatRange(min=0), default=3.0, show_default=True,
              help="Time budget per step and batch size for the latency columns (0: not measured).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for training and latency [default: all cores].")
@json_option
@friendly_errors
def compress(model_dir: Path, out: Path | None, model_version: str | None, accept: bool,
             latency_seconds: float, threads: int | None, as_json: bool) -> None:
    """Make a smaller version of MODEL_DIR's model, as its spec's compress: section says.

    Structured pruning (or a student class you give), recovered by distillation from the
    original, saved as a new model folder (model.pt2 + servetool.yaml) that `package` takes;
    refused when its top-1 accuracy falls more than compress.max_accuracy_drop points below the
    original's. A report per step goes to OUT (compress-report.json, .csv, .png). An interrupted
    or refused run resumes from its checkpoint in OUT/.compress/.
    """
    from servetool.convert.compress import compress as compress_model
    from servetool.convert.compress.report import table
    from servetool.model.spec import load_spec

    result = compress_model(load_spec(model_dir), out, version=model_version, accept=accept,
                            latency_seconds=latency_seconds, threads=threads, progress=progress)
    gate = result["gate"]
    verdict = (f"compression gate: top-1 {gate['original']:.2%} -> {gate['result']:.2%} "
               f"({-gate['drop_points']:+.2f} pts, allowed -{gate['max_drop_points']:.2f})"
               + (" ACCEPTED DESPITE THE DROP" if gate["accepted_despite_drop"] else ""))
    text = (table(result) + f"\n{verdict}\n{result['spec']}: version {result['version']}; "
            f"package it with: servetool package {result['out']}\nWritten: "
            + ", ".join(result["files"].values()))
    emit(result, as_json, text)
