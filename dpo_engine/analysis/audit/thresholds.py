"""Every threshold of the data audit, in one place (METHOD.md 1.5 says why each sits where it does)."""

from __future__ import annotations

# Intervals are two-sided at this level.
CONFIDENCE = 0.95
# Length bias is flagged when the interval of "chosen is the longer one" excludes 50 % by this much:
# its lower bound above 0.5 + margin or its upper bound below 0.5 - margin.
LENGTH_BIAS_MARGIN = 0.05
# Two different prompts are near-duplicates from this cosine of their sentence embeddings on.
NEAR_DUPLICATE_PROMPT_COSINE = 0.95
# Chosen and rejected responses are near-identical from this cosine on.
NEAR_IDENTICAL_RESPONSE_COSINE = 0.98
# The length-difference histogram: bins, and the share of pairs cut from each tail of its range.
HISTOGRAM_BINS = 60
HISTOGRAM_TAIL = 0.005
# Label noise: the log-prob signal scores at most this many pairs (a seeded sample of larger sets) ...
LABEL_NOISE_MAX_PAIRS = 2000
# ... and the audit lists this many top-ranked pairs.
LABEL_NOISE_FLAGGED = 50
# A signal is shown only if its measured top-k precision's lower bound exceeds random precision times this.
LABEL_NOISE_LIFT = 1.5
# Per-group breakdown (category / source column): a group gets its own row from this many pairs on;
# smaller groups are pooled into one "other" row, which lists them.
MIN_GROUP_PAIRS = 20
