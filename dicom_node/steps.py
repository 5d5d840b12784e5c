"""The steps of one job: a routed series' journey from its spooled files to queued outputs.

Each step is a function with typed inputs and outputs; :class:`dicom_node.jobs.JobRunner` runs them in
this order::

    load_step         journal instances ──▶ LoadedSeries (volume in patient geometry + headers; the series'
                      geometry computed once, here)
    synthesize_step   LoadedSeries ──▶ Images (the T1 to measure: the sT1 or the real T1)
    measure_step      Images ──▶ Measured (labels of the segmenter, volumetry and QC)
    write_t1_step     Images ──▶ Output (the sT1 series)
    measured_t1       ──▶ MeasuredT1 (headers and frame geometry of the T1 the next objects reference:
                      the sT1's from its grid, or the received T1's from load_step)
    write_seg_step, write_sr_step, write_summary_step
                      ──▶ Output (what each writer wrote: files, UIDs, SEG segment numbers)
    keep_volumes_step Images + Measured ──▶ OutputFile (the T1 and labels a follow-up compares)
    record_and_queue  Outputs ──▶ journal (produced series, output files, outbox rows per destination, and the
                      follow-ups wanted, in one transaction)
    ─── the core outputs are recorded and queued for delivery ───
    follow-ups        (optional, each its own task for the executor) FollowUpContext + journal ──▶ Output | str:
      agreement_step  every input from the journal's record of outputs (output_files, jobs_in_study)

    not_processed_step  (when a job fails) journal ──▶ Output | None: the "not processed" page with the reason,
                      from the source series' journaled instances only (it runs whatever the job got to)

A new output object is one more ``write_*_step`` returning an :class:`Output`; a new follow-up is a
:class:`FollowUp` (when it is wanted, and its step ``(FollowUpContext, Journal, NodeConfig, ModelRegistry) ->
Output | str``, the str a note of why it wrote nothing) in :data:`FOLLOW_UPS`. Every SeriesDescription and
SeriesNumber comes from :class:`SeriesNaming`.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
from pydicom import dcmread
from pydicom.dataset import Dataset

from inference.agreement import compare
from inference.models import LoadedModel, ModelManifest, ModelRegistry
from inference.pipeline import run_model
from inference.segmentation import segment
from inference.volume import FrameGeometry, LoadedSeries, load_series
from inference.volumetry import (
    QC_FAILED_SUFFIX,
    Norm,
    Volumetry,
    compute_volumetry,
    parse_age,
    required_structures,
    with_qc_flag,
    without_codes,
)

from .assembly import missing_images
from .config import NodeConfig, Rule
from .journal import Claim, FollowUpRecord, FollowUpState, JobRecord, JobState, Journal, OutputFile, SeriesRecord
from .writers import WrittenSeries
from .writers.agreement_sr import write_agreement_sr
from .writers.derived_mr import Derivation, write_derived_mr
from .writers.not_processed import write_not_processed
from .writers.seg import write_seg
from .writers.sr import write_sr
from .writers.summary import write_summary

log = logging.getLogger(__name__)

#: Offsets added to ``source SeriesNumber × 100`` for each kind of output (+ version).
SERIES_NUMBER_OFFSETS = {"sT1": 0, "SEG": 10, "SR": 20, "SUMMARY": 30, "AGREEMENT": 40, "NOT_PROCESSED": 50}
#: The largest value of an IS (Integer String: a signed 32-bit integer).
IS_MAX = 2**31 - 1
#: Source SeriesNumbers are taken modulo this (so ``source × 100 + 59`` stays below :data:`LATER_VERSIONS_BASE`).
SOURCE_NUMBERS = 10_000_000
#: What a source without a SeriesNumber counts as: its outputs come last, far from a scanner's own numbers
UNNUMBERED_SOURCE = SOURCE_NUMBERS - 1
#: Versions 10 and later are numbered in a band of their own, above every number of a first nine versions:
#: ``LATER_VERSIONS_BASE + ((source × kinds + kind) × LATER_VERSIONS_SPAN) + version``, each source (modulo
#: :data:`LATER_SOURCES`) with its own block of versions 10 .. LATER_VERSIONS_SPAN - 1 per kind.
LATER_VERSIONS_BASE = 1_000_000_000
LATER_VERSIONS_SPAN = 1000
LATER_SOURCES = (IS_MAX - LATER_VERSIONS_BASE) // (len(SERIES_NUMBER_OFFSETS) * LATER_VERSIONS_SPAN)

#: A series of fewer slices (frames) is no volume to synthesize or measure from (a localizer, a single slice).
MIN_SLICES = 3

#: The volumes a measuring job keeps for a later agreement check, by output file kind.
T1_VOLUME, LABEL_VOLUME = "T1_VOLUME", "LABEL_VOLUME"
VOLUME_FILES = {T1_VOLUME: "t1.mha", LABEL_VOLUME: "labels.mha"}
#: zlib level of the kept volumes (1: fastest; they are read back only by an agreement check)
KEPT_COMPRESSION_LEVEL = 1


class JobFailed(RuntimeError):
    """A job that cannot succeed; the message is the reason shown by ``status``."""


def output_series_number(source_number: int, kind: str, version: int) -> int:
    """Deterministic, a number of its own for every source, kind and version, always within the IS range.

    Versions 1 to 9 sort after the source: source 1001, sT1 version 1 → 100101, SEG version 2 → 100112.
    Versions 10 and later (999 per kind; then they wrap) take numbers above 10⁹, grouped by source and kind
    (:data:`LATER_VERSIONS_BASE`): every number of a first nine versions of any source below
    :data:`SOURCE_NUMBERS` stays below that band."""
    # a source without a SeriesNumber (0) would give 1, 11, 21...: the numbers of a scanner's first series
    source = source_number % SOURCE_NUMBERS if source_number > 0 else UNNUMBERED_SOURCE
    if version < 10:
        return source * 100 + SERIES_NUMBER_OFFSETS[kind] + max(version, 0)
    block = (source % LATER_SOURCES) * len(SERIES_NUMBER_OFFSETS) + list(SERIES_NUMBER_OFFSETS).index(kind)
    later = 10 + (version - 10) % (LATER_VERSIONS_SPAN - 10)
    return LATER_VERSIONS_BASE + block * LATER_VERSIONS_SPAN + later


def output_description(rule: Rule, version: int, kind: str = "sT1") -> str:
    """``sT1AAH``, ``sT1AAH SEG``; a re-run adds its version: ``sT1AAH v2``, ``sT1AAH SEG v2``."""
    return SeriesNaming(rule.output_name, version, 0).description(kind)


#: What follows the output name in the SeriesDescription of each kind of output (``sT1AAH SEG``).
DESCRIPTION_SUFFIXES = {"sT1": "", "SEG": " SEG", "SR": " volumes", "SUMMARY": " summary",
                        "NOT_PROCESSED": " NOT PROCESSED"}


AGREEMENT_SUFFIX = " vs rT1 agreement"
#: SeriesDescription is LO: 64 characters at most.
DESCRIPTION_MAX = 64


def _fitted(name: str, tail: str) -> str:
    """``name`` shortened so that ``tail`` still fits after it in a SeriesDescription."""
    return name[:DESCRIPTION_MAX - len(tail)]


@dataclass(frozen=True)
class SeriesNaming:
    """How a job names and numbers the series it writes: the one owner of SeriesDescription (with its QC flag)
    and SeriesNumber; writers write what they are given."""

    output_name: str        # the rule's: sT1AAH, rT1
    version: int            # of the source series (1, 2, ... for each time it was processed)
    source_number: int      # SeriesNumber of the source series

    def description(self, kind: str = "sT1", volumetry: Volumetry | None = None) -> str:
        """The SeriesDescription of the ``kind`` output: ``sT1AAH SEG v2``; flagged `` QC FAILED`` when it shows
        a ``volumetry`` whose quality control failed (SEG, SR and summary alike). A long output name is shortened
        so that what follows it (the kind, the version, the flag) fits the 64 characters of LO."""
        tail = DESCRIPTION_SUFFIXES[kind] + ("" if self.version <= 1 else f" v{self.version}")
        flagged = volumetry is not None and not volumetry.qc_passed
        text = _fitted(self.output_name, tail + (QC_FAILED_SUFFIX if flagged else "")) + tail
        return text if volumetry is None else with_qc_flag(text, volumetry)

    @staticmethod
    def agreement_description(synthetic_output_name: str, qc_failed: bool = False) -> str:
        """The agreement SR's: named after the synthetic T1 it compares with the real one; flagged `` QC FAILED``
        when the volumetry of either side failed its quality control (its labels are compared)."""
        tail = AGREEMENT_SUFFIX + (QC_FAILED_SUFFIX if qc_failed else "")
        return _fitted(synthetic_output_name, tail) + tail

    def number(self, kind: str) -> int:
        return output_series_number(self.source_number, kind, self.version)


@dataclass(frozen=True)
class Algorithm:
    """Who made an object: named in its SoftwareVersions and in the SEG's and SR's algorithm identification."""

    name: str
    version: str

    @classmethod
    def of(cls, manifest: ModelManifest) -> Algorithm:
        return cls(manifest.id, manifest.version)

    def as_kwargs(self) -> dict[str, str]:
        return {"algorithm_name": self.name, "algorithm_version": self.version}


@dataclass(frozen=True)
class JobContext:
    """What every step of one job knows."""

    job_id: int
    rule: Rule
    series: SeriesRecord
    naming: SeriesNaming
    out_dir: Path
    uid_prefix: str | None


@dataclass(frozen=True)
class Images:
    """The T1 to measure: the synthetic sT1 of a synthesis rule, or the real T1 itself."""

    t1: sitk.Image
    labels: sitk.Image | None               # a model's own labels on t1's grid (without a segmenter)
    synthesis: ModelManifest | None         # the synthesis model of a synthesize rule
    own_labels_of: ModelManifest | None     # whose own labels are used (no segmenter, or measures_synthetic)


@dataclass(frozen=True)
class Measured:
    """The labels of the T1 and what was measured on them; ``volumetry`` None when nothing was."""

    volumetry: Volumetry | None
    labels: sitk.Image | None
    algorithm: Algorithm | None             # who drew the labels (named in the SEG and SR)


@dataclass(frozen=True)
class Output:
    """One series a step wrote, with its kind (sT1, SEG, SR, SUMMARY, AGREEMENT)."""

    kind: str
    written: WrittenSeries

    def files(self) -> list[OutputFile]:
        uid = self.written.series_instance_uid
        return [OutputFile(self.kind, str(f.path), uid, f.sop_class_uid, f.sop_instance_uid)
                for f in self.written.files]


@dataclass(frozen=True)
class MeasuredT1:
    """The T1 series the SEG, SR and summary reference, with the geometry of its frames (data set, then frame
    order) computed once: where the received T1 was loaded, or from the grid the sT1 was written from."""

    datasets: Sequence[Dataset]
    frames: Sequence[FrameGeometry] | None


def grid_frames(image: sitk.Image) -> list[FrameGeometry]:
    """The frame geometry of a series written one slice k of ``image`` a file (``write_derived_mr``: IPP = the
    physical point of (0, 0, k), IOP = the first two direction columns), file k holding slice k."""
    size, spacing = image.GetSize(), image.GetSpacing()
    direction = image.GetDirection()
    orientation = (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
    return [FrameGeometry(dataset_index=k, frame_index=0, position=image.TransformIndexToPhysicalPoint((0, 0, k)),
                          orientation=orientation, pixel_spacing=(spacing[1], spacing[0]), slice_thickness=spacing[2],
                          rows=size[1], columns=size[0], rescale_slope=1.0, rescale_intercept=0.0)
            for k in range(size[2])]


def measured_t1(synthetic: Output | None, images: Images, loaded: LoadedSeries) -> MeasuredT1:
    """What the SEG, SR and summary reference: the sT1 just written, or the received T1."""
    if synthetic is not None:
        return MeasuredT1(list(synthetic.written.datasets), grid_frames(images.t1))
    return MeasuredT1(loaded.datasets, loaded.source_frames())


def age_from_dates(ds: Dataset) -> float | None:
    """Age in years from PatientBirthDate and the study (or series, acquisition) date, when PatientAge is absent."""
    birth = str(ds.get("PatientBirthDate") or "")
    when = str(ds.get("StudyDate") or ds.get("SeriesDate") or ds.get("AcquisitionDate") or "")
    try:
        born, seen = (datetime.datetime.strptime(v[:8], "%Y%m%d").date() for v in (birth, when))
    except ValueError:
        return None
    return (seen - born).days / 365.25 if seen >= born else None


def subject_age(ds: Dataset) -> float | None:
    """The subject's age in years for the volumetry (its ICV range and normative band): PatientAge when it reads as
    a DICOM age string ('053Y', '006M'), else from PatientBirthDate and the study date (:func:`age_from_dates`).
    "000Y", which some scanners and anonymisers write for an unknown age, counts as unknown, as does a PatientAge
    that does not parse ('45', '3 years'): judging an adult as a newborn fails every ICV check."""
    given = str(ds.get("PatientAge") or "").strip().upper()
    age = parse_age(given) if given else None
    if age is not None and not (age == 0 and given.endswith("Y")):
        return age
    return age_from_dates(ds)


def model_session(registry: ModelRegistry, model_id: str | None) -> LoadedModel:
    """The warm session of a model, or :class:`JobFailed` saying why there is none."""
    if not model_id:
        raise JobFailed("not processed: the rule names no model")
    try:
        return registry.session(model_id)
    except KeyError:
        raise JobFailed(f"not processed: model {model_id!r} not installed") from None


# -- core steps --------------------------------------------------------------------------------

def load_step(journal: Journal, series: SeriesRecord) -> LoadedSeries:
    """The series' spooled instances as one volume in patient geometry, with their headers; :class:`JobFailed`
    for a stack of fewer than :data:`MIN_SLICES` slices (a localizer, a single slice: not a volume), and for a
    series its scanner says has more images than arrived (closed on the idle timeout: the rest never came)."""
    instances = journal.instances(series.series_uid)
    missing = missing_images(instances)
    if missing is not None:
        raise JobFailed(f"not processed: incomplete series, {missing}; the rest never arrived")
    loaded = load_series([Path(i.path) for i in instances])
    n_slices = loaded.image.GetSize()[2]
    if n_slices < MIN_SLICES:
        raise JobFailed(f"not processed: too few slices ({n_slices}; a volume needs at least {MIN_SLICES})")
    return loaded


def own_labels_measure(config: NodeConfig, manifest: ModelManifest, action: str) -> bool:
    """Whether a model's own segmentation output measures the T1 of a rule with ``action``: without a segmenter,
    or for an sT1 when its manifest says its labels measure it better (``measures_synthetic``, measured on real
    T1s)."""
    seg_spec = manifest.output.segmentation
    return not config.inference.segmenter or (action == "synthesize" and seg_spec is not None
                                              and seg_spec.measures_synthetic)


def synthesize_step(config: NodeConfig, registry: ModelRegistry, rule: Rule, loaded: LoadedSeries,
                    timings: dict[str, float]) -> Images:
    """The T1 to measure: the synthetic sT1 of a synthesis rule, or the real T1 itself. Labels come with it
    from a model's own segmentation output when no segmenter is configured, or for an sT1 when the model's manifest
    says its labels measure it better (``measures_synthetic``, measured on real T1s)."""
    segmenter = config.inference.segmenter
    if rule.action == "volumetry" and segmenter:
        return Images(t1=loaded.image, labels=None, synthesis=None, own_labels_of=None)
    model = model_session(registry, rule.model)
    mirror = config.inference.mirror_average and rule.action == "synthesize" and bool(segmenter)
    result = run_model(model, loaded.image, mirror_average=mirror)
    timings.update({f"model.{k}": v for k, v in result.timings.items()})
    own = model.manifest if own_labels_measure(config, model.manifest, rule.action) else None
    if rule.action == "synthesize":
        if result.t1 is None:
            raise JobFailed(f"model {rule.model!r} produced no image")
        return Images(t1=result.t1, labels=result.labels, synthesis=model.manifest, own_labels_of=own)
    if result.labels is None:  # volumetry of the real T1 by the rule's model, on the T1's own grid
        raise JobFailed(f"model {rule.model!r} has no segmentation output: no volumetry")
    labels = sitk.Resample(result.labels, loaded.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                           result.labels.GetPixelID())
    return Images(t1=loaded.image, labels=labels, synthesis=None, own_labels_of=own)


def measure_step(ctx: JobContext, config: NodeConfig, registry: ModelRegistry, loaded: LoadedSeries,
                 images: Images, timings: dict[str, float], norms: Sequence[Norm] = ()) -> Measured:
    """Segment the T1 with the segmenter (or take the model's own labels) and measure it (with z-scores
    from ``norms``, the site's normative table)."""
    if not ctx.rule.volumetry:
        return Measured(None, None, None)
    icv_ml = outside_ml = None
    if images.own_labels_of is not None:
        labels, manifest = images.labels, images.own_labels_of
    else:
        segmenter = model_session(registry, config.inference.segmenter)
        result = segment(segmenter, images.t1)
        timings.update({f"segment.{k}": v for k, v in result.timings.items()})
        labels, manifest = result.labels, segmenter.manifest
        icv_ml, outside_ml = result.icv_ml, result.outside_ml
    if labels is None:
        return Measured(None, None, Algorithm.of(manifest))
    assert manifest.output.segmentation is not None
    t0 = time.perf_counter()
    first = loaded.datasets[0]
    icv_only = manifest.output.segmentation.icv_only
    volumetry = compute_volumetry(labels, images.t1, age=subject_age(first),
                                  sex=first.get("PatientSex"),
                                  expected_codes=required_structures(manifest.output.segmentation),
                                  icv_ml=icv_ml, outside_ml=outside_ml, norms=norms, icv_only=icv_only)
    if icv_only:  # nor in the SEG, nor in the labels kept for the agreement: only in the ICV
        labels = without_codes(labels, icv_only)
    timings["volumetry"] = time.perf_counter() - t0
    if not volumetry.qc_passed:
        failed = "; ".join(c.reason for c in volumetry.qc if c.passed is False)
        log.warning("job %d: volumetry quality control FAILED: %s", ctx.job_id, failed)
    return Measured(volumetry, labels, Algorithm.of(manifest))


def write_t1_step(ctx: JobContext, images: Images, loaded: LoadedSeries) -> Output | None:
    """The synthetic T1 as an MR series in the source's study (synthesis rules only)."""
    manifest = images.synthesis
    if ctx.rule.action != "synthesize" or manifest is None:
        return None
    derivation = Derivation(
        model_id=manifest.id, model_version=manifest.version,
        description=(f"Synthetic MPRAGE-like T1 from {ctx.series.description!r} "
                     f"by model {manifest.id} {manifest.version}"),
    )
    written = write_derived_mr(images.t1, loaded.datasets, out_dir=ctx.out_dir / "sT1",
                               series_description=ctx.naming.description(), series_number=ctx.naming.number("sT1"),
                               derivation=derivation, uid_prefix=ctx.uid_prefix)
    return Output("sT1", written)


def write_seg_step(ctx: JobContext, measured: Measured, t1: MeasuredT1) -> Output | None:
    """The labels as a SEG of the measured T1 (whose frame geometry is known already); None when the segmenter
    found no structure."""
    volumetry, algorithm = measured.volumetry, measured.algorithm
    assert volumetry is not None and measured.labels is not None and algorithm is not None
    if not volumetry.structures:
        log.warning("segmenter %s found no brain structure: no SEG, the SR and summary say QC failed",
                    algorithm.name)
        return None
    written = write_seg(measured.labels, t1.datasets, out_path=ctx.out_dir / "seg.dcm", uid_prefix=ctx.uid_prefix,
                        series_number=ctx.naming.number("SEG"),
                        series_description=ctx.naming.description("SEG", volumetry),
                        source_frames=t1.frames, **algorithm.as_kwargs())
    return Output("SEG", written)


def write_sr_step(ctx: JobContext, measured: Measured, t1: MeasuredT1, seg: Output | None,
                  loaded: LoadedSeries) -> Output:
    """The volumetry as a TID 1500 SR referencing the SEG's segments."""
    assert measured.volumetry is not None and measured.algorithm is not None
    written = write_sr(measured.volumetry, seg=None if seg is None else seg.written, source_images=t1.datasets,
                       input_series_datasets=loaded.datasets, out_path=ctx.out_dir / "sr.dcm",
                       uid_prefix=ctx.uid_prefix, series_number=ctx.naming.number("SR"),
                       series_description=ctx.naming.description("SR", measured.volumetry),
                       **measured.algorithm.as_kwargs())
    return Output("SR", written)


def write_summary_step(ctx: JobContext, measured: Measured, images: Images, t1: MeasuredT1) -> Output:
    """The summary page (coronal views, volume table, QC) as a Secondary Capture."""
    assert measured.volumetry is not None and measured.labels is not None and measured.algorithm is not None
    written = write_summary(measured.volumetry, t1=images.t1, labels=measured.labels, source_images=t1.datasets,
                            out_path=ctx.out_dir / "summary.dcm", uid_prefix=ctx.uid_prefix,
                            synthetic=ctx.rule.action == "synthesize", series_number=ctx.naming.number("SUMMARY"),
                            series_description=ctx.naming.description("SUMMARY", measured.volumetry),
                            **measured.algorithm.as_kwargs())
    return Output("SUMMARY", written)


def keep_volumes_step(ctx: JobContext, images: Images, measured: Measured) -> list[OutputFile]:
    """Keep the measured T1 and its labels for an agreement check with a counterpart (rT1 vs sT1) of the
    same study; nothing when no structure was measured."""
    if measured.volumetry is None or not measured.volumetry.structures or measured.labels is None:
        return []
    kept = []
    for kind, image in ((T1_VOLUME, images.t1), (LABEL_VOLUME, measured.labels)):
        path = ctx.out_dir / VOLUME_FILES[kind]
        # zlib level 1: the float T1 in a third of the time of the default level, 18 % larger (0.35 s, 26 MB for
        # a 260² x 205 sT1, against 0.95 s, 22 MB); the labels compress well at any level
        sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=KEPT_COMPRESSION_LEVEL)
        kept.append(OutputFile(kind, str(path)))
    return kept


