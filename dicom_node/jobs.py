"""Jobs: what runs for a routed series, and the executor seam that runs it.

:class:`JobRunner` turns one journal job into files and outbox rows (load the series with its
patient geometry, run the model, write the derived objects, queue them per destination).
:class:`ThreadExecutor` runs jobs on in-process worker threads; a distributed engine can replace
it later behind the same two methods (``submit``, ``shutdown``).
"""

from __future__ import annotations

import datetime
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import SimpleITK as sitk
from pydicom import dcmread
from pydicom.dataset import Dataset

from inference.agreement import compare
from inference.models import LoadedModel, ModelManifest, ModelRegistry
from inference.pipeline import run_model
from inference.segmentation import segment
from inference.volume import GeometryError, LoadedSeries, load_series
from inference.volumetry import Volumetry, compute_volumetry, expected_structures, with_qc_flag

from .config import NodeConfig, Rule
from .journal import Journal, SeriesRecord
from .writers.agreement_sr import write_agreement_sr
from .writers.derived_mr import Derivation, write_derived_mr
from .writers.seg import write_seg
from .writers.sr import write_sr
from .writers.summary import write_summary

log = logging.getLogger(__name__)

#: What a volumetry job keeps in its output folder for a later agreement check.
AGREEMENT_T1 = "t1.mha"
AGREEMENT_LABELS = "labels.mha"

#: Offsets added to ``source SeriesNumber × 100`` for each kind of output (+ version).
SERIES_NUMBER_OFFSETS = {"sT1": 0, "SEG": 10, "SR": 20, "SUMMARY": 30, "AGREEMENT": 40}


class Executor(Protocol):
    def submit(self, job_id: int) -> None: ...
    def shutdown(self) -> None: ...


def output_series_number(source_number: int, kind: str, version: int) -> int:
    """Deterministic, sorted after the source: source 1001, sT1 version 1 → 100101."""
    return max(source_number, 0) * 100 + SERIES_NUMBER_OFFSETS[kind] + min(version, 9)


def output_description(rule: Rule, version: int, suffix: str = "") -> str:
    """``sT1AAH``, ``sT1AAH SEG``; a re-run adds its version: ``sT1AAH v2``, ``sT1AAH SEG v2``."""
    text = f"{rule.output_name}{suffix}"
    return text if version <= 1 else f"{text} v{version}"


@dataclass(frozen=True)
class _Images:
    t1: sitk.Image                          # the T1 measured: the sT1 or the real T1
    labels: sitk.Image | None               # a model's own labels on t1's grid (without a segmenter)
    synthesis: ModelManifest | None         # the synthesis model of a synthesize rule
    own_labels_of: ModelManifest | None     # the model whose own labels are used (no segmenter)


@dataclass(frozen=True)
class _Measured:
    volumetry: Volumetry | None
    labels: sitk.Image | None
    algorithm: ModelManifest                # who drew the labels (named in the SEG and SR)


