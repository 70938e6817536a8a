"""What a feedback record may hold: the checks on the fields a user typed, and the one refusal
that recording and curating feedback raise. Pure; recording (record.py) and the review queue
(curation.py) both build on it.
"""

from __future__ import annotations

from typing import Any

from data_store.errors import Refused
from data_store.text import unstorable

UNSET: Any = object()  # "not given": leave the field as it is (None means clear it)
RATINGS = ("up", "down")


class FeedbackError(Refused):
    """400, 403 (not your conversation) or 404 (no such feedback): feedback or curation refused."""


def check(rating: Any, correction: Any, comment: Any, max_chars: int) -> None:
    """Pure validation of the fields given; raises FeedbackError naming the problem."""
    if rating is not UNSET and rating is not None and rating not in RATINGS:
        raise FeedbackError(f"rating is {rating!r}; use 'up', 'down' or null to clear it")
    for field, value in (("correction", correction), ("comment", comment)):
        if value is UNSET or value is None:
            continue
        if not isinstance(value, str):
            raise FeedbackError(f"{field} must be text")
        if len(value) > max_chars:
            raise FeedbackError(f"{field} has {len(value)} characters, above the limit of {max_chars}; shorten it")
        if problem := unstorable(value):
            raise FeedbackError(f"{field} {problem}")
    if isinstance(correction, str) and not correction.strip():
        raise FeedbackError("correction is empty; send the corrected answer, or null to withdraw the correction")
