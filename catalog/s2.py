"""The Semantic Scholar Graph API, through the `semanticscholar` client, with faults made explicit.

The client (0.12) hides what a robust caller needs: it retries 429 on its own for minutes, returns
an empty list for 502/503, raises bare JSON errors, never shows the Retry-After header, gives its
timeout to each socket read rather than to the whole request, and builds its Paper objects from
whatever JSON came back (a `tldr` that is a string is a TypeError inside it). So the client's own
HTTP layer is replaced by `_Requester`, which makes one request within a deadline, raises an
`S2Error` that says whether a retry may help and how long the server asked us to wait, and
validates every record (catalog/record.py) before the client sees it. A record that fails is left
out of the answer and listed, with the field at fault, in `S2Client.rejected`.

The retry policy (bounded in attempts and total time, honouring Retry-After) is `RetryPolicy.call`.
A request, its retries included, ends within `total_seconds + timeout` seconds: every attempt has a
deadline of `timeout` for the whole exchange, and no attempt starts after the budget is spent.
"""

import asyncio
import email.utils
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

import httpx
from semanticscholar.ApiRequester import ApiRequester
from semanticscholar.AsyncSemanticScholar import AsyncSemanticScholar
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_before_delay

from catalog.record import Paper, RecordError, parse_paper

DEFAULT_API_URL = "https://api.semanticscholar.org/graph/v1"
BATCH_SIZE = 500  # the API's limit for POST /paper/batch (the client refuses more)
FIELDS = [
    "paperId",
    "corpusId",
    "externalIds",
    "title",
    "abstract",
    "tldr",
    "authors",
    "venue",
    "publicationVenue",
    "year",
    "publicationDate",
    "citationCount",
    "influentialCitationCount",
    "openAccessPdf",
    "url",
    "fieldsOfStudy",
    "citationStyles",
]
SEARCH_LIMIT = 10  # candidates read when looking a title up


