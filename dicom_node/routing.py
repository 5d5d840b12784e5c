"""Routing: the loop guard, then the first rule whose every matcher holds.

Every decision carries a human-readable explanation; ``dicom-node route --dry-run`` prints them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import MANUFACTURER, MODEL_NAME
from .config import NodeConfig, Rule
from .headers import SeriesAttributes

#: Storage SOP classes that are routed (everything else is stored only).
ROUTABLE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
}


@dataclass(frozen=True)
class Decision:
    """Where a series goes: ``rule`` is None when it is not processed; ``reason`` says why."""

    rule: Rule | None
    reason: str
    #: One line per rule tried: why it matched or not (for --dry-run).
    trace: list[str] = field(default_factory=list)

    @property
    def processed(self) -> bool:
        return self.rule is not None


def loop_guard(attrs: SeriesAttributes, series_uid: str, *, uid_root: str | None,
               is_produced: Callable[[str], bool] | None = None) -> str | None:
    """Why a series must never be processed (the node's own output, a reformat), or None."""
    if attrs.manufacturer == MANUFACTURER and attrs.manufacturer_model_name == MODEL_NAME:
        return f"written by this node (Manufacturer {MANUFACTURER!r}, model {MODEL_NAME!r})"
    if uid_root and (series_uid.startswith(uid_root) or attrs.sop_instance_uid.startswith(uid_root)):
        return f"UID under this node's root {uid_root}"
    if is_produced is not None and is_produced(series_uid):
        return "a series this node produced (journal)"
    image_type = [v.upper() for v in attrs.image_type]
    if image_type and image_type[0] == "DERIVED":
        kind = "scanner reformat" if "MPR" in image_type or "PROJECTION IMAGE" in image_type else "derived image"
        return f"{kind} (ImageType {chr(92).join(image_type)}): only original acquisitions are processed"
    return None


def _match_rule(rule: Rule, attrs: SeriesAttributes, calling_ae: str) -> str | None:
    """None when every matcher holds, else the first one that does not."""
    description = attrs.series_description
    if not re.search(rule.series_description, description, flags=re.IGNORECASE):
        return f"SeriesDescription {description!r} does not match /{rule.series_description}/i"
    excludes = rule.series_description_excludes
    if excludes and re.search(excludes, description, flags=re.IGNORECASE):
        return f"SeriesDescription {description!r} matches the excluded /{excludes}/i"
    for pattern, keyword, value in ((rule.body_part_examined, "BodyPartExamined", attrs.body_part_examined),
                                    (rule.protocol_name, "ProtocolName", attrs.protocol_name),
                                    (rule.study_description, "StudyDescription", attrs.study_description)):
        if pattern is not None and not re.search(pattern, value, flags=re.IGNORECASE):
            return f"{keyword} {value!r} does not match /{pattern}/i"
    modality = attrs.modality
    if rule.modality and modality.upper() != rule.modality.upper():
        return f"Modality {modality!r} is not {rule.modality!r}"
    image_type = {v.upper() for v in attrs.image_type}
    missing = [v for v in rule.image_type if v.upper() not in image_type]
    if missing:
        return f"ImageType {sorted(image_type)} lacks {missing}"
    present = [v for v in rule.image_type_excludes if v.upper() in image_type]
    if present:
        return f"ImageType has excluded {present}"
    acq = attrs.mr_acquisition_type
    if rule.mr_acquisition_type and acq.upper() != rule.mr_acquisition_type:
        return f"MRAcquisitionType {acq or '(absent)'!r} is not {rule.mr_acquisition_type!r}"
    thickness = attrs.slice_thickness
    if rule.slice_thickness_min is not None or rule.slice_thickness_max is not None:
        if thickness is None:
            return "SliceThickness is absent"
        if rule.slice_thickness_min is not None and thickness < rule.slice_thickness_min:
            return f"SliceThickness {thickness} < {rule.slice_thickness_min}"
        if rule.slice_thickness_max is not None and thickness > rule.slice_thickness_max:
            return f"SliceThickness {thickness} > {rule.slice_thickness_max}"
    manufacturer = attrs.manufacturer
    if rule.manufacturer and not re.search(rule.manufacturer, manufacturer, flags=re.IGNORECASE):
        return f"Manufacturer {manufacturer!r} does not match /{rule.manufacturer}/i"
    if rule.calling_ae and calling_ae not in rule.calling_ae:
        return f"calling AE {calling_ae!r} not in {rule.calling_ae}"
    return None


def route(
    config: NodeConfig,
    attrs: SeriesAttributes,
    series_uid: str,
    *,
    calling_ae: str = "",
    installed_models: set[str] | None = None,
    is_produced: Callable[[str], bool] | None = None,
) -> Decision:
    """Decide what happens to a complete series.

    ``installed_models``: when given, a rule whose model is missing is skipped with a reason.
    """
    guard = loop_guard(attrs, series_uid, uid_root=config.node.uid_root, is_produced=is_produced)
    if guard:
        return Decision(None, f"not processed: {guard}")
    sop_class = attrs.sop_class_uid
    if sop_class not in ROUTABLE_SOP_CLASSES:
        return Decision(None, f"stored only: SOP class {sop_class} is not routed (only MR images are)")
    trace: list[str] = []
    for rule in config.rules:
        why_not = _match_rule(rule, attrs, calling_ae)
        if why_not:
            trace.append(f"rule {rule.name!r}: no ({why_not})")
            continue
        missing = [m for m in config.models_for(rule) if installed_models is not None and m not in installed_models]
        if missing:
            trace.append(f"rule {rule.name!r}: matches, but model {missing[0]!r} is not installed")
            return Decision(None, f"not processed: model {missing[0]!r} not installed (rule {rule.name!r})", trace)
        trace.append(f"rule {rule.name!r}: MATCH")
        what = f"synthesize {rule.output_name} with model {rule.model}" if rule.action == "synthesize" \
            else f"volumetry of the real 3D T1 ({rule.output_name})"
        return Decision(rule, f"rule {rule.name!r}: {what}", trace)
    return Decision(None, "not processed: no rule matches", trace)
