"""A client's request id: checked before it goes into every log line and trace of the request."""

from __future__ import annotations

import re

from pdserve.common.errors import InvalidRequestError

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces: it goes into every log line


def check_request_id(request_id: str, in_flight: set[str]) -> str:
    """A client's request id, if it may be used ("" if none was given); InvalidRequestError if not."""
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        raise InvalidRequestError("request_id", "must be 1 to 128 printable ASCII characters, without spaces")
    if request_id in in_flight:  # two live requests under one id: logs and traces could not tell them apart
        raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
    return request_id
