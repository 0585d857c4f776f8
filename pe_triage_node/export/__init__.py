"""Results out: the TID 1500 SR, the Secondary Captures, the key images (KOS), HL7 v2 and FHIR, and their export.

* :mod:`.identity` - derived UIDs (per series generation and model version), algorithm identity, the disclaimer wording
* :mod:`.source` - the source attributes the outputs copy, by name; library warnings logged without their text
* :mod:`.sr` - Comprehensive 3D SR, TID 1500 measurement report (highdicom)
* :mod:`.sc` - Grad-CAM overlays and the summary image (SC Image IOD, PS3.3 A.8.1)
* :mod:`.kos` - Key Object Selection: the source slices behind the Grad-CAM maps (PS3.3 A.35.4)
* :mod:`.outputs` - ``render_outputs`` / ``write_outputs`` for one result, ``standalone_triage``
* :mod:`.record` - ``ResultRecord``: a stored result with its patient and order, what HL7 and FHIR are built from
* :mod:`.hl7` - HL7 v2.5.1 ORU^R01 (``build_oru``) and its MLLP sender
* :mod:`.fhir` - FHIR R4 transaction Bundle (``build_bundle``) and its HTTP sender
* :mod:`.messages` - the ORU and the Bundle as files (``pe-triage infer --outputs``)
* :mod:`.delivery` - ``Delivery``: delivered / retry / dead, what every sender answers
* :mod:`.sender` - C-STORE SCU to one destination
* :mod:`.dicomweb` - STOW-RS to one DICOMweb destination
* :mod:`.exporter` - ``enqueue_exports``, the ``Exporter`` loop (dispatch by destination kind, retries, dead-letter, webhook)

Sub-modules are imported where used, so importing this package stays cheap.
"""
