"""Writers: one module per DICOM object type the node creates (derived MR, SEG, SR, summary)."""

from __future__ import annotations

from typing import Any

import dicom_node


def software_versions(algorithm_name: str, algorithm_version: str) -> list[str]:
    """SoftwareVersions of every object the node writes: the node's and the model's."""
    return [f"dicom-node {dicom_node.__version__}", f"{algorithm_name} {algorithm_version}"]


def equipment(algorithm_name: str, algorithm_version: str) -> dict[str, Any]:
    """General Equipment keyword arguments for highdicom constructors (this node; the loop guard
    recognises its own objects by Manufacturer and ManufacturerModelName)."""
    return {
        "manufacturer": dicom_node.MANUFACTURER,
        "manufacturer_model_name": dicom_node.MODEL_NAME,
        # a list: pydicom rejects a tuple for a multi-valued LO
        "software_versions": software_versions(algorithm_name, algorithm_version),
    }
