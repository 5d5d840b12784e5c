"""Tests for dicom_node.routing: the loop guard, each default rule, matchers and explanations."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom import Dataset

from dicom_node import MANUFACTURER, MODEL_NAME
from dicom_node.config import NodeConfig, Rule, default_rules, parse_config
from dicom_node.headers import SeriesAttributes
from dicom_node.routing import Decision, loop_guard, route

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1234"
ALL_MODELS = {m for r in default_rules() for m in NodeConfig().models_for(r)}


def attrs(description: str, **overrides: Any) -> SeriesAttributes:
    """Series attributes as the SCP files them (headers.describe), for a Siemens MR series."""
    base: dict[str, Any] = {
        "SeriesDescription": description,
        "Modality": "MR",
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
        "MRAcquisitionType": "2D",
        "SliceThickness": 4.0,
        "Manufacturer": "SIEMENS",
        "ManufacturerModelName": "Prisma",
        "SoftwareVersions": "syngo MR E11",
        "ProtocolName": description,
        "SeriesNumber": 3,
        "SOPClassUID": MR,
        "PatientPosition": "HFS",
        "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.99",
    }
    base.update(overrides)
    return SeriesAttributes.from_json(base)


def decide(a: SeriesAttributes, config: NodeConfig | None = None, **kwargs: Any) -> Decision:
    kwargs.setdefault("installed_models", ALL_MODELS)
    return route(config or NodeConfig(), a, SERIES_UID, **kwargs)


# -- the default rules -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("a", "rule", "output"),
    [
        (attrs("AAHead_Scout", MRAcquisitionType="3D", SliceThickness=1.6,
               ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]), "aahead-scout", "sT1AAH"),
        (attrs("aa_head_scout_64ch", MRAcquisitionType="3D", SliceThickness=1.6), "aahead-scout", "sT1AAH"),
        (attrs("SAG MPRAGE 220 FOV", MRAcquisitionType="3D", SliceThickness=0.9), "real-3d-t1", "rT1"),
        (attrs("t1_mprage_sag_p2_iso", MRAcquisitionType="3D", SliceThickness=1.0), "real-3d-t1", "rT1"),
        (attrs("T1 3D SPGR", MRAcquisitionType="3D", SliceThickness=1.2), "real-3d-t1", "rT1"),
        (attrs("t1_fl2d_sag", SliceThickness=4.0), "t1-2d", "sT12DT1"),
        (attrs("t1_se_tra", SliceThickness=5.0), "t1-2d", "sT12DT1"),
        (attrs("t2_tse_cor", SliceThickness=3.0), "coronal-t2", "sT1CorT2"),
        # MRAcquisitionType is Type 2: older or anonymised headers leave it empty
        (attrs("t2_tse_cor", SliceThickness=3.0, MRAcquisitionType=""), "coronal-t2", "sT1CorT2"),
        (attrs("T2 KOR 3mm"), "coronal-t2", "sT1CorT2"),
        (attrs("cor_t2_blade"), "coronal-t2", "sT1CorT2"),
        (attrs("t2_tirm_tra_dark-fluid FLAIR", SliceThickness=5.0), "flair-2d", "sT12DFLAIR"),
        (attrs("t2_spc_da-fl_sag_p2_iso FLAIR", MRAcquisitionType="3D", SliceThickness=1.0), "flair-3d", "sT13DFLAIR"),
        # GE's "T1 FLAIR" is a T1-weighted 2D sequence, not a FLAIR
        (attrs("Ax T1 FLAIR", SliceThickness=5.0), "t1-2d", "sT12DT1"),
        # Siemens names its FLAIRs "dark-fluid" (2D TIRM) and "da-fl" (3D SPACE), without "flair"
        (attrs("t2_tirm_tra_dark-fluid", SliceThickness=5.0), "flair-2d", "sT12DFLAIR"),
        (attrs("t2_tirm_cor_dark-fluid", SliceThickness=4.0), "flair-2d", "sT12DFLAIR"),
        (attrs("t2_spc_da-fl_sag_p2_iso", MRAcquisitionType="3D", SliceThickness=1.0), "flair-3d", "sT13DFLAIR"),
        # GE's 3D T1s need not say "T1"
        (attrs("Sag FSPGR BRAVO", MRAcquisitionType="3D", SliceThickness=1.0), "real-3d-t1", "rT1"),
        (attrs("AX 3D BRAVO", MRAcquisitionType="3D", SliceThickness=1.2), "real-3d-t1", "rT1"),
        # a head, however the scanner says so (or does not)
        (attrs("t1_fl2d_sag", BodyPartExamined="HEAD"), "t1-2d", "sT12DT1"),
        (attrs("t1_fl2d_sag", BodyPartExamined="Schädel"), "t1-2d", "sT12DT1"),
        (attrs("t1_fl2d_sag", BodyPartExamined=""), "t1-2d", "sT12DT1"),
    ],
)
def test_default_rules(a: dict[str, Any], rule: str, output: str) -> None:
    decision = decide(a)
    assert decision.processed
    assert decision.rule is not None and decision.rule.name == rule and decision.rule.output_name == output
    assert decision.reason.startswith(f"rule {rule!r}: ")
    assert decision.trace[-1] == f"rule {rule!r}: MATCH"


def test_real_3d_t1_is_volumetry_and_scout_is_synthesis() -> None:
    mprage = decide(attrs("SAG MPRAGE 220 FOV", MRAcquisitionType="3D", SliceThickness=0.9))
    assert mprage.rule.action == "volumetry" and "volumetry of the real 3D T1 (rT1)" in mprage.reason
    scout = decide(attrs("AAHead_Scout", MRAcquisitionType="3D", SliceThickness=1.6))
    assert scout.rule.action == "synthesize" and scout.rule.model == "synth-t1-aahead-scout"
    assert scout.reason == "rule 'aahead-scout': synthesize sT1AAH with model synth-t1-aahead-scout"


def test_thick_3d_t1_is_not_real_3d() -> None:
    decision = decide(attrs("t1_mprage_sag", MRAcquisitionType="3D", SliceThickness=3.0))
    assert not decision.processed
    assert "rule 'real-3d-t1': no (SliceThickness 3.0 > 1.5)" in decision.trace
    assert "rule 't1-2d': no (MRAcquisitionType '3D' is not '2D')" in decision.trace


@pytest.mark.parametrize(
    ("a", "why"),
    [
        # other body parts: the brain models and the volumetry are for heads
        (attrs("t1_tse_sag_320", BodyPartExamined="LSPINE"), "BodyPartExamined 'LSPINE' does not match"),
        (attrs("t2_tse_cor", SliceThickness=3.0, BodyPartExamined="PROSTATE"),
         "BodyPartExamined 'PROSTATE' does not match"),
        (attrs("t1_fl3d_tra_dynaVIEWS", MRAcquisitionType="3D", SliceThickness=1.0, BodyPartExamined="BREAST"),
         "BodyPartExamined 'BREAST' does not match"),
        # an MP2RAGE's inversion images are not T1-weighted images
        (attrs("t1_mp2rage_sag_p3_iso_INV1", MRAcquisitionType="3D", SliceThickness=1.0,
               ImageType=["ORIGINAL", "PRIMARY", "M", "ND"]), "matches the excluded"),
        (attrs("t1_mp2rage_sag_p3_iso_INV2", MRAcquisitionType="3D", SliceThickness=1.0,
               ImageType=["ORIGINAL", "PRIMARY", "M", "ND"]), "matches the excluded"),
        # the scanner's unfiltered copy beside the distortion-corrected series
        (attrs("t2_tse_cor_ND", SliceThickness=3.0, ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]),
         "matches the excluded"),
        (attrs("t1_mprage_sag_p2_iso_ND", MRAcquisitionType="3D", SliceThickness=1.0), "matches the excluded"),
        # coronal T2s the coronal-T2 model was not made for: STIR, T2*, a 3D slab
        (attrs("t2_tirm_cor", SliceThickness=4.0), "matches the excluded"),
        (attrs("t2_fl2d_cor_hemo", SliceThickness=4.0), "matches the excluded"),
        (attrs("t2_spc_cor_p2_iso", MRAcquisitionType="3D", SliceThickness=1.0), "matches the excluded"),
    ],
)
def test_default_rules_leave_alone(a: SeriesAttributes, why: str) -> None:
    decision = decide(a)
    assert not decision.processed, decision.reason
    assert any(why in line for line in decision.trace), decision.trace


def test_2d_scout_is_not_the_3d_scout_rule() -> None:
    decision = decide(attrs("AAHead_Scout", MRAcquisitionType="2D"))
    assert decision.trace[0] == "rule 'aahead-scout': no (MRAcquisitionType '2D' is not '3D')"
    assert decision.reason == "not processed: no rule matches"


def test_t1_2d_thickness_bounds() -> None:
    assert not decide(attrs("t1_fl2d_sag", SliceThickness=1.0)).processed
    assert not decide(attrs("t1_fl2d_sag", SliceThickness=9.0)).processed
    assert decide(attrs("t1_fl2d_sag", SliceThickness=2.0)).processed
    missing = decide(attrs("t1_fl2d_sag", SliceThickness=None))
    assert "rule 't1-2d': no (SliceThickness is absent)" in missing.trace


def test_unmatched_series_has_a_full_trace() -> None:
    decision = decide(attrs("localizer"))
    assert not decision.processed and decision.rule is None
    assert decision.reason == "not processed: no rule matches"
    assert len(decision.trace) == len(default_rules())
    assert decision.trace[0] == (
        "rule 'aahead-scout': no (SeriesDescription 'localizer' does not match /^aa_?head_?scout/i)")


# -- loop guard --------------------------------------------------------------------------------

def test_scanner_reformat_is_guarded() -> None:
    decision = decide(attrs("AAHead_Scout_MPR_sag", MRAcquisitionType="3D", SliceThickness=1.6,
                            ImageType=["DERIVED", "PRIMARY", "MPR"]))
    assert not decision.processed
    assert decision.reason.startswith("not processed: scanner reformat (ImageType DERIVED\\PRIMARY\\MPR)")
    assert decision.trace == []  # no rule is even tried


def test_other_derived_image_is_guarded() -> None:
    decision = decide(attrs("t1_fl2d_sag", ImageType=["DERIVED", "SECONDARY", "SUBTRACTION"]))
    assert "derived image" in decision.reason


def test_node_own_manufacturer_is_guarded() -> None:
    a = attrs("sT12DT1", Manufacturer=MANUFACTURER, ManufacturerModelName=MODEL_NAME,
              ImageType=["ORIGINAL", "PRIMARY"])
    decision = decide(a)
    assert not decision.processed and "written by this node" in decision.reason
    # the same Manufacturer with another model name is somebody else's
    assert decide(attrs("t1_fl2d_sag", Manufacturer=MANUFACTURER)).processed


def test_uid_root_is_guarded() -> None:
    config = parse_config('[node]\nuid_root = "1.2.826.0.1.3680043.10.999"')
    own_series = route(config, attrs("t1_fl2d_sag"), "1.2.826.0.1.3680043.10.999.5.6", installed_models=ALL_MODELS)
    assert not own_series.processed and "UID under this node's root 1.2.826.0.1.3680043.10.999." in own_series.reason
    own_sop = route(config, attrs("t1_fl2d_sag", SOPInstanceUID="1.2.826.0.1.3680043.10.999.7"), "2.25.1",
                    installed_models=ALL_MODELS)
    assert not own_sop.processed
    # a root that is only a textual prefix of another root does not match ("...999." vs "...9991")
    other = route(config, attrs("t1_fl2d_sag", SOPInstanceUID="2.25.2"), "1.2.826.0.1.3680043.10.9991.1",
                  installed_models=ALL_MODELS)
    assert other.processed


def test_journal_produced_is_guarded() -> None:
    produced = {SERIES_UID}
    decision = decide(attrs("t1_fl2d_sag"), is_produced=produced.__contains__)
    assert not decision.processed and decision.reason == "not processed: a series this node produced (journal)"
    assert decide(attrs("t1_fl2d_sag"), is_produced=set().__contains__).processed


def test_loop_guard_direct() -> None:
    assert loop_guard(attrs("x"), "1.2", uid_root=None) is None
    assert loop_guard(SeriesAttributes(image_type=()), "1.2", uid_root=None) is None
    assert loop_guard(SeriesAttributes(image_type=("derived", "primary")), "1.2", uid_root=None).startswith(
        "derived image")


# -- not routed --------------------------------------------------------------------------------

def test_ct_is_stored_only() -> None:
    decision = decide(attrs("t1 head", Modality="CT", SOPClassUID=CT))
    assert not decision.processed
    assert decision.reason == f"stored only: SOP class {CT} is not routed (only MR images are)"


def test_enhanced_mr_is_routed() -> None:
    decision = decide(attrs("t2_tse_cor", SOPClassUID=ENHANCED_MR))
    assert decision.rule.name == "coronal-t2"


def test_an_enhanced_mr_real_t1_reaches_its_rule() -> None:
    """Found in review: Enhanced MR keeps SliceThickness in its functional groups only; read at the top level, the
    real 3D T1 rule (thickness at most 1.5 mm) never matched a Siemens XA real T1: stored, never measured."""
    from pydicom.dataset import Dataset

    def enhanced(where: str) -> Dataset:
        ds = Dataset()
        ds.SeriesDescription, ds.Modality, ds.SOPClassUID = "anat_T1w_acq_tfl", "MR", ENHANCED_MR
        ds.ImageType, ds.MRAcquisitionType = ["ORIGINAL", "PRIMARY", "M", "NONE"], "3D"
        measures = Dataset()
        measures.PixelMeasuresSequence = [Dataset()]
        measures.PixelMeasuresSequence[0].SliceThickness = 1.0
        measures.PixelMeasuresSequence[0].PixelSpacing = [1.0, 1.0]
        setattr(ds, where, [measures])
        return ds

    for where in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        series = SeriesAttributes.from_dataset(enhanced(where))
        assert series.slice_thickness == 1.0
        rule = decide(series).rule
        assert rule is not None and rule.name == "real-3d-t1"


def test_missing_model_is_not_installed() -> None:
    decision = decide(attrs("t1_fl2d_sag"), installed_models=set())
    assert not decision.processed
    assert decision.reason == "not processed: model 'synth-t1-t1-2d' not installed (rule 't1-2d')"
    assert decision.trace[-1] == "rule 't1-2d': matches, but model 'synth-t1-t1-2d' is not installed"


def test_volumetry_needs_its_segmentation_model() -> None:
    decision = decide(attrs("SAG MPRAGE", MRAcquisitionType="3D", SliceThickness=1.0), installed_models=set())
    assert decision.reason == "not processed: model 'brainchop-aparc-aseg' not installed (rule 'real-3d-t1')"
    # a synthesis rule with volumetry needs both its model and the segmenter
    decision = decide(attrs("t1_fl2d_sag"), installed_models={"synth-t1-t1-2d"})
    assert decision.reason == "not processed: model 'brainchop-aparc-aseg' not installed (rule 't1-2d')"
    # without a segmenter, a volumetry rule is measured by its own model
    legacy = NodeConfig(inference={"segmenter": ""}, rules=[Rule(
        name="r", series_description="mprage", action="volumetry", model="synth-t1", output_name="rT1")])
    assert legacy.models_for(legacy.rules[0]) == ["synth-t1"]
    assert not route(legacy, attrs("MPRAGE"), SERIES_UID, installed_models={"brainchop-aparc-aseg"}).processed


def test_installed_models_none_skips_the_check() -> None:
    assert route(NodeConfig(), attrs("t1_fl2d_sag"), SERIES_UID).processed


# -- matchers of custom rules ------------------------------------------------------------------

def _config(**rule: Any) -> NodeConfig:
    fields = dict(name="custom", series_description="t1", model="synth-t1", output_name="sT1")
    fields.update(rule)
    return NodeConfig(rules=[Rule(**fields)])


def test_manufacturer_matcher() -> None:
    config = _config(manufacturer="ge|general electric")
    assert not decide(attrs("t1"), config).processed
    assert decide(attrs("t1", Manufacturer="GE MEDICAL SYSTEMS"), config).processed


def test_calling_ae_matcher() -> None:
    config = _config(calling_ae=["MR1"])
    assert decide(attrs("t1"), config, calling_ae="MR1").processed
    decision = decide(attrs("t1"), config, calling_ae="MR2")
    assert decision.trace == ["rule 'custom': no (calling AE 'MR2' not in ['MR1'])"]


def test_description_excludes_and_other_tag_matchers() -> None:
    config = _config(series_description_excludes="_nd$", body_part_examined="^$|head",
                     protocol_name="^t1", study_description="brain|head")
    ok = {"ProtocolName": "t1_fl2d_sag", "StudyDescription": "MRT Head"}
    assert decide(attrs("t1", **ok), config).processed
    assert decide(attrs("t1", BodyPartExamined="HEAD", **ok), config).processed
    assert decide(attrs("t1_ND", **ok), config).trace == [
        "rule 'custom': no (SeriesDescription 't1_ND' matches the excluded /_nd$/i)"]
    assert decide(attrs("t1", BodyPartExamined="KNEE", **ok), config).trace == [
        "rule 'custom': no (BodyPartExamined 'KNEE' does not match /^$|head/i)"]
    assert "ProtocolName 'localizer' does not match" in decide(
        attrs("t1", **{**ok, "ProtocolName": "localizer"}), config).trace[0]
    assert "StudyDescription 'MRT Knie' does not match" in decide(
        attrs("t1", **{**ok, "StudyDescription": "MRT Knie"}), config).trace[0]


def test_body_part_is_read_from_the_header_and_kept_in_the_journal() -> None:
    ds = Dataset()
    ds.BodyPartExamined = "LSPINE"
    attributes = SeriesAttributes.from_dataset(ds)
    assert attributes.body_part_examined == "LSPINE"
    assert SeriesAttributes.from_json(attributes.to_json()).body_part_examined == "LSPINE"
    # a series journaled before the attribute was kept: no body part, as a scanner that leaves it empty
    assert SeriesAttributes.from_json({"SeriesDescription": "t1"}).body_part_examined == ""


def test_image_type_matchers_are_case_insensitive() -> None:
    config = _config(image_type=["original", "m"], image_type_excludes=["NORM"])
    assert not decide(attrs("t1"), config).processed  # has NORM
    assert decide(attrs("t1", ImageType=["ORIGINAL", "PRIMARY", "M"]), config).processed
    lacking = decide(attrs("t1", ImageType=["ORIGINAL", "PRIMARY"]), config)
    assert "lacks ['m']" in lacking.trace[0]


def test_modality_matcher_can_be_switched_off() -> None:
    assert not decide(attrs("t1", Modality="OT"), _config()).processed
    assert decide(attrs("t1", Modality="OT"), _config(modality=None)).processed


def test_first_matching_rule_wins() -> None:
    config = NodeConfig(rules=[
        Rule(name="a", series_description="t1", model="m1", output_name="A"),
        Rule(name="b", series_description="t1", model="m2", output_name="B"),
    ])
    installed = {"m1", "m2", "brainchop-aparc-aseg"}
    assert route(config, attrs("t1"), SERIES_UID, installed_models=installed).rule.name == "a"
