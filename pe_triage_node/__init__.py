"""PE triage node: DICOM CTPA triage for suspected pulmonary embolism. Not for diagnostic use."""
__version__ = "0.1.0"
