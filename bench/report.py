"""docs/benchmarks.md from the measurements: machine, then P1-P5 with their goals."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import UTC, datetime

from .ingest import ConcurrencyResult, IngestResult
from .memory import Memory
from .throughput import Throughput
from .turnaround import AFTER_JOB, Turnaround

INGEST_GOAL = 1.0        # node images/s ≥ Orthanc's in the same run
INGEST_MOONSHOT = 0.8    # node images/s ≥ 0.8 × storescp
TURNAROUND_GOAL_S = 30.0
#: P2 stage targets (issue 15): loading the series, writing the volumetry objects, sending ~200 objects.
STAGE_TARGETS_S = {"load": 0.5, "write.volumetry": 1.5, AFTER_JOB: 2.0}
MEMORY_GOAL_KB = 3e9 / 1024  # 3 GB = 3·10⁹ bytes (2.79 GiB), the stricter reading
#: P2 time outside model.inference when issue 15 was filed (docs/benchmarks.md of 2026-12-01: 27.6 s total,
#: 7.7 s inference); the issue asks for half of it.
NON_INFERENCE_BASELINE_S = 27.6 - 7.7


def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """``median (min–max)``."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def _verdict(met: bool, detail: str) -> str:
    return f"**{'met' if met else 'NOT met'}** ({detail})"


def render(*, machine: dict[str, str], load: list[str], command: str, quick: bool, inputs: dict[str, str],
           model: str, ingest: IngestResult | None, turnaround: list[Turnaround] | None,
           memory: Memory | None, concurrency: ConcurrencyResult | None, notes: Sequence[str] = (),
           ingest_concurrent: IngestResult | None = None, throughput: list[Throughput] | None = None,
           ingest_per_image: IngestResult | None = None) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = ["# Benchmarks", "",
           f"Measured {now} with `{command}`{' (quick mode: fewer runs, smaller inputs)' if quick else ''}. "
           "Regenerate with `python -m bench.run` (see bench/README.md). Values are medians with min–max "
           "over the runs in brackets.", ""]
    out += ["## Machine", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in machine.items()]
    out.append("")
    if load:
        out += ["**Other load during the run**: a model training process shared the CPU, so the numbers below "
                "are pessimistic:", ""] + [f"- `{line}`" for line in load] + [""]
    out += ["Inputs:", ""] + [f"- {k}: {v}" for k, v in inputs.items()] + [f"- model for P2/P3: {model}", ""]

    if ingest is not None:
        out += _ingest_section(ingest, ingest_concurrent, ingest_per_image)

    if turnaround:
        totals = [t.seconds for t in turnaround]
        med = statistics.median(totals)
        out += ["## P2 turnaround", "",
                "From the last scout instance received (journal) to the last derived object acknowledged by "
                f"Orthanc (job settled as sent); default rules, {len(turnaround)} run(s), fresh node and Orthanc "
                f"each. Derived objects per run: {turnaround[0].outputs} (Orthanc held "
                f"{turnaround[0].orthanc_instances}).", "",
                "| stage | seconds | target |", "|---|---|---|"]
        stages = list(dict.fromkeys(k for t in turnaround for k in t.stages))
        for stage in stages:
            values = [t.stages[stage] for t in turnaround if stage in t.stages]
            target = STAGE_TARGETS_S.get(stage)
            met = target is not None and statistics.median(values) <= target
            verdict = "" if target is None else f"≤ {target} s: {'met' if met else 'NOT met'}"
            out.append(f"| {stage} | {spread(values, '{:.2f}')} | {verdict} |")
        floors = [t.storescu_send for t in turnaround]
        sends = [t.stages[AFTER_JOB] for t in turnaround if AFTER_JOB in t.stages]
        associations = turnaround[0].associations
        out += [f"| **total** | **{spread(totals, '{:.1f}')}** | |",
                f"| reference: the same objects sent by dcmtk storescu, one association | {spread(floors, '{:.2f}')} "
                "| |", "",
                "assemble = association released → completeness → routing → job queued; model.* and write* are "
                "the job runner's own timings; queue+send = job written → every outbox item acknowledged, over "
                f"{associations} association(s) (`[[destinations]] max_associations = {associations}`). The reference "
                "is measured in the same run against another fresh Orthanc: what this PACS takes to file the objects "
                "from the fastest sender at hand.", "",
                f"queue+send / storescu reference: {statistics.median(sends) / statistics.median(floors):.2f}", "",
                f"Goal ≤ {TURNAROUND_GOAL_S:.0f} s on 2 cores: "
                f"{_verdict(med <= TURNAROUND_GOAL_S, f'{med:.1f} s')}.", ""]
        outside = [t.seconds - t.stages.get("model.inference", 0.0) for t in turnaround]
        half = NON_INFERENCE_BASELINE_S / 2
        out += [f"Goal: time outside `model.inference` at most half of the {NON_INFERENCE_BASELINE_S:.1f} s measured "
                f"when issue 15 was filed (≤ {half:.1f} s): "
                f"{_verdict(statistics.median(outside) <= half, spread(outside, '{:.1f}') + ' s')}.", ""]

    if memory is not None:
        out += ["## P3 memory", "",
                f"Peak resident set (VmHWM of the node process) around one job on a {memory.size}³ 1 mm series "
                f"({memory.outputs} output slices, job {memory.job_seconds:.1f} s).", "",
                "| moment | VmHWM |", "|---|---|",
                f"| started, model warm | {memory.idle_kb / 1024:.0f} MiB |",
                f"| {memory.size} slices received | {memory.after_receive_kb / 1024:.0f} MiB |",
                f"| job written | {memory.peak_kb / 1024:.0f} MiB |", "",
                f"Goal ≤ 3 GB: {_verdict(memory.peak_kb <= MEMORY_GOAL_KB, f'{memory.peak_kb * 1024 / 1e9:.2f} GB')}.",
                ""]

    if concurrency is not None:
        c = concurrency
        rate = c.expected / c.seconds
        detail = (f"{c.journal_instances} of {c.expected} instances in the journal, {c.rejected} rejected "
                  f"association(s), {c.failed_senders} failed sender(s)")
        out += ["## P4 concurrency", "",
                f"{c.senders} `/usr/bin/storescu` processes started at once, {c.images_each} images each "
                f"(one series per sender), to one node: {c.seconds:.2f} s until the last finished, "
                f"{rate:.0f} images/s in total.", "",
                f"Goal (no rejected association, nothing lost): {_verdict(c.ok, detail)}.", ""]
    if throughput:
        out += _throughput_section(throughput)
    notes = list(notes)
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def _ingest_table(result: IngestResult) -> list[str]:
    rates = {t: result.rates(t) for t in result.targets}
    out = ["| receiver | seconds | images/s | receiver CPU ms/image | machine CPU ms/image |", "|---|---|---|---|---|"]
    out += [f"| {t} | {spread(result.seconds[t], '{:.2f}')} | {spread(rates[t], '{:.0f}')} | "
            f"{spread(result.cpu_ms(t), '{:.2f}')} | {spread(result.machine_ms(t), '{:.2f}')} |"
            for t in result.targets]
    node = rates["node"]
    lines = []
    for other, what in (("orthanc", "Orthanc"), ("orthanc-sync", "Orthanc with SyncStorageArea"),
                        ("storescp", "storescp"), ("pynetdicom-bare", "pynetdicom storing nothing"),
                        ("node-synced-in-place", "node synced in place")):
        if other not in rates:
            continue
        per_run = [n / o for n, o in zip(node, rates[other], strict=True)]
        lines.append(f"node / {what}: {statistics.median(node) / statistics.median(rates[other]):.2f} "
                     f"(per run {spread(per_run, '{:.2f}')})")
    for target, what in (("pynetdicom-bare", "pynetdicom storing nothing"),
                         ("node-process-each", "node, a receiver process per sender"),
                         ("pynetdicom-bare-process-each", "pynetdicom storing nothing, a process per sender")):
        if target in rates:
            rate = statistics.median(rates[target])
            lines.append(f"{what} / Orthanc: {rate / statistics.median(rates['orthanc']):.2f}, "
                         f"/ Orthanc with SyncStorageArea: {rate / statistics.median(rates['orthanc-sync']):.2f}")
    cpu = {t: statistics.median(result.cpu_ms(t)) for t in result.targets}
    lines.append("receiver CPU per image: node / Orthanc as it ships "
                 f"{cpu['node'] / cpu['orthanc-sync']:.2f}, pynetdicom storing nothing / Orthanc as it ships "
                 f"{cpu['pynetdicom-bare'] / cpu['orthanc-sync']:.2f}")
    return out + [""] + [f"- {line}" for line in lines] + [""]


