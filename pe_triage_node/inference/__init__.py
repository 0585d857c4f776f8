"""Inference room: one CT series in, one consistent, explained :class:`StudyResult` out.

Never touches the network or the queue. Modules: ``volume`` (DICOM folder ->
HU volume), ``preprocess`` (MODEL.md preprocessing), ``networks`` (r3d_18, TCN +
attention), ``weights`` (manifest, sha256, loaders, ``save_weights``),
``consistency`` (challenge rules and correction), ``gradcam``, ``result``
(``StudyResult``), ``engine`` (``InferenceEngine``), ``cli`` (``pe-triage infer``).
This package imports no torch at import time; import the modules you need.
"""
