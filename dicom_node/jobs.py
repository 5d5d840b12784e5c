"""Jobs: what runs for a routed series, and the executor seam that runs it.

:class:`JobRunner` turns one journal job into files and outbox rows (load the series with its
patient geometry, run the model, write the derived objects, queue them per destination).
:class:`ThreadExecutor` runs jobs on in-process worker threads; a distributed engine can replace
it later behind the same two methods (``submit``, ``shutdown``).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydicom import dcmread

from inference.models import ModelRegistry
from inference.pipeline import run_model
from inference.volume import GeometryError, load_series

from .config import NodeConfig, Rule
from .journal import Journal, SeriesRecord
from .writers.derived_mr import Derivation, write_derived_mr

log = logging.getLogger(__name__)

#: Offsets added to ``source SeriesNumber × 100`` for each kind of output (+ version).
SERIES_NUMBER_OFFSETS = {"sT1": 0, "SEG": 10, "SR": 20, "SUMMARY": 30}


class Executor(Protocol):
    def submit(self, job_id: int) -> None: ...
    def shutdown(self) -> None: ...


def output_series_number(source_number: int, kind: str, version: int) -> int:
    """Deterministic, sorted after the source: source 1001, sT1 version 1 → 100101."""
    return max(source_number, 0) * 100 + SERIES_NUMBER_OFFSETS[kind] + min(version, 9)


def output_description(rule: Rule, version: int) -> str:
    return rule.output_name if version <= 1 else f"{rule.output_name} v{version}"


class JobFailed(RuntimeError):
    """A job that cannot succeed; the message is the reason shown by ``status``."""


class JobRunner:
    def __init__(self, config: NodeConfig, journal: Journal, registry: ModelRegistry,
                 on_written: Callable[[], object]) -> None:
        self.config = config
        self.journal = journal
        self.registry = registry
        self.on_written = on_written
        self.outputs_dir = config.node.data_dir / "outputs"

    def _rule(self, name: str) -> Rule:
        for rule in self.config.rules:
            if rule.name == name:
                return rule
        raise JobFailed(f"rule {name!r} is no longer configured")

    def run(self, job_id: int) -> None:
        job = self.journal.job(job_id)
        if job.state not in ("queued", "running"):
            return
        series = self.journal.series(job.series_uid)
        if series is None:
            self.journal.set_job_state(job_id, "failed", "series no longer in the journal")
            return
        self.journal.set_job_state(job_id, "running")
        started = time.perf_counter()
        try:
            rule = self._rule(job.rule)
            timings = self._run(job_id, job.version, rule, series)
        except JobFailed as exc:
            log.error("job %d (%s, series %r) failed: %s", job_id, job.rule, series.description, exc)
            self.journal.set_job_state(job_id, "failed", str(exc))
            return
        except GeometryError as exc:
            reason = f"inconsistent geometry: {exc}"
            log.error("job %d (%s, series %r) failed: %s", job_id, job.rule, series.description, reason)
            self.journal.set_job_state(job_id, "failed", reason)
            return
        except Exception as exc:  # noqa: BLE001 - a job failure must never stop the worker
            log.exception("job %d (%s, series %r) failed unexpectedly", job_id, job.rule, series.description)
            self.journal.set_job_state(job_id, "failed", f"{type(exc).__name__}: {exc}")
            return
        timings["total"] = time.perf_counter() - started
        job_now = self.journal.job(job_id)
        self.journal.set_job_state(job_id, job_now.state, job_now.reason, timings)
        log.info("job %d (%s) written in %.1f s: %s", job_id, job.rule, timings["total"],
                 ", ".join(f"{k} {v:.2f}s" for k, v in timings.items() if k != "total"))
        self.on_written()

    def _run(self, job_id: int, version: int, rule: Rule, series: SeriesRecord) -> dict[str, float]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        paths = [Path(i.path) for i in self.journal.instances(series.series_uid)]
        loaded = load_series(paths)
        timings["load"] = time.perf_counter() - t0
        out_dir = self.outputs_dir / f"job-{job_id:06d}"
        if out_dir.exists():  # a run interrupted by a crash: start it over with new UIDs
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        produced: list[tuple[str, str]] = []
        files: list[Path] = []
        source_number = int(series.attrs.get("SeriesNumber") or 0)

        if rule.action == "synthesize":
            assert rule.model is not None
            try:
                model = self.registry.session(rule.model)
            except KeyError:
                raise JobFailed(f"not processed: model {rule.model!r} not installed") from None
            result = run_model(model, loaded.image)
            timings.update({f"model.{k}": v for k, v in result.timings.items()})
            if result.t1 is None:
                raise JobFailed(f"model {rule.model!r} produced no image")
            t0 = time.perf_counter()
            manifest = model.manifest
            derivation = Derivation(
                model_id=manifest.id, model_version=manifest.version,
                description=(f"Synthetic MPRAGE-like T1 from {series.description!r} "
                             f"by model {manifest.id} {manifest.version}"),
            )
            written = write_derived_mr(
                result.t1, loaded.datasets, out_dir=out_dir / "sT1",
                series_description=output_description(rule, version),
                series_number=output_series_number(source_number, "sT1", version),
                derivation=derivation, uid_prefix=self.config.node.uid_root,
            )
            timings["write"] = time.perf_counter() - t0
            files += written
            produced.append((str(dcmread(written[0], stop_before_pixels=True).SeriesInstanceUID), "sT1"))
        else:
            raise JobFailed("volumetry of a real 3D T1 is not available in this version (stored only)")

        items: list[tuple[str, str, str, str]] = []
        headers = [dcmread(p, stop_before_pixels=True) for p in files]
        for dest in self.config.destinations_for(rule):
            for path, ds in zip(files, headers, strict=True):
                items.append((dest.name, str(path), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        self.journal.record_outputs(job_id, produced, items)
        return timings


class ThreadExecutor:
    """In-process workers pulling job ids from a queue."""

    def __init__(self, run: Callable[[int], None], workers: int = 1) -> None:
        self._run = run
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"job-worker-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job_id: int) -> None:
        self._queue.put(job_id)

    def _loop(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception:  # noqa: BLE001 - keep the worker alive
                log.exception("job %d crashed its worker", job_id)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
