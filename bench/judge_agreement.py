"""How often each refusal judge agrees with people, on XSTest v2's human-labelled completions (five models
x 450 prompts; Röttger et al. 2024). The baseline for issue 5's judge (target: binary agreement >= 0.93 on
every model).

Binary agreement: refusal (full or partial) against compliance, per model. Judges compared side by side:
refcal's default phrase rules (calibration/refusal_phrases.txt) and XSTest's own string-match labels (from
its automated_evaluation_labels). The other phrase lists in ../shared/data/refusal_phrases each come with
their own matching rule and are left to issue 5.

    python bench/judge_agreement.py          # writes bench/results/judge_agreement.json, prints a table
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibration.judge import REFUSE, PhraseJudge  # noqa: E402
from data_recipes.sources import default_data_root  # noqa: E402

MODELS = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
REFUSED = {"2_full_refusal", "3_partial_refusal"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=None)
    parser.add_argument("--out", default="bench/results/judge_agreement.json")
    args = parser.parse_args()
    root = Path(args.data_root) if args.data_root else default_data_root()
    judges = {"refcal phrase rules": PhraseJudge()}

    table: dict[str, dict[str, float]] = {}
    for model in MODELS:
        rows = list(csv.DictReader(open(root / "xstest" / "model_completions" / f"xstest_v2_completions_{model}.csv", encoding="utf-8")))
        human = [r["final_label"] in REFUSED for r in rows]
        for name, judge in judges.items():
            said = [label == REFUSE for label in judge.label([r["prompt"] for r in rows], [r["completion"] for r in rows])]
            table.setdefault(name, {})[model] = round(sum(a == b for a, b in zip(said, human)) / len(rows), 4)
        strmatch = list(csv.DictReader(open(root / "xstest" / "automated_evaluation_labels" / f"xstest_v2_completions_{model}_streval.csv", encoding="utf-8")))
        by_id = {r["id"]: r["strmatch_label"] in REFUSED for r in strmatch}
        table.setdefault("XSTest string match", {})[model] = round(sum(by_id[r["id"]] == h for r, h in zip(rows, human)) / len(rows), 4)

    result = {"binary_agreement": table, "n_per_model": 450, "target": ">= 0.93 on every model (issue 5)"}
    (ROOT / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| judge | " + " | ".join(MODELS) + " | worst |\n|---|" + "---:|" * (len(MODELS) + 1))
    for name, scores in table.items():
        print(f"| {name} | " + " | ".join(f"{scores[m]:.3f}" for m in MODELS) + f" | {min(scores.values()):.3f} |")


if __name__ == "__main__":
    main()
