"""Refusal judges (phrase rules, the learned default, model-backed ones), the frame-attack judge, and the choice among them."""
