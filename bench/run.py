"""``python -m bench.run [--quick] [--runs N] [--only P1,P2,...] [--out docs/benchmarks.md]``.

Measures P1 ingest, P2 turnaround, P3 memory, P4 concurrency and P5 throughput on this machine and writes the report.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.peers import missing_tools

from . import data, machine, report
from .ingest import SENDERS, concurrency, ingest
from .memory import memory
from .models import choose_models_dir
from .throughput import make_studies, throughput
from .turnaround import turnaround

REPO = Path(__file__).resolve().parents[1]
PARTS = ("P1", "P2", "P3", "P4", "P5")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and smaller inputs (a smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="P1 runs per receiver (default 5, quick 2)")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of P1,P2,P3,P4,P5")
    parser.add_argument("--p5-studies", type=int, default=None,
                        help="studies in the P5 stream (default 20, quick 2; about 1.5 min each on 2 cores)")
    parser.add_argument("--p2-runs", type=int, default=None, help="P2 runs (default 3, quick 1)")
    parser.add_argument("--p2-associations", type=int, default=2,
                        help="[[destinations]] max_associations of the P2 node towards Orthanc (default 2, as shipped)")
    parser.add_argument("--p5-workers", default="1,2", help="[inference] workers settings P5 compares")
    parser.add_argument("--p5-processes", default="1,2",
                        help="worker-process counts P5 compares (a receiver and N `serve --role worker`); '' for none")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="models folder holding synth-t1 for P2/P3 (default: onnx_models/ when the shipped "
                             "model is installed, else a test fixture)")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's Notes (repeatable)")
    args = parser.parse_args(argv)
    parts = {p.strip().upper() for p in args.only.split(",") if p.strip()}
    if parts - set(PARTS):
        parser.error(f"unknown part(s): {', '.join(sorted(parts - set(PARTS)))}")
    if missing_tools():
        print(f"missing tools: {', '.join(map(str, missing_tools()))}", file=sys.stderr)
        return 2
    runs = args.runs or (2 if args.quick else 5)
    if runs < 1:
        parser.error("--runs must be at least 1")
    p1_images = 50 if args.quick else 200
    p4_images = 50 if args.quick else 200
    p2_runs = args.p2_runs or (1 if args.quick else 3)
    memory_size = 128 if args.quick else 256

    load = machine.other_load()
    if load:
        _log("other CPU load present: " + "; ".join(load))
    results: dict[str, object] = {}
    inputs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp_path = Path(tmp)
        models_dir, model = choose_models_dir(tmp_path / "models", args.models_dir)
        if "P1" in parts or "P4" in parts:
            _log("generating ingest series")
            count = 8 if "P4" in parts else SENDERS
            folders = data.ingest_series(tmp_path / "ingest", slices=max(p1_images, p4_images), copies=count)
            inputs["P1/P4"] = (f"{count} generated series of {max(p1_images, p4_images)} axial 256 × 256 slices "
                               "(tests.dicom_factory)")
        if "P1" in parts:
            _log(f"P1 ingest: {runs} interleaved runs")
            results["ingest"] = ingest(folders[:1], p1_images, runs, log=_log)
            _log(f"P1 ingest, {SENDERS} senders at once: {runs} interleaved runs")
            results["ingest_concurrent"] = ingest(folders[:SENDERS], p1_images, runs, log=_log)
            _log(f"P1 ingest, one association per image: {runs} interleaved runs")
            results["ingest_per_image"] = ingest(folders[:1], p1_images, runs, log=_log, per_image=True)
        if "P2" in parts:
            scout, what = data.scout_series(tmp_path / "scout")
            inputs["P2"] = what
            _log(f"P2 turnaround: {p2_runs} run(s), {what}")
            results["turnaround"] = turnaround(scout, models_dir, p2_runs, log=_log,
                                               associations=args.p2_associations)
        if "P3" in parts:
            _log(f"P3 memory: generating {memory_size}³ series")
            series = data.memory_series(tmp_path / "memory", size=memory_size)
            inputs["P3"] = f"generated {memory_size}³ 1 mm 3D series (tests.dicom_factory)"
            results["memory"] = memory(series, memory_size, models_dir, log=_log)
        if "P4" in parts:
            _log("P4 concurrency")
            results["concurrency"] = concurrency(folders, p4_images, log=_log)
        if "P5" in parts:
            studies = args.p5_studies or (2 if args.quick else 20)
            _log(f"P5 throughput: preparing {studies} studies")
            study_folders, instances, per_study, what = make_studies(tmp_path / "p5", studies)
            inputs["P5"] = f"{studies} studies of {per_study} series ({instances} instances): {what}"
            settings = [("threads", int(w)) for w in args.p5_workers.split(",") if w.strip()]
            settings += [("processes", int(w)) for w in args.p5_processes.split(",") if w.strip()]
            results["throughput"] = [throughput(study_folders, instances, per_study, models_dir, n, log=_log,
                                                layout=layout) for layout, n in settings]
    load_end = machine.other_load()
    text = report.render(
        machine=machine.describe(), load=sorted(set(load) | set(load_end)),
        command="python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:]),
        quick=args.quick, inputs=inputs, model=model,
        ingest=results.get("ingest"), ingest_concurrent=results.get("ingest_concurrent"),  # type: ignore[arg-type]
        ingest_per_image=results.get("ingest_per_image"),  # type: ignore[arg-type]
        turnaround=results.get("turnaround"), throughput=results.get("throughput"),  # type: ignore[arg-type]
        memory=results.get("memory"), concurrency=results.get("concurrency"),  # type: ignore[arg-type]
        notes=args.note,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    _log(f"wrote {args.out}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
