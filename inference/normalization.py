"""The input intensity normalisation the synthesis networks are trained with and served with.

One value, :data:`SYNTHESIS_INPUT`: the training generator normalises its inputs with it
(``inference.training.generator.normalize_percentile``), the exporter writes it into each bundle's
manifest (``inference.training.export.manifest_dict``) and the manifest's ``[input]`` section defaults to it
(``inference.models.InputSpec``), which ``inference.pipeline.normalize`` applies when serving.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PercentileNormalization:
    """``(x - P_low) / (P_high - P_low)`` with percentiles over the non-zero voxels, clipped to ``[0, clip_max]``."""

    p_low: float = 0.5
    p_high: float = 99.5
    clip_max: float = 1.5

    def manifest_fields(self) -> dict[str, Any]:
        """The manifest's ``[input]`` fields of this normalisation."""
        return {"normalization": "percentile", **asdict(self)}


SYNTHESIS_INPUT = PercentileNormalization()
