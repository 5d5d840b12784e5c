"""End-to-end tests against real DICOM peers: dcmtk, Orthanc and dicom3tools."""
