"""docs/benchmarks.md from the measurements: machine, then P1-P4 with their goals."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import UTC, datetime

from .ingest import TARGETS, ConcurrencyResult, IngestResult
from .memory import Memory
from .turnaround import Turnaround

INGEST_GOAL = 0.8        # node images/s ≥ 0.8 × storescp
TURNAROUND_GOAL_S = 30.0
MEMORY_GOAL_KB = 3e9 / 1024  # 3 GB = 3·10⁹ bytes (2.79 GiB), the stricter reading


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
           memory: Memory | None, concurrency: ConcurrencyResult | None, notes: Sequence[str] = ()) -> str:
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
        rates = {t: ingest.rates(t) for t in TARGETS}
        node, scp = statistics.median(rates["node"]), statistics.median(rates["storescp"])
        ratio = node / scp
        ratios = [n / s for n, s in zip(rates["node"], rates["storescp"], strict=True)]
        out += ["## P1 ingest", "",
                f"{ingest.images} single-frame MR images (256 × 256, 16 bit, Explicit VR LE) sent by "
                "`/usr/bin/storescu` (TCP_NODELAY=1) in one association; wall time of the storescu process; "
                f"{len(ingest.seconds['node'])} interleaved runs, every target fresh and empty each run. "
                "The node runs with `fsync = true` (file, directory and journal durable before each "
                "success response); storescp and Orthanc (SyncStorageArea false) do not fsync. References: "
                "`node-no-fsync` (`fsync = false`, not for production) separates the cost of durability, and "
                "`pynetdicom-bare` (bench/bare_scp.py: a pynetdicom 3 SCP that answers Success and keeps nothing) "
                "is the ceiling of the DICOM library the node is built on.", "",
                "| receiver | seconds | images/s |", "|---|---|---|"]
        for t in TARGETS:
            out.append(f"| {t} | {spread(ingest.seconds[t], '{:.2f}')} | {spread(rates[t], '{:.0f}')} |")
        bare = statistics.median(rates["pynetdicom-bare"]) / scp if rates.get("pynetdicom-bare") else None
        out += ["", f"Ratio node / storescp: {ratio:.2f} (per-run {spread(ratios, '{:.2f}')}). Goal ≥ "
                f"{INGEST_GOAL}: {_verdict(ratio >= INGEST_GOAL, f'{ratio:.2f}×')}."]
        if bare is not None:
            out.append(f"For scale: pynetdicom storing nothing reaches {bare:.2f}× storescp on this machine.")
        out.append("")

    if turnaround:
        totals = [t.seconds for t in turnaround]
        med = statistics.median(totals)
        out += ["## P2 turnaround", "",
                "From the last scout instance received (journal) to the last derived object acknowledged by "
                f"Orthanc (job settled as sent); default rules, {len(turnaround)} run(s), fresh node and Orthanc "
                f"each. Derived objects per run: {turnaround[0].outputs} (Orthanc held "
                f"{turnaround[0].orthanc_instances}).", "",
                "| stage | seconds |", "|---|---|"]
        stages = list(dict.fromkeys(k for t in turnaround for k in t.stages))
        for stage in stages:
            values = [t.stages[stage] for t in turnaround if stage in t.stages]
            out.append(f"| {stage} | {spread(values, '{:.2f}')} |")
        out += [f"| **total** | **{spread(totals, '{:.1f}')}** |", "",
                "assemble = association released → completeness → routing → job queued; model.* and write* are "
                "the job runner's own timings; queue+send = job written → every outbox item acknowledged.", "",
                f"Goal ≤ {TURNAROUND_GOAL_S:.0f} s on 2 cores: "
                f"{_verdict(med <= TURNAROUND_GOAL_S, f'{med:.1f} s')}.", ""]

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
    notes = list(notes)
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)
