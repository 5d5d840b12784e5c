"""dicom_node.leases: a process renews the claims it holds, and only the runs that hold them end them."""

from __future__ import annotations

from pathlib import Path

from dicom_node.journal import Claim, Journal
from dicom_node.leases import LeaseKeeper


def test_a_run_taken_over_by_a_later_run_of_the_same_process_does_not_end_its_renewals(tmp_path: Path) -> None:
    """The held claims were keyed by task only: a stalled run A of this process, taken over by its run B (attempt
    2), released B's claim when A ended (ClaimLost), B's lease expired under a healthy run and its result was
    refused; three such rounds quarantined the job."""
    journal = Journal(tmp_path / "journal.sqlite3", fsync=False)
    keeper = LeaseKeeper(journal, lease_s=30.0)
    try:
        first, second = Claim("w", 1), Claim("w", 2)
        keeper.hold("job", 7, first)
        keeper.hold("job", 7, second)  # the same process took its stalled run over
        keeper.release("job", 7, first)  # the stalled run ends
        assert keeper._held == {("job", 7): second}
        keeper.release("job", 7, second)
        assert keeper._held == {}
    finally:
        keeper.stop()
        journal.close()
