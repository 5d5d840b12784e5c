"""Input series for the benchmarks, generated with tests.dicom_factory (or the shared scout when present)."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from tests.conftest import SHARED_DATA
from tests.dicom_factory import (
    AXIAL_IOP,
    make_mr_volume_image,
    make_study,
    write_mr_series,
)

SHARED_SCOUT = SHARED_DATA / "dicom" / "phantom_siemens_xa30_aahead_scout" / "01001_AAHead_Scout"
SHARED_MPRAGE = SHARED_DATA / "dicom" / "human_siemens_skyra_mprage" / "00005_SAG_MPRAGE_220_FOV"

#: A description no default rule matches, so received series are stored only.
UNROUTED_DESCRIPTION = "bench_ingest"

_3D = {"MRAcquisitionType": "3D", "ImageType": ["ORIGINAL", "PRIMARY", "M", "NORM"]}


def ingest_series(out_dir: Path, *, slices: int = 200, size: int = 256, copies: int = 1) -> list[Path]:
    """``copies`` series of ``slices`` single-frame MR images (size × size, 16 bit), one folder each.

    The pixel volume is computed once; every copy has its own Series and SOP Instance UIDs.
    """
    image = make_mr_volume_image((slices, size, size), (1.0, 1.0, 1.0), iop=AXIAL_IOP, seed=1)
    study = make_study()
    folders = []
    for c in range(copies):
        folder = Path(out_dir) / f"series-{c:02d}"
        write_mr_series(image, folder, study=study, series_description=UNROUTED_DESCRIPTION,
                        series_number=100 + c, series_uid=str(generate_uid()))
        folders.append(folder)
    return folders


def scout_series(out_dir: Path) -> tuple[Path, str]:
    """The AutoAlign head scout (160 × 160 × 128, 1.6 mm): the shared phantom when present, else generated."""
    if SHARED_SCOUT.is_dir() and any(SHARED_SCOUT.iterdir()):
        return SHARED_SCOUT, f"shared phantom {SHARED_SCOUT.relative_to(SHARED_DATA)}"
    folder = Path(out_dir) / "scout"
    image = make_mr_volume_image((128, 160, 160), (1.625, 1.625, 1.6), seed=2)
    write_mr_series(image, folder, series_description="AAHead_Scout", series_number=1, header=_3D)
    return folder, "generated 160 × 160 × 128 scout (tests.dicom_factory; shared data absent)"


MEMORY_DESCRIPTION = "bench_memory_3d"


def memory_series(out_dir: Path, size: int = 256) -> Path:
    """A size³ 1 mm 3D series (description ``MEMORY_DESCRIPTION``) for the peak-memory benchmark."""
    folder = Path(out_dir) / "memory"
    image = make_mr_volume_image((size, size, size), (1.0, 1.0, 1.0), seed=3)
    write_mr_series(image, folder, series_description=MEMORY_DESCRIPTION, series_number=3, header=_3D)
    return folder
