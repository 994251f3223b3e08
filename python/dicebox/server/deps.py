"""Route dependencies: the services and the API-key check, as typed aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from dicebox.errors import Unauthorized
from dicebox.server.services import Services


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def require_key(request: Request) -> None:
    """``Authorization: Bearer KEY`` or ``API-ACCESS-KEY: KEY`` (the original header).

    Without a configured key every request passes: the server then listens on loopback only
    (enforced by Settings). Keys are compared in constant time and never logged or echoed.
    Async on purpose: it does no I/O, and a sync dependency costs a thread-pool round trip
    on every request.
    """
    expected = request.app.state.services.settings.api_key
    if expected is None:
        return
    given = request.headers.get("api-access-key")
    if given is None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
    if given is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer KEY' or 'API-ACCESS-KEY: KEY'")
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("invalid API key")


Authorized = [Depends(require_key)]
