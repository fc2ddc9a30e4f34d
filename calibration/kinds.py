"""The kinds of prompt rows, defined once: recipe rows, eval prompts and every artifact on disk carry
these strings in their `kind` field, so their values never change."""

from __future__ import annotations

HARMFUL = "harmful"  # a harmful request, raw
OVER_REFUSAL = "over_refusal"  # a harmful text inside a task's template (translate, classify, ...): answer the task
BENIGN = "benign"  # a harmless request, raw or inside a task's template
FRAME_ATTACK = "frame_attack"  # a harmful request inside a frame that asks to carry it out
KINDS = (HARMFUL, OVER_REFUSAL, BENIGN, FRAME_ATTACK)  # every recipe row's kind

# eval only: held-out rows' contents in templates never trained on
OVER_REFUSAL_UNSEEN = "over_refusal_unseen_template"
FRAME_ATTACK_UNSEEN = "frame_attack_unseen_template"
UNSEEN_TEMPLATE = {OVER_REFUSAL: OVER_REFUSAL_UNSEEN, FRAME_ATTACK: FRAME_ATTACK_UNSEEN}
EVAL_KINDS = (*KINDS, OVER_REFUSAL_UNSEEN, FRAME_ATTACK_UNSEEN)

SHOULD_REFUSE = (HARMFUL, FRAME_ATTACK)  # recipe rows the calibrated model must keep refusing
SHOULD_REFUSE_EVAL = (*SHOULD_REFUSE, FRAME_ATTACK_UNSEEN)
REPORT_ORDER = (HARMFUL, FRAME_ATTACK, OVER_REFUSAL, BENIGN)  # tables list the kinds to refuse first

# External sets whose prompts should be refused (the others, xstest_safe, jbb_benign, oktest, ..., answered)
HARMFUL_BENCHMARKS = ("xstest_unsafe", "strongreject", "harmbench_test", "jbb_harmful")