def _ingest_section(single: IngestResult, concurrent: IngestResult | None,
                    per_image: IngestResult | None = None) -> list[str]:
    runs = len(single.seconds["node"])
    out = ["## P1 ingest", "",
           "Single-frame MR images (256 × 256, 16 bit, Explicit VR LE) sent by `/usr/bin/storescu` (TCP_NODELAY=1), "
           "one association per sender; wall time until the last storescu ended; "
           f"{runs} interleaved runs, every receiver fresh and empty each run. The node runs as shipped: "
           "`fsync = true`, each object durable before its success response by one synchronous append to the "
           "receipt log, written while the object is parsed (its spool file and journal row synced in batches "
           "later). `orthanc-sync` is Orthanc as it ships (SyncStorageArea true: each file fsync'd), `orthanc` "
           "without it (as the end-to-end tests run it); storescp does not fsync. References: `node-no-fsync` "
           "(`fsync = false`, not for production) separates the cost of durability, `node-synced-in-place` "
           "(`receipt_log = false`) syncs the spool file, its directory and the journal row one after the other "
           "before each response, and `pynetdicom-bare` (bench/bare_scp.py: a pynetdicom 3 SCP that answers "
           "Success and keeps nothing, its associations run as the node runs them: the reactor waits for work "
           "instead of polling) is the ceiling of the DICOM library the node is built on. Target order is "
           "shuffled in each run. CPU per image: `receiver` is the user and system CPU of the receiving "
           "processes (every thread) while the senders ran and, for the node, until it had settled what it "
           "received (spool files and journal synced, receipt segments deleted), `machine` the CPU time of the "
           "whole machine meanwhile (user, system and interrupts, not steal: senders, receivers and the kernel's "
           "own threads, such as the file system journal's that complete an fsync). With more senders than cores "
           "the CPU is what bounds images/s.", ""]
    out += [f"### One sender, {single.images} images", ""] + _ingest_table(single)
    goal_rates = [("one sender", single)]
    if concurrent is not None:
        out += [f"### {concurrent.senders} senders at once, {concurrent.images // concurrent.senders} images each",
                "",
                "Two more references here: `node-process-each` is a `serve --role receiver` process per sender, "
                "each on a port of its own (one data directory, fsync on), sender i sending to process i: the even "
                "spread that no shared listener gives (`node-2-receivers` shares one port with `SO_REUSEPORT`, "
                "which spreads connections by a hash), so the best any layout of receiver processes could do; "
                "`pynetdicom-bare-process-each` is as many bare pynetdicom SCPs spread the same way.",
                ""] + _ingest_table(concurrent)
        goal_rates.append((f"{concurrent.senders} senders", concurrent))
    if per_image is not None:
        out += [f"### One association per image, {per_image.images} images", "",
                "The same images from one sender that opens an association for each (a pynetdicom SCU with "
                "TCP_NODELAY, as the node's dispatcher runs it: storescu has no such mode), as some modalities "
                "and forwarders do: what an association costs each receiver.", ""] + _ingest_table(per_image)
        goal_rates.append(("one association per image", per_image))
    for label, result in goal_rates:
        synced, ratio, scp = (_goal(result, other, goal) for other, goal in
                              (("orthanc-sync", INGEST_GOAL), ("orthanc", INGEST_GOAL), ("storescp", INGEST_MOONSHOT)))
        out.append(f"Goal node / Orthanc ≥ {INGEST_GOAL} ({label}), both durable (Orthanc as it ships, "
                   f"SyncStorageArea): {synced}; against Orthanc not syncing its files: {ratio}; moonshot ≥ "
                   f"{INGEST_MOONSHOT} × storescp: {scp}.")
        out.append("")
    out.append("A goal reads met only when both the ratio of the medians and the median of the per-run ratios "
               "reach it, and \"within noise\" when the per-run ratios fall on both sides of it.")
    out.append("")
    return out


