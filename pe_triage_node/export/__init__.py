"""Results back to PACS: the TID 1500 SR, the Secondary Captures, and their export.

* :mod:`.identity` - derived UIDs (per series generation and model version), algorithm identity, the disclaimer wording
* :mod:`.source` - the source attributes the outputs copy, by name; library warnings logged without their text
* :mod:`.sr` - Comprehensive 3D SR, TID 1500 measurement report (highdicom)
* :mod:`.sc` - Grad-CAM overlays and the summary image (SC Image IOD, PS3.3 A.8.1)
* :mod:`.outputs` - ``render_outputs`` / ``write_outputs`` for one result, ``standalone_triage``
* :mod:`.sender` - C-STORE SCU to one destination
* :mod:`.exporter` - ``enqueue_exports``, the ``Exporter`` loop (retries, dead-letter, webhook)

Sub-modules are imported where used, so importing this package stays cheap.
"""
