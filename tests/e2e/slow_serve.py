"""``dicom-node`` with each job's synthesis step slowed down by ``$DICOM_NODE_TEST_SYNTH_DELAY_S`` seconds: a test's
stand-in for a long inference, so that a worker can be killed while it runs a job (``NodeProcess(module=...)``)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import dicom_node.jobs
from dicom_node.cli import main

_synthesize = dicom_node.jobs.synthesize_step


def _slow_synthesize(*args: Any, **kwargs: Any) -> Any:
    time.sleep(float(os.environ.get("DICOM_NODE_TEST_SYNTH_DELAY_S", "0")))
    return _synthesize(*args, **kwargs)


if __name__ == "__main__":
    dicom_node.jobs.synthesize_step = _slow_synthesize  # type: ignore[assignment]
    sys.exit(main())
