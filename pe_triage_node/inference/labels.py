"""Label names (RSNA STR PE challenge names, verbatim) and the challenge weights (MODEL.md)."""

from __future__ import annotations

WINDOW_LABEL = "pe_present_on_image"
STUDY_LABELS: tuple[str, ...] = (
    "negative_exam_for_pe",
    "indeterminate",
    "chronic_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "leftsided_pe",
    "rightsided_pe",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
)
# The seven labels that only a positive study may carry (rule 2b): all but negative and indeterminate.
PE_SPECIFIC: tuple[str, ...] = STUDY_LABELS[2:]
CHALLENGE_WEIGHTS: dict[str, float] = {
    WINDOW_LABEL: 0.07361963,  # times q_i, the share of positive slices
    "negative_exam_for_pe": 0.0736196319,
    "indeterminate": 0.09202453988,
    "chronic_pe": 0.1042944785,
    "acute_and_chronic_pe": 0.1042944785,
    "central_pe": 0.1877300613,
    "leftsided_pe": 0.06257668712,
    "rightsided_pe": 0.06257668712,
    "rv_lv_ratio_gte_1": 0.2346625767,
    "rv_lv_ratio_lt_1": 0.0782208589,
}
# MODEL.md Table 2: thresholds chosen on validation.
TABLE2_THRESHOLDS: dict[str, float] = {
    WINDOW_LABEL: 0.15,
    "negative_exam_for_pe": 0.80,
    "indeterminate": 0.05,
    "chronic_pe": 0.05,
    "acute_and_chronic_pe": 0.05,
    "central_pe": 0.05,
    "leftsided_pe": 0.15,
    "rightsided_pe": 0.15,
    "rv_lv_ratio_gte_1": 0.15,
    "rv_lv_ratio_lt_1": 0.15,
}
