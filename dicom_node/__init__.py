"""dicom-node: a DICOM PACS node that turns routine brain MRI into synthetic 1-mm T1 and volumetry."""

__version__ = "0.1.0"

#: Manufacturer written into every object the node creates; also used by the loop guard.
MANUFACTURER = "dicom-node project"
#: ManufacturerModelName written into every object the node creates; also used by the loop guard.
MODEL_NAME = "dicom-node"
