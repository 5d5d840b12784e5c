"""Fuzzing the node over C-STORE (``bench.fuzz``): a short campaign in CI, 10,000 objects in the heavy suite.

The campaign itself checks the promises (no crash, valid statuses, no broken object acknowledged, every
acknowledged instance durable, nothing written outside the data directory, no stuck job, bounded memory);
these tests run it and also check that its checks can fail.
"""

from __future__ import annotations

import random
import shlex
from pathlib import Path

import pytest

from bench import fuzz, mutate
from bench.fuzz import Outcome, Report
from dicom_node.scp import STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH, STATUS_SUCCESS
from tests.e2e.peers import require_tools

REPO = Path(__file__).resolve().parents[1]
CI_COUNT = 300
HEAVY_COUNT = 10_000


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[mutate.Seed]:
    return mutate.factory_seeds(tmp_path_factory.mktemp("seeds"))


def test_mutations_are_reproducible_from_the_seed(seeds: list[mutate.Seed]) -> None:
    for case in range(40):
        first, _ = fuzz.build_case(random.Random(f"7:{case}"), seeds[case % len(seeds)], 7, case)
        again, _ = fuzz.build_case(random.Random(f"7:{case}"), seeds[case % len(seeds)], 7, case)
        assert [m.encoded.data for m in first] == [m.encoded.data for m in again]
        assert [m.detail for m in first] == [m.detail for m in again]


def test_every_mutation_changes_the_object(seeds: list[mutate.Seed]) -> None:
    """Each mutation changes every seed in some of a few draws (one draw may be a no-op: zeros over zeros)."""
    rng = random.Random(3)
    for seed in seeds:
        original = mutate.encode(seed.objects[0])
        for name, (mutation, _) in mutate.MUTATIONS.items():
            changed = []
            for _ in range(4):
                try:
                    changed.append(mutation(rng, original).encoded.data != original.data)
                except Exception:  # noqa: BLE001 - a draw pydicom cannot encode is drawn again by the campaign
                    continue
            assert any(changed), (seed.name, name)


def test_status_categories() -> None:
    assert fuzz.category(0x0000) == "success"
    assert fuzz.category(0xB007) == "warning"
    assert fuzz.category(0xA700).startswith("failure 0xA7")
    assert fuzz.category(0xA900).startswith("failure 0xA9")
    assert fuzz.category(0xC000).startswith("failure 0xC")
    assert fuzz.category(0x0122).startswith("failure 0x01")
    assert fuzz.category(0x1234) == "invalid"
    assert fuzz.category(None) == "no response"


def test_outcome_checks_can_fail() -> None:
    """What the campaign counts as a broken promise, one response at a time."""
    def outcome(expect: int | None, status: int | None) -> Outcome:
        return Outcome(1, "seed", "m", "d", expect, status, "")

    assert outcome(mutate.ANY, STATUS_SUCCESS).problem() == ""
    assert outcome(mutate.FAILURE, STATUS_CANNOT_UNDERSTAND).problem() == ""
    assert "broken object answered 0x0000" in outcome(mutate.FAILURE, STATUS_SUCCESS).problem()
    assert "expected 0xA900" in outcome(STATUS_DATASET_MISMATCH, STATUS_CANNOT_UNDERSTAND).problem()
    assert "no response" in outcome(mutate.ANY, None).problem()
    assert "not a C-STORE status" in outcome(mutate.ANY, 0x1234).problem()


def test_journal_and_containment_checks_can_fail(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "spool" / "1.2" / "1.3").mkdir(parents=True)
    (data / "spool" / "1.2" / "1.3" / "1.4.dcm").write_bytes(b"x")
    (data / "journal.sqlite3").write_bytes(b"")
    assert fuzz._data_dir_problems(data) == []
    (data / "spool" / "1.2" / "x.dcm").write_bytes(b"x")  # a file at the wrong depth: a path escape inside
    (data / "elsewhere").write_bytes(b"x")
    assert len(fuzz._data_dir_problems(data)) == 2


def _campaign(count: int, tmp_path: Path, **kwargs: object) -> Report:
    """Run a campaign (the node's readiness probe is dcmtk's echoscu: skip without it, fail in CI)."""
    require_tools()
    return fuzz.run_campaign(count, seed=0, workdir=tmp_path / "fuzz", **kwargs)  # type: ignore[arg-type]


def _assert_promises_hold(report: Report, count: int) -> None:
    assert report.crashes == 0
    assert report.echo_status == STATUS_SUCCESS
    assert report.violations == [], "\n".join(report.violations[:20])
    assert len(report.outcomes) >= count * 0.9
    statuses = report.statuses()
    # the campaign reached both sides: objects stored (and processed by jobs) and objects refused
    assert statuses["success"] > count * 0.1, statuses
    assert sum(n for c, n in statuses.items() if c.startswith("failure")) > count * 0.2, statuses
    assert report.durable_checked == statuses["success"] - sum(
        1 for o in report.outcomes if o.mutation == "resend" and o.detail != "original" and o.status == 0)
    assert sum(report.jobs.values()) > 0 and set(report.jobs) <= {"sent", "written", "failed"}, report.jobs


def test_fuzz_campaign_over_c_store(tmp_path: Path) -> None:
    """CI: a few hundred mutated objects (real-data seeds up to 64 kB when ../shared/data is there, else
    the factory's alone: the report's seeds note says which)."""
    report = _campaign(CI_COUNT, tmp_path, max_seed_bytes=64_000)
    _assert_promises_hold(report, CI_COUNT)
    assert fuzz.markdown(report).count("| **all** |") == 1


@pytest.mark.heavy
def test_fuzz_campaign_10000_objects(tmp_path: Path) -> None:
    """The long campaign; its report becomes docs/fuzz.md (``python -m bench.fuzz`` writes the same)."""
    command = "python -m bench.fuzz " + shlex.join(["--count", str(HEAVY_COUNT), "--out", "docs/fuzz.md"])
    report = _campaign(HEAVY_COUNT, tmp_path, command=command)  # real-data seeds skipped (with a note) without them
    (REPO / "docs" / "fuzz.md").write_text(fuzz.markdown(report))
    _assert_promises_hold(report, HEAVY_COUNT)
