"""`refcal report RUN_DIR` on a real (tiny) run: one self-contained page whose plots decode and whose
tables have rows when opened in headless Chromium; on a run in progress it names what is missing."""

from __future__ import annotations

import json
import shutil

from browser import rendered

from refcal.train import cli

SECTIONS = ["Run", "Geometry", "Training", "Evaluation"]


def test_report_renders_every_plot_and_table_in_chromium(e2e, tmp_path, capsys):
    _, run_dir, _ = e2e
    out = tmp_path / "report.html"
    cli.main(["report", str(run_dir), "--out", str(out)])
    page = out.read_text(encoding="utf-8")
    assert 'src="http' not in page and "<link" not in page  # self-contained: nothing fetched
    shown = rendered(out)
    assert shown["sections"] == SECTIONS
    alts = [image["alt"] for image in shown["images"]]
    assert alts == [
        "layer choice",
        "projection on the harmful direction",
        "training curves",
        "refusal before and after",
    ]
    assert all(image["width"] > 200 and image["height"] > 100 for image in shown["images"]), shown["images"]
    assert len(shown["tables"]) >= 6 and all(rows > 0 for rows in shown["tables"])
    for term in ("loss/keep", "loss/collapse", "loss/retain"):  # every loss term's first and last value
        assert f"<td>{term}</td>" in page


def test_report_of_a_run_in_progress_names_the_missing_stages(e2e, tmp_path):
    _, run_dir, _ = e2e
    partial = tmp_path / "partial"
    for stage in ("data", "geometry"):
        shutil.copytree(run_dir / stage, partial / stage)
    cli.main(["report", str(partial)])
    shown = rendered(partial / "report.html")
    assert shown["sections"] == SECTIONS and [i["alt"] for i in shown["images"]] == [
        "layer choice",
        "projection on the harmful direction",
    ]
    page = (partial / "report.html").read_text()
    assert "the train stage has not written it yet" in page and "the eval stage has not written it yet" in page


def test_report_of_no_run_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="no such run folder"):
        cli.main(["report", str(tmp_path / "nothing")])


def test_every_logged_term_gets_a_curve_dpo_included(tmp_path):
    from refcal.train.reports.html_page import render

    history = [
        {
            "loss": 0.7 - 0.1 * s,
            "rewards/chosen": 0.1 * s,
            "rewards/margins": 0.2 * s,
            "loss/keep": 0.01,
            "grad_norm": 1.0,
            "step": s,
        }
        for s in (1, 2, 3)
    ] + [{"train_runtime": 9.0, "step": 3}]  # the summary entry: no curve
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "log_history.json").write_text(json.dumps(history))
    page = render(tmp_path)
    for term in ("loss", "rewards/chosen", "rewards/margins", "loss/keep"):
        assert f"<td>{term}</td>" in page
    assert "<td>grad_norm</td>" not in page and "<td>train_runtime</td>" not in page
    assert page.count('alt="training curves"') == 1
