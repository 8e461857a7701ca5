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
