"""A site's normative table: expected volume of each structure by age band and sex, read from a CSV file.

One row per structure, age band and sex (``[volumetry] normative_table`` in the node's config)::

    code,age_min,age_max,sex,mean_ml,sd_ml
    17,50,60,F,3.71,0.39
    17,50,60,,3.80,0.42

``code``: FreeSurfer code (``inference.labels``); ages in years, ``[age_min, age_max)``; ``sex`` M, F, O or
empty for both; ``mean_ml`` and ``sd_ml`` (> 0) the band's mean and standard deviation in ml. The volumetry
gives a structure a z-score and percentile from the first matching row (``inference.volumetry.Norm``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from inference.labels import STRUCTURES
from inference.volumetry import Norm

COLUMNS = ("code", "age_min", "age_max", "sex", "mean_ml", "sd_ml")


def load_norms(path: Path) -> tuple[Norm, ...]:
    """The rows of the normative table at ``path``; ValueError naming the line of the first bad row."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: normative table lacks the column(s) {', '.join(missing)}")
        return tuple(_row(path, reader.line_num, row) for row in reader)


def _row(path: Path, line: int, row: dict[str, str]) -> Norm:
    try:
        sex = (row["sex"] or "").strip().upper() or None
        if sex not in (None, "M", "F", "O"):
            raise ValueError(f"sex {sex!r} is not M, F, O or empty")
        norm = Norm(code=int(row["code"]), age_min=float(row["age_min"]), age_max=float(row["age_max"]),
                    sex=sex, mean_ml=float(row["mean_ml"]), sd_ml=float(row["sd_ml"]))  # type: ignore[arg-type]
        if not all(math.isfinite(v) for v in (norm.mean_ml, norm.sd_ml, norm.age_min)) or math.isnan(norm.age_max):
            raise ValueError("mean_ml, sd_ml and age_min must be numbers (not nan or inf), age_max not nan")
        if norm.sd_ml <= 0 or norm.mean_ml <= 0 or norm.age_min >= norm.age_max:
            raise ValueError("mean_ml and sd_ml must be above 0 and age_min below age_max")
        if norm.code not in STRUCTURES:  # its row would never be used
            raise ValueError(f"code {norm.code} is not a structure the node measures (inference.labels.STRUCTURES)")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} line {line}: {exc}") from None
    return norm
