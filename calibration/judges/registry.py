"""`build_judge`: the refusal judge a config names, built from the concrete judges
(calibration/judges/phrases.py's phrase rules, calibration/judges/learned.py, calibration/judges/model_backed.py)."""

from __future__ import annotations

from pathlib import Path

from refcal.calibration.judges.phrases import JUDGES, Judge, PhraseJudge


def build_judge(
    kind: str,
    data_root: str | Path | None = None,
    model: str | None = None,
    url: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    trust_remote_code: bool = False,
) -> Judge:
    """The judge a config names; model-backed kinds need `model` (and `url` for http), the learned judge
    needs `data_root` (the folder holding xstest/: the caller resolves it, as the data recipes do)."""
    if kind == "phrases":
        return PhraseJudge()
    if kind == "learned":
        from refcal.calibration.judges.learned import LearnedJudge

        if data_root is None:
            raise ValueError("judge: learned needs data_root, the data folder holding xstest/ (its training labels)")
        return LearnedJudge.from_xstest(data_root)
    if kind not in JUDGES:
        raise ValueError(f"judge: unknown kind {kind!r}; choose one of {', '.join(JUDGES)}")
    if not model:
        raise ValueError(
            f"judge: {kind} needs judge_model (a model reference{' served at judge_url' if kind == 'http' else ''})"
        )
    if kind == "http":
        from refcal.calibration.judges.model_backed import HTTPJudge

        if not url:
            raise ValueError(
                "judge: http needs judge_url, an OpenAI-compatible base URL such as http://127.0.0.1:8000/v1"
            )
        return HTTPJudge(url, model, timeout=timeout, retries=retries)
    from refcal.calibration.judges.model_backed import LocalModelJudge
    from refcal.calibration.models import default_device, load_model

    judge_model, tokenizer = load_model(model, "auto", trust_remote_code, device=default_device())
    return LocalModelJudge(judge_model, tokenizer, model)
