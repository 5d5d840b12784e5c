"""The brain structures the project measures: FreeSurfer codes, names, colours and coded concepts.

Codes follow FreeSurfer's aseg (as SynthSeg 2.0 segments them); colours are FreeSurferColorLUT's.
Coded concepts come from DICOM CID 7140 "Brain Structure for Volumetric Measurement" (pydicom's code
dictionary): SNOMED CT, except ventral diencephalon, which CID 7140 codes as DCM 110700. CSF (label 24, the
cerebrospinal fluid outside the ventricles) has no CID 7140 structure; it is coded as the substance
SNOMED CT 65216001 "Cerebrospinal fluid" with the "Body substance" category.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "BODY_SUBSTANCE",
    "LEFT",
    "LR_SWAP",
    "RIGHT",
    "STRUCTURES",
    "Structure",
    "by_code",
    "laterality_code",
    "swap_left_right",
]

ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # 91723000, segmented property category
BODY_SUBSTANCE = codes.SCT.BodySubstance              # 91720002
LEFT = codes.SCT.Left                                 # 7771000
RIGHT = codes.SCT.Right                               # 24028007


@dataclass(frozen=True)
class Structure:
    code: int                          # FreeSurfer label value
    freesurfer_name: str               # FreeSurferColorLUT name, e.g. "Left-Hippocampus"
    display_name: str                  # for reports, e.g. "Left hippocampus"
    laterality: Literal["L", "R"] | None
    rgb: tuple[int, int, int]          # FreeSurferColorLUT colour
    concept: Code                      # property type (CID 7140 where it has one)
    category: Code = ANATOMICAL_STRUCTURE

    @property
    def snomed(self) -> tuple[str, str]:
        """(code value, code meaning) of the concept."""
        return (self.concept.value, self.concept.meaning)


def _pair(left: int, right: int, fs_suffix: str, display: str, rgb_left: tuple[int, int, int],
          concept: Code, rgb_right: tuple[int, int, int] | None = None) -> tuple[Structure, Structure]:
    return (
        Structure(left, f"Left-{fs_suffix}", f"Left {display}", "L", rgb_left, concept),
        Structure(right, f"Right-{fs_suffix}", f"Right {display}", "R", rgb_right or rgb_left, concept),
    )


_SCT = codes.SCT
_STRUCTURES: list[Structure] = [
    *_pair(2, 41, "Cerebral-White-Matter", "cerebral white matter", (245, 245, 245), _SCT.CerebralWhiteMatter,
           rgb_right=(0, 225, 0)),
    *_pair(3, 42, "Cerebral-Cortex", "cerebral cortex", (205, 62, 78), _SCT.CerebralGrayMatter),
    *_pair(4, 43, "Lateral-Ventricle", "lateral ventricle", (120, 18, 134), _SCT.LateralVentricle),
    *_pair(5, 44, "Inf-Lat-Vent", "inferior lateral ventricle", (196, 58, 250), _SCT.InferiorHornOfLateralVentricle),
    *_pair(7, 46, "Cerebellum-White-Matter", "cerebellar white matter", (220, 248, 164), _SCT.CerebellarWhiteMatter),
    *_pair(8, 47, "Cerebellum-Cortex", "cerebellar cortex", (230, 148, 34), _SCT.CerebellarCortex),
    *_pair(10, 49, "Thalamus", "thalamus", (0, 118, 14), _SCT.ThalamusPart),
    *_pair(11, 50, "Caudate", "caudate", (122, 186, 220), _SCT.CaudateNucleus),
    *_pair(12, 51, "Putamen", "putamen", (236, 13, 176), _SCT.Putamen),
    *_pair(13, 52, "Pallidum", "pallidum", (12, 48, 255), _SCT.GlobusPallidus, rgb_right=(13, 48, 255)),
    Structure(14, "3rd-Ventricle", "Third ventricle", None, (204, 182, 142), _SCT.ThirdVentricle),
    Structure(15, "4th-Ventricle", "Fourth ventricle", None, (42, 204, 164), _SCT.FourthVentricle),
    Structure(16, "Brain-Stem", "Brainstem", None, (119, 159, 176), _SCT.BrainStem),
    *_pair(17, 53, "Hippocampus", "hippocampus", (220, 216, 20), _SCT.Hippocampus),
    *_pair(18, 54, "Amygdala", "amygdala", (103, 255, 255), _SCT.Amygdala),
    Structure(24, "CSF", "Cerebrospinal fluid", None, (60, 60, 60), _SCT.CerebrospinalFluid, BODY_SUBSTANCE),
    *_pair(26, 58, "Accumbens-area", "accumbens", (255, 165, 0), _SCT.NucleusAccumbens),
    *_pair(28, 60, "VentralDC", "ventral diencephalon", (165, 42, 42), codes.DCM.VentralDiencephalon),
]

STRUCTURES: dict[int, Structure] = {s.code: s for s in sorted(_STRUCTURES, key=lambda s: s.code)}

# SynthSeg's generation labels are ordered neutral, left, right; left[i] mirrors right[i]. This covers the
# measured structures plus SynthSeg's extra labels (25/57 lesion, 30/62 vessel, 136/163 and 137/164 extra-cerebral).
_LEFT = (2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 17, 18, 25, 26, 28, 30, 136, 137)
_RIGHT = (41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 57, 58, 60, 62, 163, 164)
LR_SWAP: dict[int, int] = {**dict(zip(_LEFT, _RIGHT, strict=True)), **dict(zip(_RIGHT, _LEFT, strict=True))}


def by_code(code: int) -> Structure:
    """The structure of a FreeSurfer code; KeyError for codes the project does not measure."""
    return STRUCTURES[int(code)]


def laterality_code(structure: Structure) -> Code | None:
    """SNOMED CT Left/Right modifier for a lateralized structure."""
    return {"L": LEFT, "R": RIGHT}.get(structure.laterality or "")


def swap_left_right(labels: np.ndarray, swap: Mapping[int, int] = LR_SWAP) -> np.ndarray:
    """Exchange left and right codes (for left-right flip augmentation); other codes are kept."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.copy()
    if labels.min() < 0:
        raise ValueError("label codes must be non-negative")
    size = max(int(labels.max()), max(swap)) + 1
    lut = np.arange(size, dtype=labels.dtype)
    for source, target in swap.items():
        lut[source] = target
    return lut[labels]
