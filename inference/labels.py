"""The brain structures the project measures: FreeSurfer codes, names, colours and coded concepts.

Besides FreeSurfer's aseg structures, the cortex of each hemisphere is measured by lobe: the Desikan-Killiany
parcels of FreeSurfer's aparc+aseg (codes 1001-1035 left, 2001-2035 right) are grouped into frontal, parietal,
temporal, occipital, cingulate and insula as FreeSurfer's ``mri_annotation2label --lobesStrict`` groups them; a
lobe's cortex has a project code (1201-1206 left, 2201-2206 right; not FreeSurferColorLUT codes) and is coded
as its SNOMED CT lobe. The corpus callosum (aparc+aseg 251-255) is measured whole as FreeSurfer's 192.

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
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "APARC_ASEG_CODES",
    "ASEG_LEFT",
    "ASEG_RIGHT",
    "CORTEX",
    "aseg_view",
    "LOBE_CORTEX_CODES",
    "HIPPOCAMPUS",
    "LOBES",
    "BODY_SUBSTANCE",
    "LEFT",
    "LR_SWAP",
    "RIGHT",
    "STRUCTURES",
    "Structure",
    "by_code",
    "code_counts",
    "label_codes",
    "region_codes",
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
    Structure(192, "Corpus_Callosum", "Corpus callosum", None, (0, 0, 208), _SCT.CorpusCallosum),
]

#: Desikan-Killiany parcels of aparc+aseg: name -> index (code 1000 + index left, 2000 + index right; 4, the
#: corpus callosum parcel, is not used by aparc+aseg) and the lobe FreeSurfer's lobesStrict puts it in.
DK_PARCELS: dict[str, tuple[int, str]] = {
    "bankssts": (1, "temporal"), "caudalanteriorcingulate": (2, "cingulate"),
    "caudalmiddlefrontal": (3, "frontal"), "cuneus": (5, "occipital"), "entorhinal": (6, "temporal"),
    "fusiform": (7, "temporal"), "inferiorparietal": (8, "parietal"), "inferiortemporal": (9, "temporal"),
    "isthmuscingulate": (10, "cingulate"), "lateraloccipital": (11, "occipital"),
    "lateralorbitofrontal": (12, "frontal"), "lingual": (13, "occipital"), "medialorbitofrontal": (14, "frontal"),
    "middletemporal": (15, "temporal"), "parahippocampal": (16, "temporal"), "paracentral": (17, "frontal"),
    "parsopercularis": (18, "frontal"), "parsorbitalis": (19, "frontal"), "parstriangularis": (20, "frontal"),
    "pericalcarine": (21, "occipital"), "postcentral": (22, "parietal"), "posteriorcingulate": (23, "cingulate"),
    "precentral": (24, "frontal"), "precuneus": (25, "parietal"), "rostralanteriorcingulate": (26, "cingulate"),
    "rostralmiddlefrontal": (27, "frontal"), "superiorfrontal": (28, "frontal"),
    "superiorparietal": (29, "parietal"), "superiortemporal": (30, "temporal"), "supramarginal": (31, "parietal"),
    "frontalpole": (32, "frontal"), "temporalpole": (33, "temporal"), "transversetemporal": (34, "temporal"),
    "insula": (35, "insula"),
}

#: lobe -> (offset of its project code, SNOMED CT concept, FreeSurfer-style colour)
LOBES: dict[str, tuple[int, Code, tuple[int, int, int]]] = {
    "frontal": (1, _SCT.FrontalLobe, (100, 150, 230)),
    "parietal": (2, _SCT.ParietalLobe, (20, 180, 140)),
    "temporal": (3, _SCT.TemporalLobe, (220, 180, 140)),
    "occipital": (4, _SCT.OccipitalLobe, (220, 20, 100)),
    "cingulate": (5, Code("32849002", "SCT", "Cingulate gyrus"), (220, 20, 10)),
    "insula": (6, _SCT.Insula, (160, 100, 220)),
}
_LOBE_BASE = {"L": 1200, "R": 2200}
for _lobe, (_offset, _concept, _rgb) in LOBES.items():
    for _side, _hemi, _word in (("L", "lh", "Left"), ("R", "rh", "Right")):
        _STRUCTURES.append(Structure(_LOBE_BASE[_side] + _offset, f"ctx-{_hemi}-{_lobe}-lobe",
                                     f"{_word} {_lobe} cortex", _side, _rgb, _concept))  # type: ignore[arg-type]

#: every code of FreeSurfer's aparc+aseg the project reads, by FreeSurferColorLUT name
APARC_ASEG_CODES: dict[str, int] = {
    "Unknown": 0, "BG": 0, "Left-Thalamus-Proper": 10, "Right-Thalamus-Proper": 49,
    "CC_Posterior": 251, "CC_Mid_Posterior": 252, "CC_Central": 253, "CC_Mid_Anterior": 254, "CC_Anterior": 255,
    **{f"ctx-{hemi}-{name}": base + index for name, (index, _) in DK_PARCELS.items()
       for hemi, base in (("lh", 1000), ("rh", 2000))},
}

STRUCTURES: dict[int, Structure] = {s.code: s for s in sorted(_STRUCTURES, key=lambda s: s.code)}
APARC_ASEG_CODES.update({s.freesurfer_name: s.code for s in _STRUCTURES if s.code < 1000 and s.code != 192})

#: cerebral cortex per side: the aseg code and the lobes' codes
CORTEX: dict[str, tuple[int, ...]] = {
    side: (aseg, *(_LOBE_BASE[side] + offset for offset, _, _ in LOBES.values()))
    for side, aseg in (("L", 3), ("R", 42))
}


#: the project's codes of the cortex of one lobe (1201-1206 left, 2201-2206 right)
LOBE_CORTEX_CODES = frozenset(code for _aseg, *lobes in CORTEX.values() for code in lobes)


def aseg_view(codes: np.ndarray) -> np.ndarray:
    """Measured codes as a whole-cortex (aseg) label set: each side's lobes to its cortex (3, 42), the corpus
    callosum (192) to 0 (left out: an aseg set holds it in the white matter)."""
    out = np.asarray(codes).astype(np.int64)
    for aseg, *lobes in CORTEX.values():
        out[np.isin(out, lobes)] = aseg
    out[out == 192] = 0
    return out


def region_codes(codes_in: np.ndarray) -> np.ndarray:
    """aparc+aseg codes -> measured codes: DK parcels to their lobe, corpus callosum 251-255 to 192; aseg
    codes are kept (codes the project does not measure too, e.g. vessels)."""
    codes_in = np.asarray(codes_in)
    if codes_in.size == 0:
        return codes_in.astype(np.uint16)
    lut = np.arange(max(int(codes_in.max()) + 1, 2256), dtype=np.uint16)
    for index, lobe in DK_PARCELS.values():
        lut[1000 + index] = _LOBE_BASE["L"] + LOBES[lobe][0]
        lut[2000 + index] = _LOBE_BASE["R"] + LOBES[lobe][0]
    lut[251:256] = 192
    return lut[codes_in]

# SynthSeg's generation labels are ordered neutral, left, right; left[i] mirrors right[i]. This covers the
# measured structures plus SynthSeg's extra labels (25/57 lesion, 30/62 vessel, 136/163 and 137/164 extra-cerebral).
#: SynthSeg's paired generation labels (aseg codes), left[i] mirroring right[i]: the training generator's
#: left-right swap and the start of :data:`LR_SWAP`.
ASEG_LEFT: tuple[int, ...] = (2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 17, 18, 25, 26, 28, 30, 136, 137)
ASEG_RIGHT: tuple[int, ...] = (41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 57, 58, 60, 62, 163, 164)
_LEFT = (*ASEG_LEFT, *range(1201, 1207), *range(1001, 1036))
_RIGHT = (*ASEG_RIGHT, *range(2201, 2207), *range(2001, 2036))

#: The hippocampus of each side (hippocampal occupancy, the summary page, evaluation summaries).
HIPPOCAMPUS: dict[str, int] = {"L": 17, "R": 53}
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


#: Label volumes whose largest code is below this are counted with ``np.bincount`` (linear time, one pass);
#: above it (codes far beyond FreeSurfer's) with ``np.unique`` (a sort), so no huge count table is allocated.
BINCOUNT_MAX_CODE = 1 << 16


def label_codes(labels: sitk.Image) -> np.ndarray:
    """The label volume's codes (a read-only view, z, y, x); ValueError unless a scalar 3D image of non-negative
    integers."""
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("labels must be a scalar 3D image")
    array = sitk.GetArrayViewFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must have an integer pixel type, got {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError("label codes must be non-negative")
    return array


def code_counts(array: np.ndarray) -> dict[int, int]:
    """The number of voxels of each code present in ``array`` (non-negative integer codes, as
    :func:`label_codes` returns them), in ascending code order."""
    if not array.size:
        return {}
    top = int(array.max())
    if top < BINCOUNT_MAX_CODE:
        flat = array.ravel()
        if not np.can_cast(flat.dtype, np.intp):  # uint64 (bincount takes what casts safely to intp)
            flat = flat.astype(np.intp)
        counts = np.bincount(flat, minlength=top + 1)
        present = np.flatnonzero(counts)
        return {int(code): int(counts[code]) for code in present}
    values, numbers = np.unique(array, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, numbers, strict=True)}
