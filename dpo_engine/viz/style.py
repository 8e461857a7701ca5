"""One colour scheme for every figure of the product (chosen = green, rejected = red)."""

CHOSEN_COLOR = "#2ca02c"
REJECTED_COLOR = "#d62728"
PROMPT_COLOR = "#1f77b4"