class S2Error(Exception):
    """A request failed. `transient` failures (429, 5xx, timeouts, dropped connections, garbled
    answers) may be retried."""

    def __init__(self, message: str, transient: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.transient, self.retry_after = transient, retry_after


class S2Unreachable(S2Error):
    """No connection at all: no network, wrong host, nothing listening."""


class S2NotFound(S2Error):
    """HTTP 404: no such paper (or, for the batch endpoint, no such endpoint: a wrong --api-url)."""


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After (RFC 9110): a number of seconds, or an HTTP-date. None if absent or unreadable."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with no claim about local time
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class _Requester(ApiRequester):
    """One HTTP request per call, within a deadline; every failure raised as an S2Error, every
    record validated (the ones that fail are dropped and listed in `rejected`)."""

    def __init__(self, timeout: float):
        super().__init__(timeout, retry=False)
        self.rejected: dict[str, str] = {}  # for the last answer: asked id (or position) -> why

    async def get_data_async(self, url, parameters, headers, payload=None):
        method = "POST" if payload else "GET"
        self.rejected = {}
        try:
            # One deadline for connecting, sending and reading the whole body: httpx's own timeout
            # is per socket operation, so a server dripping a byte a second would never be cut off.
            async with asyncio.timeout(self.timeout):
                async with httpx.AsyncClient(timeout=self.timeout) as client:
                    response = await client.request(
                        method, url, params=parameters.lstrip("&"), headers=headers, json=payload
                    )
        except (TimeoutError, httpx.TimeoutException) as error:
            raise S2Error(f"{method} {url}: no complete answer within {self.timeout:g} s", transient=True) from error
        except httpx.ConnectError as error:
            raise S2Unreachable(f"cannot reach {url}: {error or type(error).__name__}") from error
        except httpx.TransportError as error:  # connected, then the connection broke (mid-body, say)
            raise S2Error(
                f"{method} {url}: the connection broke off ({error or type(error).__name__})", transient=True
            ) from error
        status = response.status_code
        if status == 404:
            raise S2NotFound(f"{method} {url}: HTTP 404 {_error_text(response)}")
        if status == 429 or status >= 500:
            raise S2Error(
                f"{method} {url}: HTTP {status} {_error_text(response)}",
                transient=True,
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        if status != 200:
            raise S2Error(f"{method} {url}: HTTP {status} {_error_text(response)}")
        try:
            data = response.json()
        except (ValueError, RecursionError) as error:
            raise S2Error(f"{method} {url}: the answer is not valid JSON", transient=True) from error
        return self._validated(method, url, data, payload)

    def _validated(self, method, url, data, payload):
        """The answer with only valid records, in the shape the client expects for this endpoint."""
        if payload:
            # A batch answer is a list aligned with the ids, null where a paper is unknown. Anything
            # else (an empty list, an error object) is a gateway failing politely: worth another try.
            ids = payload["ids"]
            if not isinstance(data, list) or len(data) != len(ids):
                size = f" of {len(data)}" if isinstance(data, (list, dict)) else ""
                raise S2Error(
                    f"{method} {url}: expected a list of {len(ids)} records, got {type(data).__name__}{size}",
                    transient=True,
                )
            return [None if item is None else self._record(item, asked) for item, asked in zip(data, ids)]
        if url.endswith("/paper/search") or url.endswith("/paper/search/match"):
            if not isinstance(data, dict) or not isinstance(data.get("data"), list):
                raise S2Error(
                    f"{method} {url}: expected an object with a 'data' list, got {type(data).__name__}", transient=True
                )
            found = [self._record(item, f"result {number}") for number, item in enumerate(data["data"], start=1)]
            found = [paper for paper in found if paper is not None]
            if url.endswith("/match") and not found:
                if self.rejected:
                    raise S2Error(f"{method} {url}: the record was refused: {self.rejected.popitem()[1]}")
                raise S2NotFound(f"{method} {url}: no title match")
            return {**data, "data": found}
        paper = self._record(data, url.rsplit("/", 1)[-1])
        if paper is None:
            raise S2Error(f"{method} {url}: the record was refused: {self.rejected.popitem()[1]}")
        return paper

    def _record(self, item, asked: str) -> dict | None:
        try:
            return parse_paper(item).to_json()
        except RecordError as error:
            self.rejected[asked] = str(error)
            return None


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return (
            str(body.get("error") or body.get("message") or body)[:200] if isinstance(body, dict) else str(body)[:200]
        )
    except (ValueError, RecursionError):
        return response.text[:200]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff (base, 2·base, 4·base, ... capped), or the server's Retry-After if it sent
    one; at most `attempts` tries, and none that would start after `total_seconds`."""

    attempts: int = 6
    base_seconds: float = 2.0
    max_wait_seconds: float = 60.0
    total_seconds: float = 300.0
    sleep: Callable[[float], None] = time.sleep

    def wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception()
        if getattr(error, "retry_after", None) is not None:
            return error.retry_after  # the server's word; the stop below refuses it if it does not fit
        return min(self.base_seconds * 2 ** (state.attempt_number - 1), self.max_wait_seconds)

    def call(self, function, *args):
        def give_up(state: RetryCallState):
            error = state.outcome.exception()
            if state.attempt_number >= self.attempts:
                raise error
            raise S2Error(
                f"{error}; not retried: the next try, in {state.upcoming_sleep:.0f} s, would end past "
                f"the retry budget of {self.total_seconds:g} s"
            ) from error

        retrying = Retrying(
            retry=retry_if_exception(lambda error: isinstance(error, S2Error) and error.transient),
            stop=stop_after_attempt(self.attempts) | stop_before_delay(self.total_seconds),
            wait=self.wait,
            sleep=self.sleep,
            retry_error_callback=give_up,
        )
        return retrying(function, *args)


@dataclass
class S2Client:
    """The lookups the catalog needs, each retried by the policy. Records are typed `Paper`s;
    `rejected` lists the records of the last answer that failed validation (asked id -> why)."""

    api_url: str = DEFAULT_API_URL
    api_key: str | None = None
    timeout: float = 30.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    requests: int = 0

    def __post_init__(self):
        self.api_url = self.api_url.rstrip("/")
        # The client appends /graph/v1 itself, so it takes only the part before it.
        host = self.api_url.removesuffix("/graph/v1")
        self._client = AsyncSemanticScholar(api_url=host, api_key=self.api_key, timeout=self.timeout, retry=False)
        self._requester = _Requester(self.timeout)
        self._client._requester = self._requester  # see the module docstring

    @property
    def rejected(self) -> dict[str, str]:
        return self._requester.rejected

    def _run(self, coroutine_function):
        def attempt():
            self.requests += 1
            return asyncio.run(coroutine_function())

        return self.policy.call(attempt)

    def get_papers(self, ids: list[str]) -> list[Paper]:
        """The valid records the API found among ids (at most BATCH_SIZE), in no promised order."""

        async def fetch():
            try:
                return [
                    Paper.model_validate(paper.raw_data) for paper in await self._client.get_papers(ids, fields=FIELDS)
                ]
            except S2NotFound as error:
                raise S2Error(
                    f"{error}: the batch endpoint is missing; is the API URL right ({self.api_url})?"
                ) from None

        return self._run(fetch)

    def get_paper(self, paper_id: str) -> Paper | None:
        async def fetch():
            try:
                return Paper.model_validate((await self._client.get_paper(paper_id, fields=FIELDS)).raw_data)
            except S2NotFound:
                return None

        return self._run(fetch)

    # The client puts the query into the URL as it is; quoted, a title with '&' or '#' stays one value.
    def search_title(self, title: str) -> list[Paper]:
        """The first SEARCH_LIMIT results of a relevance search for title, valid records only."""

        async def fetch():
            try:
                results = await self._client.search_paper(quote(title, safe=""), fields=FIELDS, limit=SEARCH_LIMIT)
            except S2NotFound:
                return []
            return [Paper.model_validate(raw) for raw in results.raw_data]

        return self._run(fetch)

    def match_title(self, title: str) -> Paper | None:
        """The API's single closest title match, or None."""

        async def fetch():
            try:
                match = await self._client.search_paper(quote(title, safe=""), fields=FIELDS, match_title=True)
            except S2NotFound:
                return None
            return Paper.model_validate(match.raw_data)

        return self._run(fetch)
