"""The searches' REST routes (``/api/searches``): start one, list them, follow one,
cancel one. As for jobs, a user sees only their own team's searches, and another team's
search answers 404, exactly as one that does not exist.

A search is validated whole at submit (its job, its space against the job, its
settings; the job's data are opened), so a space that names no field, an empty range or
missing data is a 422 in one line before any trial runs. Its trials are jobs of the
submitting user, under the team's quota: each is refused at submit if it could never
fit, so a search whose trial is too large for the quota is refused here too.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, HTTPException, Request, status

from corral.errors import SpecError
from corral.search.driver import SearchRequest
from corral.service import submission
from corral.service.auth import CurrentUser
from corral.service.models import Problem, SearchDetail, SearchOut
from corral.service.searches import (
    Search,
    SearchExists,
    SearchStore,
    search_detail,
    search_out,
)
from corral.service.store import User

_SEARCH_ID = re.compile(r"[0-9a-f]{12}")


def visible_search(searches: SearchStore, user: User, search_id: str) -> Search:
    """The search, if `user` may see it; otherwise the same 404 as for none at all."""
    found = searches.get(search_id) if _SEARCH_ID.fullmatch(search_id) else None
    if found is None or (found.team != user.team and not user.admin):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no search '{search_id}'")
    return found


def _admitted(request: Request, user: User, search: SearchRequest) -> SearchRequest:
    """The search, if its trials' data open and the team could run them."""
    try:
        submission.admit(request.app.state.store, request.app.state.pool, user, search.spec)
    except SpecError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return search


def search_router() -> APIRouter:
    api = APIRouter(prefix="/api")

    def searches_of(request: Request) -> SearchStore:
        return SearchStore(request.app.state.store)

    @api.post(
        "/searches",
        status_code=status.HTTP_201_CREATED,
        responses={
            409: {"model": Problem, "description": "that name holds another search"},
            422: {"model": Problem, "description": "invalid search, or refused"},
        },
    )
    def start(body: SearchRequest, user: CurrentUser, request: Request) -> SearchDetail:
        """Start a search: ``{"spec": job, "space": {...}, "settings": {...}}``. The same
        search (name and request) again answers the one it started."""
        searches = searches_of(request)
        try:
            made, _ = searches.create(user, _admitted(request, user, body))
        except SearchExists as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return search_detail(searches, made)

    @api.get("/searches")
    def listed(user: CurrentUser, request: Request) -> list[SearchOut]:
        team = None if user.admin else user.team
        return [search_out(s) for s in searches_of(request).list(team=team)]

    @api.get("/searches/{search_id}")
    def detail(search_id: str, user: CurrentUser, request: Request) -> SearchDetail:
        searches = searches_of(request)
        return search_detail(searches, visible_search(searches, user, search_id))

    @api.post("/searches/{search_id}/cancel")
    def cancel(search_id: str, user: CurrentUser, request: Request) -> SearchOut:
        """Stop the search and its running trials (at the driver's next pass)."""
        searches = searches_of(request)
        found = visible_search(searches, user, search_id)
        if not found.final:
            searches.request_cancel(found.id)
        return search_out(searches.get(found.id) or found)

    return api
