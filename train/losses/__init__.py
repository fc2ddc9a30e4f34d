"""The loss terms beside TRL's own loss (onset, geometry regularizer, self-distillation), their table, and the trainers that add them."""
