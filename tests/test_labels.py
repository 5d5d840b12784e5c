"""inference.labels: the structure table, coded concepts and the left/right swap."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr.codedict import codes

from inference.labels import (
    BINCOUNT_MAX_CODE,
    BODY_SUBSTANCE,
    LR_SWAP,
    STRUCTURES,
    by_code,
    code_counts,
    label_codes,
    laterality_code,
    swap_left_right,
)

ASEG = {2, 41, 3, 42, 4, 43, 5, 44, 7, 46, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 14, 15, 16,
        17, 53, 18, 54, 24, 26, 58, 28, 60}
LOBE_CODES = {*range(1201, 1207), *range(2201, 2207)}
MEASURED = ASEG | LOBE_CODES | {192}


def _side(structure_name: str) -> str | None:
    if structure_name.startswith(("Left-", "ctx-lh-")):
        return "L"
    if structure_name.startswith(("Right-", "ctx-rh-")):
        return "R"
    return None


def _unsided(structure_name: str) -> str:
    for prefix in ("Left-", "Right-", "ctx-lh-", "ctx-rh-"):
        structure_name = structure_name.removeprefix(prefix)
    return structure_name


def test_table_has_the_measured_structures() -> None:
    assert set(STRUCTURES) == MEASURED
    assert by_code(17).freesurfer_name == "Left-Hippocampus"
    assert by_code(53).display_name == "Right hippocampus"
    assert by_code(16).freesurfer_name == "Brain-Stem" and by_code(16).laterality is None
    assert by_code(17).rgb == (220, 216, 20)
    with pytest.raises(KeyError):
        by_code(999)


def test_laterality_matches_names() -> None:
    for structure in STRUCTURES.values():
        expected = _side(structure.freesurfer_name)
        assert structure.laterality == expected, structure.freesurfer_name
        assert laterality_code(structure) == {"L": codes.SCT.Left, "R": codes.SCT.Right}.get(expected or "")


def test_concepts_come_from_cid_7140() -> None:
    cid_7140 = {getattr(getattr(codes, scheme), name) for scheme, names in cid_concepts[7140].items()
                for name in names}
    for structure in STRUCTURES.values():
        if structure.code == 24:
            assert structure.snomed == ("65216001", "Cerebrospinal Fluid")
            assert structure.category == BODY_SUBSTANCE
        elif structure.code not in ASEG:  # lobes and the corpus callosum: SNOMED CT structures outside CID 7140
            assert structure.concept.scheme_designator == "SCT" and structure.category == codes.SCT.AnatomicalStructure
        else:
            assert structure.concept in cid_7140, structure.freesurfer_name
    assert by_code(17).snomed == ("5366008", "Hippocampus")
    assert by_code(28).concept.scheme_designator == "DCM"


def test_pairs_share_concept_and_are_swapped() -> None:
    for structure in STRUCTURES.values():
        if structure.laterality is not None:
            mirror = by_code(LR_SWAP[structure.code])
            assert mirror.concept == structure.concept
            assert _unsided(mirror.freesurfer_name) == _unsided(structure.freesurfer_name)
            assert mirror.laterality != structure.laterality
        else:
            assert structure.code not in LR_SWAP


def test_swap_left_right() -> None:
    labels = np.array([[0, 2, 41], [17, 53, 16], [24, 137, 164]], dtype=np.uint16)
    swapped = swap_left_right(labels)
    np.testing.assert_array_equal(swapped, [[0, 41, 2], [53, 17, 16], [24, 164, 137]])
    assert swapped.dtype == labels.dtype
    np.testing.assert_array_equal(swap_left_right(swapped), labels)
    assert all(LR_SWAP[LR_SWAP[c]] == c for c in LR_SWAP)


def test_lobes_group_the_desikan_killiany_parcels() -> None:
    from inference.labels import APARC_ASEG_CODES, CORTEX, DK_PARCELS, region_codes

    assert len(DK_PARCELS) == 34 and APARC_ASEG_CODES["ctx-lh-bankssts"] == 1001
    assert APARC_ASEG_CODES["ctx-rh-insula"] == 2035 and APARC_ASEG_CODES["Left-Thalamus-Proper"] == 10
    parcels = np.array([1028, 2028, 1017, 1030, 2006, 1011, 2026, 1035, 253, 17, 0, 42], dtype=np.uint16)
    regions = region_codes(parcels)
    names = [by_code(c).freesurfer_name if c else "0" for c in regions.tolist()]
    assert names == ["ctx-lh-frontal-lobe", "ctx-rh-frontal-lobe", "ctx-lh-frontal-lobe", "ctx-lh-temporal-lobe",
                     "ctx-rh-temporal-lobe", "ctx-lh-occipital-lobe", "ctx-rh-cingulate-lobe", "ctx-lh-insula-lobe",
                     "Corpus_Callosum", "Left-Hippocampus", "0", "Right-Cerebral-Cortex"]
    assert set(CORTEX["L"]) == {3, *range(1201, 1207)} and set(CORTEX["R"]) == {42, *range(2201, 2207)}
    assert by_code(1203).concept == codes.SCT.TemporalLobe and by_code(2203).laterality == "R"


def test_one_left_right_table_for_runtime_and_training() -> None:
    """The aseg pairs the training generator swaps are the start of the runtime's LR_SWAP."""
    from inference.labels import ASEG_LEFT, ASEG_RIGHT, HIPPOCAMPUS

    assert all(LR_SWAP[left] == right and LR_SWAP[right] == left
               for left, right in zip(ASEG_LEFT, ASEG_RIGHT, strict=True))
    assert LR_SWAP[HIPPOCAMPUS["L"]] == HIPPOCAMPUS["R"]
    assert by_code(HIPPOCAMPUS["L"]).laterality == "L" and by_code(HIPPOCAMPUS["R"]).laterality == "R"


@pytest.mark.parametrize(("top", "dtype"), [(2035, np.int32), (2035, np.uint16), (2035, np.uint64),
                                            (BINCOUNT_MAX_CODE + 5, np.int32), (BINCOUNT_MAX_CODE + 5, np.uint64)])
def test_code_counts_are_the_voxels_of_each_code_present(top: int, dtype: type) -> None:
    rng = np.random.default_rng(4)
    array = rng.choice(np.array([0, 2, 17, 41, 1201, top], dtype=dtype), size=(6, 7, 8))
    values, numbers = np.unique(array, return_counts=True)
    counts = code_counts(array)
    assert counts == {int(v): int(n) for v, n in zip(values, numbers, strict=True)}
    assert list(counts) == sorted(counts)  # ascending codes, absent ones left out
    assert code_counts(np.zeros((0, 2, 2), np.uint16)) == {}


def test_label_codes_checks_the_image() -> None:
    image = sitk.GetImageFromArray(np.array([[[0, 3], [41, 41]]], dtype=np.int16))
    assert label_codes(image).tolist() == [[[0, 3], [41, 41]]]
    for bad, why in ((sitk.GetImageFromArray(np.zeros((2, 2, 2), np.float32)), "integer pixel type"),
                     (sitk.GetImageFromArray(np.full((2, 2, 2), -1, np.int16)), "non-negative"),
                     (sitk.GetImageFromArray(np.zeros((2, 2), np.int16)), "scalar 3D")):
        with pytest.raises(ValueError, match=why):
            label_codes(bad)
