"""The errors only the HTTP server raises: a request field it cannot use, and what they map to.

They live with the server, not in `q3vl.errors`, because nothing else raises them; the errors a
client of the server also raises (`AuthenticationError`, `OverloadedError`, `UnavailableError`) and
everything the runtime raises stay in `q3vl.errors`. Both kinds derive from `q3vl.errors` types, so
`except InputError` still catches a bad request field.
"""

from __future__ import annotations

from q3vl.errors import InputError, LimitError


class RequestError(InputError):
    """A field of an HTTP request to `q3vl serve` is unusable; `param` names it the way the API does
    (`input[3]`, `inputs[0].content[1].image_url.url`, `dimensions`), so a client can point at it.
    """

    def __init__(self, reason: str, param: str | None = None, index: int | None = None) -> None:
        self.param = param
        super().__init__(reason, index)

    def at(self, index: int) -> InputError:
        err = type(self)(self.reason, self.param, index)
        err.__cause__ = self.__cause__
        return err


class UnknownModelError(RequestError):
    """A request names a model the server does not serve (HTTP 404); the message lists the served ones."""


class RequestTooLargeError(RequestError, LimitError):
    """A request is over a server-wide size limit: items per request or body bytes (HTTP 413)."""