def _goal(result: IngestResult, other: str, goal: float) -> str:
    """The verdict of node / ``other`` ≥ ``goal``: the ratio of the medians, and the per-run ratios' median and
    range (runs minutes apart on a shared VM differ by 20-40 %)."""
    node, theirs = result.rates("node"), result.rates(other)
    ratio = statistics.median(node) / statistics.median(theirs)
    per_run = [n / o for n, o in zip(node, theirs, strict=True)]
    met = ratio >= goal and statistics.median(per_run) >= goal
    noisy = " within noise," if min(per_run) < goal <= max(per_run) else ""
    return _verdict(met, f"{ratio:.2f}×;{noisy} per run {spread(per_run, '{:.2f}')}")


def _throughput_section(results: list[Throughput]) -> list[str]:
    first = results[0]
    out = ["## P5 throughput", "",
           f"{first.studies} studies (scout, 2D FLAIR and MPRAGE each, new UIDs per study) sent by 4 `storescu` "
           "at once (one association per study) to a node with the default rules and Orthanc as destination; "
           "turnaround per study = its last instance received → its last job settled as sent (journal). "
           "Each run on a fresh node and Orthanc.", "",
           "Layouts: *threads* is one `serve` process with `[inference] workers` = N; *processes* is a "
           "`serve --role receiver` and N `serve --role worker` processes (one thread each) sharing its journal "
           "and data directory (issue 16's scale-out, on one machine).", "",
           "| layout | workers | seconds | studies/hour | turnaround median | turnaround p95 | nothing lost |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        lost = (f"yes ({r.instances_journaled}/{r.instances_sent} instances journaled, {r.jobs_sent}/{r.jobs} jobs "
                f"sent, Orthanc holds {r.orthanc_instances}/{r.outbox_items})")
        out.append(f"| {r.layout} | {r.workers} | {r.seconds:.0f} | {r.studies_per_hour:.0f} | {r.median:.1f} s | "
                   f"{r.p95:.1f} s | "
                   f"{lost if r.lossless else '**NO**: ' + lost[5:-1]} |")
    for layout in dict.fromkeys(r.layout for r in results):
        runs = [r for r in results if r.layout == layout]
        if len(runs) > 1:
            base = runs[0].studies_per_hour
            out += ["", f"Scaling ({layout}): " + ", ".join(
                f"{r.workers} worker(s) {r.studies_per_hour / base:.2f}×" for r in runs)
                + f" the studies/hour of {runs[0].workers} worker(s)."]
    return out + [""]
