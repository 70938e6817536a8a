"""The one error type for refusals a user can act on, raised at every layer.

The message names the problem and the fix; `status` is the HTTP answer the API gives for it
(serve/api.py has the one handler), and the UIs and the CLI show the message as it is.
Failures of the infrastructure (vLLM down, a crashed training child) are not refusals.
This module imports nothing from the project, so every layer can raise it.
"""

from __future__ import annotations


class Refused(ValueError):
    status: int = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
