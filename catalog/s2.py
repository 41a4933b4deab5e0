"""The Semantic Scholar Graph API, through the `semanticscholar` client, with faults made explicit.

The client (0.12) hides what a robust caller needs: it retries 429 on its own for minutes, returns
an empty list for 502/503, raises bare JSON errors, and never shows the Retry-After header. So the
client's own HTTP layer is replaced by `_Requester`, which makes one request and raises an
`S2Error` that says whether a retry may help and how long the server asked us to wait. The retry
policy itself (bounded in attempts and total time, honouring Retry-After) is `RetryPolicy.call`.
"""

import asyncio
import email.utils
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import httpx
from semanticscholar.ApiRequester import ApiRequester
from semanticscholar.AsyncSemanticScholar import AsyncSemanticScholar
from semanticscholar.SemanticScholarException import ObjectNotFoundException
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_after_delay

DEFAULT_API_URL = "https://api.semanticscholar.org/graph/v1"
BATCH_SIZE = 500  # the API's limit for POST /paper/batch (the client refuses more)
FIELDS = ["paperId", "corpusId", "externalIds", "title", "abstract", "tldr", "authors", "venue",
          "publicationVenue", "year", "publicationDate", "citationCount", "influentialCitationCount",
          "openAccessPdf", "url", "fieldsOfStudy", "citationStyles"]


class S2Error(Exception):
    """A request failed. `transient` failures (429, 5xx, timeouts, garbled answers) may be retried."""

    def __init__(self, message: str, transient: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.transient, self.retry_after = transient, retry_after


class S2Unreachable(S2Error):
    """No connection at all: no network, wrong host, nothing listening."""


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After is either a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds()) if when else None


class _Requester(ApiRequester):
    """One HTTP request per call, every failure raised as an S2Error."""

    async def get_data_async(self, url, parameters, headers, payload=None):
        method = "POST" if payload else "GET"
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.request(method, url, params=parameters.lstrip("&"), headers=headers,
                                                json=payload)
        except httpx.TimeoutException as error:
            raise S2Error(f"{method} {url}: timed out after {self.timeout} s", transient=True) from error
        except httpx.TransportError as error:
            raise S2Unreachable(f"cannot reach {url}: {error or type(error).__name__}") from error
        status = response.status_code
        if status == 404:
            raise ObjectNotFoundException(_error_text(response))
        if status == 429 or status >= 500:
            raise S2Error(f"{method} {url}: HTTP {status} {_error_text(response)}", transient=True,
                          retry_after=_retry_after_seconds(response.headers.get("Retry-After")))
        if status != 200:
            raise S2Error(f"{method} {url}: HTTP {status} {_error_text(response)}")
        try:
            data = response.json()
        except ValueError as error:
            raise S2Error(f"{method} {url}: the answer is not valid JSON", transient=True) from error
        # A batch answer is a list aligned with the ids, null where a paper is unknown. Anything else
        # (an empty list, an error object) is a gateway failing politely: worth another try.
        if payload and (not isinstance(data, list) or len(data) != len(payload["ids"])):
            raise S2Error(f"{method} {url}: expected a list of {len(payload['ids'])} records, got "
                          f"{type(data).__name__} of {len(data)}", transient=True)
        return data


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error") or body.get("message") or body)[:200]
    except ValueError:
        return response.text[:200]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff (base, 2·base, 4·base, ... capped), or the server's Retry-After if it sent one."""

    attempts: int = 6
    base_seconds: float = 2.0
    max_wait_seconds: float = 60.0
    total_seconds: float = 300.0
    sleep: Callable[[float], None] = time.sleep

    def wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception()
        if getattr(error, "retry_after", None) is not None:
            return min(error.retry_after, self.max_wait_seconds)
        return min(self.base_seconds * 2 ** (state.attempt_number - 1), self.max_wait_seconds)

    def call(self, function, *args):
        retrying = Retrying(
            retry=retry_if_exception(lambda error: isinstance(error, S2Error) and error.transient),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.total_seconds),
            wait=self.wait, sleep=self.sleep, reraise=True)
        return retrying(function, *args)


class S2Client:
    """The three lookups the catalog needs, each retried by the policy."""

    def __init__(self, api_url: str = DEFAULT_API_URL, api_key: str | None = None, timeout: float = 30.0,
                 policy: RetryPolicy = RetryPolicy()):
        self.api_url = api_url.rstrip("/")
        # The client appends /graph/v1 itself, so it takes only the part before it.
        host = self.api_url.removesuffix("/graph/v1")
        self._client = AsyncSemanticScholar(api_url=host, api_key=api_key, timeout=timeout, retry=False)
        self._client._requester = _Requester(timeout, retry=False)  # see the module docstring
        self.policy = policy
        self.requests = 0

    def _run(self, coroutine_function, *args):
        def attempt():
            self.requests += 1
            return asyncio.run(coroutine_function(*args))
        return self.policy.call(attempt)

    def get_papers(self, ids: list[str]) -> list[dict]:
        """The records the API found among ids (at most BATCH_SIZE), in no promised order."""
        async def fetch():
            return [paper.raw_data for paper in await self._client.get_papers(ids, fields=FIELDS)]
        return self._run(fetch)

    def get_paper(self, paper_id: str) -> dict | None:
        async def fetch():
            try:
                return (await self._client.get_paper(paper_id, fields=FIELDS)).raw_data
            except ObjectNotFoundException:
                return None
        return self._run(fetch)

    def match_title(self, title: str) -> dict | None:
        async def fetch():
            try:
                return (await self._client.search_paper(title, fields=FIELDS, match_title=True)).raw_data
            except ObjectNotFoundException:
                return None
        return self._run(fetch)
