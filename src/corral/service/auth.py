"""Who asks: a bearer token (the CLI, scripts) or the same token in a cookie (the web UI).

Every failure is the same 401, whether the token is missing, malformed or unknown, so a
caller learns nothing about which tokens exist. Tokens never reach a log line: the access
log prints paths, and tokens travel only in headers and cookies.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from starlette.concurrency import run_in_threadpool

from corral.service.store import TOKEN_PREFIX, Store, User

#: The cookie the web UI keeps the token in (HttpOnly, SameSite=Strict).
COOKIE = "corral_token"
_WELL_FORMED = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{20,100}")


def _unauthorized() -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "a valid token is required: corral login, or Authorization: Bearer <token>",
        headers={"WWW-Authenticate": "Bearer"},
    )


def token_of(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return request.cookies.get(COOKIE)


def current_user(request: Request) -> User:
    """The user whose token came with `request`; 401 for anyone else."""
    token = token_of(request)
    if token is None or not _WELL_FORMED.fullmatch(token):
        raise _unauthorized()
    store: Store = request.app.state.store
    user = store.user_by_token(token)
    if user is None:
        raise _unauthorized()
    return user


async def api_user(request: Request) -> User:
    """`current_user` for the API's routes: a token the store knows costs no thread and no
    read (`Store.known_user`); any other goes to the store in a worker thread, as a sync
    dependency would. Same answers, same 401."""
    token = token_of(request)
    if token is None or not _WELL_FORMED.fullmatch(token):
        raise _unauthorized()
    store: Store = request.app.state.store
    user = store.known_user(token) or await run_in_threadpool(store.user_by_token, token)
    if user is None:
        raise _unauthorized()
    return user


async def admin_user(user: Annotated[User, Depends(api_user)]) -> User:
    """The asking user, if an admin; 403 otherwise (they are known, just not allowed)."""
    if not user.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only admins may do this")
    return user


CurrentUser = Annotated[User, Depends(api_user)]
AdminUser = Annotated[User, Depends(admin_user)]
