"""`refcal chat --adapter DIR`: try a calibrated model in the terminal, with the uncalibrated model's answer
beside it on request.

    refcal chat --adapter runs/demo/export/adapter            # the calibrated model
    refcal chat --adapter runs/demo/export/adapter --compare  # and the model without the adapter

In the chat, `/compare` toggles the side-by-side answer and `/quit` (or Ctrl-D) ends it. Greedy decoding,
one turn at a time (no history: refusal calibration is about single requests).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from refcal.calibration.generation import generate


def load_calibrated(adapter: str | Path, trust_remote_code: bool = False):
    """The model the adapter was calibrated on (from its card) with the adapter attached."""
    from peft import PeftModel

    from refcal.calibration.models import default_device, fingerprint, load_model
    from refcal.train.retrain import check_adapter_base

    card_path = Path(adapter) / "calibration_card.json"
    if not card_path.is_file():
        raise SystemExit(
            f"refcal chat: {adapter} has no calibration_card.json: give a folder written by `refcal export`"
        )
    card = json.loads(card_path.read_text())
    model, tokenizer = load_model(card["calibrated_model"], "auto", trust_remote_code, device=default_device())
    check_adapter_base(str(adapter), fingerprint(model))  # the model at that path may have changed since
    return PeftModel.from_pretrained(model, adapter).eval(), tokenizer


def chat(model, tokenizer, compare: bool, max_new_tokens: int, read: Callable[[], str], console: Console) -> None:
    while True:
        try:
            prompt = read().strip()
        except EOFError:
            return
        if prompt in ("/quit", "/exit"):
            return
        if prompt == "/compare":
            compare = not compare
            console.print(f"[dim]side-by-side answer of the model without the adapter: {'on' if compare else 'off'}[/]")
            continue
        if not prompt:
            continue
        answer = generate(model, tokenizer, [prompt], max_new_tokens, 1, progress=False)[0]
        if not compare:
            console.print(f"[bold green]calibrated[/] {answer}")
            continue
        with model.disable_adapter():
            before = generate(model, tokenizer, [prompt], max_new_tokens, 1, progress=False)[0]
        table = Table(show_header=True, expand=True)
        table.add_column("calibrated", style="green")
        table.add_column("without the adapter", style="yellow")
        table.add_row(answer, before)
        console.print(table)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="refcal chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", required=True, help="An adapter folder written by `refcal export`.")
    parser.add_argument("--compare", action="store_true", help="Also show the answer of the model without the adapter.")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Tokens generated per answer.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the model's own code (off by default).")
    args = parser.parse_args(argv)
    console = Console()
    model, tokenizer = load_calibrated(args.adapter, args.trust_remote_code)
    console.print("[dim]refcal chat: /compare toggles the answer without the adapter, /quit ends.[/]")
    chat(model, tokenizer, args.compare, args.max_new_tokens, lambda: console.input("[bold]you> [/]"), console)