def _age_from_dates(ds: Dataset) -> float | None:
    """Age in years from PatientBirthDate and the study (or series, acquisition) date, when PatientAge is absent."""
    birth = str(ds.get("PatientBirthDate") or "")
    when = str(ds.get("StudyDate") or ds.get("SeriesDate") or ds.get("AcquisitionDate") or "")
    try:
        born, seen = (datetime.datetime.strptime(v[:8], "%Y%m%d").date() for v in (birth, when))
    except ValueError:
        return None
    return (seen - born).days / 365.25 if seen >= born else None


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
        attempt = self.journal.start_job(job_id)
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
        except KeyboardInterrupt:
            # only the main thread gets these (a debugging session): the job stays 'running', so
            # the next start counts it as interrupted
            log.warning("job %d (%s) interrupted during run %d", job_id, job.rule, attempt)
            raise
        except BaseException as exc:  # noqa: BLE001 - a job failure must never stop the worker
            # Not only Exception: a Rust decoder's panic (pyo3_runtime.PanicException) and a library's
            # sys.exit() are BaseExceptions; uncaught they end the worker thread with the job 'running'.
            crashed = "" if isinstance(exc, Exception) else " (crashed: not an Exception)"
            log.error("job %d (%s, series %r) failed unexpectedly%s", job_id, job.rule, series.description,
                      crashed, exc_info=exc)
            self.journal.set_job_state(job_id, "failed", f"{type(exc).__name__}: {exc}{crashed}")
            return
        timings["total"] = time.perf_counter() - started
        self.journal.set_job_timings(job_id, timings)
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
        source_number = int(series.attrs.get("SeriesNumber") or 0)
        uid_prefix = self.config.node.uid_root

        images = self._images(rule, loaded, timings)
        measured = self._measure(job_id, rule, loaded, images, timings)
        volumetry, labels, t1 = measured.volumetry, measured.labels, images.t1
        manifest = images.synthesis

        headers: dict[Path, Dataset] = {}  # every file to send, with its header (read once)
        produced: list[tuple[str, str]] = []
        t0 = time.perf_counter()
        if rule.action == "synthesize":
            assert manifest is not None
            derivation = Derivation(
                model_id=manifest.id, model_version=manifest.version,
                description=(f"Synthetic MPRAGE-like T1 from {series.description!r} "
                             f"by model {manifest.id} {manifest.version}"),
            )
            written = write_derived_mr(
                t1, loaded.datasets, out_dir=out_dir / "sT1", series_description=output_description(rule, version),
                series_number=output_series_number(source_number, "sT1", version),
                derivation=derivation, uid_prefix=uid_prefix,
            )
            t1_sources = list(written.datasets)
            headers.update(zip(written.paths, t1_sources, strict=True))
            produced.append((written.series_instance_uid, "sT1"))
        else:
            t1_sources = loaded.datasets
        timings["write"] = time.perf_counter() - t0

        if volumetry is not None:
            assert labels is not None
            t0 = time.perf_counter()
            algorithm = {"algorithm_name": measured.algorithm.id, "algorithm_version": measured.algorithm.version}
            written_objects = self._write_volumetry(volumetry, labels, t1, t1_sources, loaded, rule, version,
                                                    out_dir, source_number, algorithm)
            for path, (ds, kind) in written_objects.items():
                headers[path] = ds
                produced.append((str(ds.SeriesInstanceUID), kind))
            timings["write.volumetry"] = time.perf_counter() - t0
            agreement_path = None
            if volumetry.structures:
                # kept for the agreement check with a counterpart (rT1 vs sT1) in the same study
                sitk.WriteImage(t1, str(out_dir / AGREEMENT_T1), useCompression=True)
                sitk.WriteImage(labels, str(out_dir / AGREEMENT_LABELS), useCompression=True)
                t0 = time.perf_counter()
                agreement_path = self._agreement(job_id, rule, version, series, out_dir, source_number)
            if agreement_path is not None:
                headers[agreement_path] = dcmread(agreement_path, stop_before_pixels=True)
                produced.append((str(headers[agreement_path].SeriesInstanceUID), "AGREEMENT"))
                timings["agreement"] = time.perf_counter() - t0

        items: list[tuple[str, str, str, str]] = []
        for dest in self.config.destinations_for(rule):
            for path, ds in headers.items():
                items.append((dest.name, str(path), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        self.journal.record_outputs(job_id, produced, items)
        return timings


    def _model(self, model_id: str | None) -> LoadedModel:
        if not model_id:
            raise JobFailed("not processed: the rule names no model")
        try:
            return self.registry.session(model_id)
        except KeyError:
            raise JobFailed(f"not processed: model {model_id!r} not installed") from None

    def _images(self, rule: Rule, loaded: LoadedSeries, timings: dict[str, float]) -> _Images:
        """The T1 to measure: the synthetic sT1 of a synthesis rule, or the real T1 itself. Labels come with it
        only from a model's own segmentation output, when no segmenter is configured."""
        segmenter = self.config.inference.segmenter
        if rule.action == "volumetry" and segmenter:
            return _Images(t1=loaded.image, labels=None, synthesis=None, own_labels_of=None)
        model = self._model(rule.model)
        mirror = self.config.inference.mirror_average and rule.action == "synthesize" and bool(segmenter)
        result = run_model(model, loaded.image, mirror_average=mirror)
        timings.update({f"model.{k}": v for k, v in result.timings.items()})
        own = None if segmenter else model.manifest
        if rule.action == "synthesize":
            if result.t1 is None:
                raise JobFailed(f"model {rule.model!r} produced no image")
            return _Images(t1=result.t1, labels=result.labels, synthesis=model.manifest, own_labels_of=own)
        if result.labels is None:  # volumetry of the real T1 by the rule's model, on the T1's own grid
            raise JobFailed(f"model {rule.model!r} has no segmentation output: no volumetry")
        labels = sitk.Resample(result.labels, loaded.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                               result.labels.GetPixelID())
        return _Images(t1=loaded.image, labels=labels, synthesis=None, own_labels_of=own)

    def _measure(self, job_id: int, rule: Rule, loaded: LoadedSeries, images: _Images,
                 timings: dict[str, float]) -> _Measured:
        """Segment the T1 with the segmenter (or take the model's own labels) and measure it."""
        if not rule.volumetry:
            return _Measured(None, None, images.synthesis)  # type: ignore[arg-type]
        icv_ml = outside_ml = None
        if images.own_labels_of is not None:
            labels, algorithm = images.labels, images.own_labels_of
        else:
            segmenter = self._model(self.config.inference.segmenter)
            result = segment(segmenter, images.t1)
            timings.update({f"segment.{k}": v for k, v in result.timings.items()})
            labels, algorithm = result.labels, segmenter.manifest
            icv_ml, outside_ml = result.icv_ml, result.outside_ml
        if labels is None:
            return _Measured(None, None, algorithm)
        assert algorithm.output.segmentation is not None
        expected = expected_structures(algorithm.output.segmentation.labels)
        t0 = time.perf_counter()
        first = loaded.datasets[0]
        volumetry = compute_volumetry(labels, images.t1, age=first.get("PatientAge") or _age_from_dates(first),
                                      sex=first.get("PatientSex"), expected_codes=expected, icv_ml=icv_ml,
                                      outside_ml=outside_ml)
        timings["volumetry"] = time.perf_counter() - t0
        if not volumetry.qc_passed:
            failed = "; ".join(c.reason for c in volumetry.qc if c.passed is False)
            log.warning("job %d: volumetry quality control FAILED: %s", job_id, failed)
        return _Measured(volumetry, labels, algorithm)

    def _write_volumetry(self, volumetry: Volumetry, labels: sitk.Image, t1: sitk.Image,
                         t1_sources: list[Dataset], loaded: LoadedSeries, rule: Rule, version: int, out_dir: Path,
                         source_number: int, algorithm: dict[str, str]) -> dict[Path, tuple[Dataset, str]]:
        """SEG (unless the segmenter found no structure), SR and summary page; each file with its header."""
        uid_prefix = self.config.node.uid_root
        out: dict[Path, tuple[Dataset, str]] = {}
        seg = None
        if volumetry.structures:
            seg = write_seg(
                labels, t1_sources, out_path=out_dir / "seg.dcm", uid_prefix=uid_prefix,
                series_number=output_series_number(source_number, "SEG", version),
                series_description=with_qc_flag(output_description(rule, version, " SEG"), volumetry),
                **algorithm,
            )
            out[seg.path] = (seg.dataset, "SEG")
        else:
            log.warning("segmenter %s found no brain structure: no SEG, the SR and summary say QC failed",
                        algorithm["algorithm_name"])
        sr = write_sr(
            volumetry, seg=seg, source_images=t1_sources, input_series_datasets=loaded.datasets,
            out_path=out_dir / "sr.dcm", uid_prefix=uid_prefix,
            series_number=output_series_number(source_number, "SR", version),
            series_description=output_description(rule, version, " volumes"), **algorithm,
        )
        summary = write_summary(
            volumetry, t1=t1, labels=labels, source_images=t1_sources, out_path=out_dir / "summary.dcm",
            uid_prefix=uid_prefix, synthetic=rule.action == "synthesize",
            series_number=output_series_number(source_number, "SUMMARY", version),
            series_description=output_description(rule, version, " summary"), **algorithm,
        )
        for written, kind in ((sr, "SR"), (summary, "SUMMARY")):
            out[written.path] = (written.dataset, kind)
        return out

    def _agreement(self, job_id: int, rule: Rule, version: int, series: SeriesRecord, out_dir: Path,
                   source_number: int) -> Path | None:
        """When the study also holds the other side (a real T1 for an sT1, or an sT1 for a real T1),
        compare the two and write an agreement SR; None when there is no counterpart."""
        other_action = "volumetry" if rule.action == "synthesize" else "synthesize"
        counterpart = None
        for job in reversed(self.journal.jobs_in_study(series.study_uid)):
            other_dir = self.outputs_dir / f"job-{job.id:06d}"
            if (job.id != job_id and job.action == other_action and job.state in ("written", "sent")
                    and (other_dir / AGREEMENT_LABELS).exists() and (other_dir / "seg.dcm").exists()):
                counterpart = (job, other_dir)
                break
        if counterpart is None:
            return None
        other_job, other_dir = counterpart
        if rule.action == "synthesize":
            real_dir, synth_dir, synth_rule = other_dir, out_dir, rule
            real_series_uid = other_job.series_uid
        else:
            real_dir, synth_dir, synth_rule = out_dir, other_dir, self._rule(other_job.rule)
            real_series_uid = series.series_uid
        real_images = [dcmread(i.path, stop_before_pixels=True) for i in self.journal.instances(real_series_uid)]
        synthetic_images = [dcmread(p, stop_before_pixels=True) for p in sorted((synth_dir / "sT1").glob("*.dcm"))]
        agreement = compare(
            sitk.ReadImage(str(real_dir / AGREEMENT_T1)), sitk.ReadImage(str(real_dir / AGREEMENT_LABELS)),
            sitk.ReadImage(str(synth_dir / AGREEMENT_T1)), sitk.ReadImage(str(synth_dir / AGREEMENT_LABELS)),
        )
        log.info("job %d: agreement of %s with the real T1: PSNR %.1f dB, SSIM %.3f, mean Dice %.3f, "
                 "mean ASPC %.1f %%", job_id, synth_rule.output_name, agreement.psnr, agreement.ssim,
                 agreement.mean_dice, agreement.mean_aspc)
        manifest = self.registry.session(synth_rule.model).manifest
        return write_agreement_sr(
            agreement, real_t1_images=real_images, synthetic_t1_images=synthetic_images,
            real_seg=dcmread(real_dir / "seg.dcm", stop_before_pixels=True),
            synthetic_seg=dcmread(synth_dir / "seg.dcm", stop_before_pixels=True),
            out_path=out_dir / "agreement.dcm", uid_prefix=self.config.node.uid_root,
            series_number=output_series_number(source_number, "AGREEMENT", version),
            series_description=f"{synth_rule.output_name} vs rT1 agreement",
            algorithm_name=manifest.id, algorithm_version=manifest.version,
        ).path


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
            except BaseException:  # noqa: BLE001 - keep the worker alive, whatever the job raised
                # (JobRunner.run records the failure; this is the last line of defence, and the
                # only way out of this loop is shutdown's None)
                log.exception("job %d crashed its worker", job_id)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
