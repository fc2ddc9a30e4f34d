"""Would a judge that reads a model's hidden states tell `did_task` from `other` better than refcal's rules?

The answer-class rules (train/reports/answer_classes.py) miss mostly on one boundary: benign-side answers
that the hand calls `other` (an on-topic opening that does not yet take the question up) and the rules
call `did_task`. This checks the cheapest model-based judge at hand, a logistic probe on the embedded
SmolLM2-135M-Instruct's residual stream over (prompt, answer): the mean over the answer's tokens and its
last token, at a middle and the last layer. It is fitted and scored by 5-fold cross-validation grouped by
prompt on every hand-labelled row the rules send to `did_task` or `other` (bench/results/answer_labels.jsonl),
with the rules' own verdict as one more feature. The rules were written on most of these rows, so their
agreement on all of them is in sample; their out-of-sample figure is the same rows' share of the blind
score half, which the probe's cross-validated agreement is to be set beside.

    python -m bench.answer_probe      # about 1 minute on 2 CPU cores; prints and writes nothing else
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.answer_labels import SMOLLM2, agreement_table, read_labels, refcal_classifier, side, without_labels
from refcal.calibration.activations import chat_prompts
from refcal.calibration.evaluation import wilson_rate


@torch.inference_mode()
def hidden_features(rows: list[dict], layers: list[int]) -> np.ndarray:
    from refcal.calibration.models import load_model

    model, tokenizer = load_model(SMOLLM2, dtype="float32")
    features = []
    for row in rows:
        prompt = tokenizer(chat_prompts(tokenizer, [row["prompt"]])[0], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        states = model(torch.tensor([prompt + answer]), output_hidden_states=True).hidden_states
        features.append(torch.cat([s for i in layers for s in (states[i][0, len(prompt) :].mean(0), states[i][0, -1])]))
    return torch.stack(features).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[15, 29])
    parser.add_argument("--C", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    args = parser.parse_args()

    from refcal.calibration.judges.learned import LearnedJudge
    from refcal.data_recipes.sources import default_data_root

    rows = read_labels()
    classify = refcal_classifier(LearnedJudge.from_xstest(default_data_root()))
    rules = [classify(without_labels(r)) for r in rows]
    domain = [i for i, r in enumerate(rows) if side(r) == "benign" and rules[i] in ("did_task", "other")]
    hand = np.array([rows[i]["answer_class"] == "did_task" for i in domain])
    said = np.array([rules[i] == "did_task" for i in domain])
    features = np.hstack([hidden_features([rows[i] for i in domain], args.layers), said[:, None].astype(float)])
    prompts = [rows[i]["prompt"] for i in domain]

    def agreement(classes: list[str], among: list[int] = domain) -> dict:
        """On the rows `among` (the domain by default), then on every row overall and per model."""
        hits = [c == r["answer_class"] for c, r in zip(classes, rows)]
        return {"domain": wilson_rate(sum(hits[i] for i in among), len(among)), **agreement_table(hits, rows)}

    blind = [i for i in domain if rows[i]["half"] == "score"]
    result = {
        "rows": len(domain),
        "layers": args.layers,
        "rules (in sample)": agreement(rules),
        "rules on the blind score half's domain rows": agreement(rules, blind)["domain"],
        "probe": {},
    }
    for c in args.C:
        predicted = np.zeros(len(domain), bool)
        for fit, held in GroupKFold(n_splits=5).split(features, hand, prompts):
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
            predicted[held] = probe.fit(features[fit], hand[fit]).predict(features[held])
        classes = list(rules)
        for k, i in enumerate(domain):
            classes[i] = "did_task" if predicted[k] else "other"
        result["probe"][f"C={c}"] = agreement(classes)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