def outbox_items(outputs: Sequence[Output], destinations: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """One outbox row ``(destination, path, SOP Class UID, SOP Instance UID)`` per file and destination."""
    return [(dest, str(f.path), f.sop_class_uid, f.sop_instance_uid)
            for dest in destinations for output in outputs for f in output.written.files]


def record_and_queue(journal: Journal, ctx: JobContext, outputs: Sequence[Output], kept: Sequence[OutputFile],
                     destinations: Sequence[str], follow_ups: Sequence[FollowUp] = (), *,
                     claim: Claim | None = None) -> list[int]:
    """Record the job's outputs, queue them per destination and queue the follow-ups that want them, in one
    transaction (the job is then ``written``, or ``sent`` when there is no destination), while this run holds
    the job's ``claim`` (else ``ClaimLost``, nothing recorded); returns the ids of the follow-ups queued."""
    produced = [(o.written.series_instance_uid, o.kind) for o in outputs]
    files = [f for o in outputs for f in o.files()] + list(kept)
    wanted = [f.name for f in follow_ups if f.wanted(files)]
    journal.record_outputs(ctx.job_id, produced, outbox_items(outputs, destinations), files=files,
                           output_name=ctx.rule.output_name, follow_ups=wanted, claim=claim)
    return [f.id for f in journal.follow_ups(ctx.job_id) if f.state == FollowUpState.QUEUED]


# -- follow-ups: optional steps, each its own work, inputs from the journal -------------------

@dataclass(frozen=True)
class FollowUpContext:
    """What a follow-up knows: the job whose core outputs are recorded, as the journal has it (its rule may be
    gone from the config since), and where it writes."""

    follow_up_id: int
    step: str
    job: JobRecord
    series: SeriesRecord
    naming: SeriesNaming
    out_dir: Path
    uid_prefix: str | None


#: A follow-up's step: what it wrote, or (a note) why it wrote nothing.
FollowUpStep = Callable[[FollowUpContext, Journal, NodeConfig, ModelRegistry], "Output | str"]


@dataclass(frozen=True)
class FollowUp:
    """An optional step run on its own after a job recorded its core outputs: queued when ``wanted`` by the files
    the job recorded, its failure costs only its own output; ``models``: the models (ids) whose manifests a run for
    a job needs, from the journal (a worker without one leaves it to a worker that has it)."""

    name: str
    wanted: Callable[[Sequence[OutputFile]], bool]
    step: FollowUpStep
    models: Callable[[Journal, JobRecord], frozenset[str]]


# -- follow-up: agreement of an sT1 with the real T1 of the same study -------------------------

@dataclass(frozen=True)
class AgreementSide:
    """One of the two T1s compared, as the journal recorded it."""

    job: JobRecord
    t1_volume: Path
    label_volume: Path
    seg: Path
    t1_images: list[Path]       # the real T1's received instances, or the sT1's written files


def agreement_side(journal: Journal, job: JobRecord) -> AgreementSide | None:
    """What ``job`` recorded for an agreement check, or None when it kept no volumes or wrote no SEG."""
    files = {}
    for f in journal.output_files(job.id):
        files.setdefault(f.kind, []).append(Path(f.path))
    if not all(kind in files for kind in (T1_VOLUME, LABEL_VOLUME, "SEG")):
        return None
    if job.action == "synthesize":
        images = sorted(files.get("sT1", []))
    else:
        images = [Path(i.path) for i in journal.instances(job.series_uid)]
    return AgreementSide(job, files[T1_VOLUME][0], files[LABEL_VOLUME][0], files["SEG"][0], images)


def counterpart_side(journal: Journal, job: JobRecord, study_uid: str) -> AgreementSide | None:
    """The latest other side of ``job`` in the study (a real T1 for an sT1, or an sT1 for a real T1)
    that recorded what an agreement check needs."""
    other_action = "volumetry" if job.action == "synthesize" else "synthesize"
    for other in reversed(journal.jobs_in_study(study_uid)):
        if (other.id != job.id and other.action == other_action and not other.purged_at  # files deleted
                and other.state in (JobState.WRITTEN, JobState.SENT)):
            side = agreement_side(journal, other)
            if side is not None:
                return side
    return None


def synthetic_output_name(config: NodeConfig, job: JobRecord) -> str:
    """The output name the synthesis job wrote under (from the journal; its rule may be gone since)."""
    if job.output_name:
        return job.output_name
    return next((r.output_name for r in config.rules if r.name == job.rule), "sT1")


def keeps_volumes(files: Sequence[OutputFile]) -> bool:
    """Whether a job recorded what an agreement check needs (its T1 and labels volumes and a SEG)."""
    kinds = {f.kind for f in files}
    return {T1_VOLUME, LABEL_VOLUME, "SEG"} <= kinds


def later_check(journal: Journal, ctx: FollowUpContext, other: JobRecord) -> int | None:
    """The agreement follow-up of ``other`` when it was queued after this one (it compares the pair: each
    pair is compared once, by the follow-up of the job that recorded its outputs last), else None."""
    theirs = [f.id for f in journal.follow_ups(other.id) if f.step == ctx.step and f.id > ctx.follow_up_id]
    return theirs[0] if theirs else None


def agreement_models(journal: Journal, job: JobRecord) -> frozenset[str]:
    """The model whose manifest an agreement check of ``job`` reads: the synthesis model of the sT1 compared (this
    job's, or the study's sT1 a real T1 is compared with); none while the study holds nothing to compare with."""
    series = journal.series(job.series_uid)
    other = None if series is None else counterpart_side(journal, job, series.study_uid)
    if other is None:
        return frozenset()
    synthetic = job if job.action == "synthesize" else other.job
    return frozenset([synthetic.model]) if synthetic.model else frozenset()


def follow_up_models(journal: Journal, record: FollowUpRecord) -> frozenset[str]:
    """The models a queued follow-up needs of the worker that runs it (none for a step no longer known: it fails
    with that wherever it runs)."""
    follow_up = next((f for f in FOLLOW_UPS if f.name == record.step), None)
    return frozenset() if follow_up is None else follow_up.models(journal, journal.job(record.job_id))


def agreement_step(ctx: FollowUpContext, journal: Journal, config: NodeConfig,
                   registry: ModelRegistry) -> Output | str:
    """When the study also holds the other side, compare the two T1s and write an agreement SR; otherwise why
    not. Every input comes from the journal's record of the two jobs."""
    job = ctx.job
    mine = agreement_side(journal, job)
    other = None if mine is None else counterpart_side(journal, job, ctx.series.study_uid)
    if mine is None or other is None:
        return "no other T1 of the study (real or synthetic) to compare with yet"
    later = later_check(journal, ctx, other.job)
    if later is not None:
        return f"compared with job {other.job.id} by that job's follow-up ({later})"
    real, synthetic = (other, mine) if job.action == "synthesize" else (mine, other)
    manifest = model_session(registry, synthetic.job.model).manifest
    seg_spec = manifest.output.segmentation
    # the sT1 measured by its model's own labels: what that model never labels is left out
    own = seg_spec is not None and own_labels_measure(config, manifest, "synthesize")
    agreement = compare(*(sitk.ReadImage(str(p)) for p in (real.t1_volume, real.label_volume,
                                                           synthetic.t1_volume, synthetic.label_volume)),
                        synthetic_unlabelled=seg_spec.unlabelled if own and seg_spec is not None else ())
    output_name = synthetic_output_name(config, synthetic.job)
    log.info("job %d: agreement of %s with the real T1: PSNR %.1f dB, SSIM %.3f, mean Dice %.3f, "
             "mean ASPC %.1f %%", job.id, output_name, agreement.psnr, agreement.ssim,
             agreement.mean_dice, agreement.mean_aspc)
    segs = [dcmread(p, stop_before_pixels=True) for p in (real.seg, synthetic.seg)]
    # a SEG is flagged when its volumetry failed QC (SeriesNaming.description): the labels compared are its
    qc_failed = any(str(ds.get("SeriesDescription", "")).endswith(QC_FAILED_SUFFIX) for ds in segs)
    written = write_agreement_sr(
        agreement, real_t1_images=[dcmread(p, stop_before_pixels=True) for p in real.t1_images],
        synthetic_t1_images=[dcmread(p, stop_before_pixels=True) for p in synthetic.t1_images],
        real_seg=segs[0], synthetic_seg=segs[1],
        out_path=ctx.out_dir / "agreement.dcm", uid_prefix=ctx.uid_prefix,
        series_number=ctx.naming.number("AGREEMENT"),
        series_description=SeriesNaming.agreement_description(output_name, qc_failed),
        **Algorithm.of(manifest).as_kwargs(),
    )
    return Output("AGREEMENT", written)


#: The follow-ups, in the order they are queued.
FOLLOW_UPS = (FollowUp("agreement", keeps_volumes, agreement_step, agreement_models),)


# -- when a job fails: the "not processed" notice ----------------------------------------------

def _expected_result(rule: Rule) -> str:
    """What the reader waited for, in words: ``sT1AAH (synthetic T1 by model synth-t1, with volumetry)``."""
    if rule.action == "synthesize":
        volumetry = ", with volumetry" if rule.volumetry else ""
        return f"{rule.output_name} (synthetic T1 by model {rule.model}{volumetry}; rule {rule.name})"
    return f"{rule.output_name} volumetry (SEG, volumes, summary page; rule {rule.name})"


def not_processed_step(journal: Journal, job: JobRecord, series: SeriesRecord, rule: Rule, reason: str,
                       out_dir: Path, uid_prefix: str | None) -> Output | None:
    """The "not processed" page of a failed job, in the source series' study, named after the rule's output
    (``sT1AAH NOT PROCESSED``, ``... v2`` for a later version); None when no source header can be read (the
    series' files are gone)."""
    instances = journal.instances(series.series_uid)
    source = None
    for instance in instances:
        try:
            source = dcmread(instance.path, stop_before_pixels=True)
            break
        except Exception as exc:  # noqa: BLE001 - try the next file; the failure itself is recorded already
            log.debug("job %d: %s not readable for the notice: %s", job.id, instance.path, exc)
    if source is None:
        log.warning("job %d: no 'not processed' notice: no file of series %s can be read", job.id, series.series_uid)
        return None
    naming = SeriesNaming(rule.output_name, job.version, series.attributes.series_number)
    written = write_not_processed(
        reason.removeprefix("not processed: "), source=source,
        source_instances=[(i.sop_class_uid, i.sop_instance_uid) for i in instances],
        out_path=out_dir / "not_processed.dcm", series_number=naming.number("NOT_PROCESSED"),
        series_description=naming.description("NOT_PROCESSED"), uid_prefix=uid_prefix,
        what=_expected_result(rule), job_id=job.id,
    )
    return Output("NOT_PROCESSED", written)
