"""A stand-in for the Semantic Scholar Graph API, speaking its JSON shapes (used by tests and benchmarks).

- POST /graph/v1/paper/batch {"ids": [...]}: a list aligned with the ids, null for unknown ones;
- GET /graph/v1/paper/{id}: the record, or 404 {"error": "Paper with id ... not found"};
- GET /graph/v1/paper/search/match?query=...: {"data": [record]}, or 404 {"error": "Title match not found"};
- GET /graph/v1/paper/search?query=...&offset=0&limit=10: {"total": n, "offset": 0, "data": [records]} (the
  papers whose title holds every word of the query; the real API ranks by relevance).
Ids may be bare paper ids or ARXIV:, ACL:, DOI: prefixed, as the real API accepts them.
"""

import json
import re
from urllib.parse import parse_qs, unquote

from catalog.identifiers import normalise_title


class FakeS2:
    def __init__(self, papers: list[dict]):
        self.papers = {paper["paperId"]: paper for paper in papers}
        self.by_external = {}
        for paper in papers:
            for key, value in (paper.get("externalIds") or {}).items():
                self.by_external[(key.upper(), str(value).lower())] = paper
        self.batches: list[list[str]] = []  # the ids of every batch request, in order

    def resolve(self, paper_id: str) -> dict | None:
        prefix, _, value = paper_id.partition(":")
        if not value:
            return self.papers.get(paper_id)
        return self.by_external.get((prefix.upper(), value.lower()))

    def answer(self, method: str, path: str, query: str, body: bytes) -> tuple[int, object]:
        fields = (parse_qs(query).get("fields") or [""])[0].split(",")
        project = lambda paper: {key: value for key, value in paper.items() if key in fields or key == "paperId"}
        if method == "POST" and path.endswith("/paper/batch"):
            ids = json.loads(body)["ids"]
            if len(ids) > 500:
                return 400, {"error": "Cannot process more than 500 ids"}
            self.batches.append(ids)
            return 200, [project(paper) if (paper := self.resolve(i)) else None for i in ids]
        if method == "GET" and path.endswith("/paper/search/match"):
            wanted = normalise_title((parse_qs(query).get("query") or [""])[0])
            for paper in self.papers.values():
                if normalise_title(paper.get("title") or "") == wanted:
                    return 200, {"data": [{**project(paper), "matchScore": 187.3}]}
            return 404, {"error": "Title match not found"}
        if method == "GET" and path.endswith("/paper/search"):
            words = set(normalise_title((parse_qs(query).get("query") or [""])[0]).split())
            limit = int((parse_qs(query).get("limit") or ["100"])[0])
            found = [
                project(paper)
                for paper in self.papers.values()
                if words and words <= set(normalise_title(paper.get("title") or "").split())
            ]
            return 200, {"total": len(found), "offset": 0, "data": found[:limit]}
        match = re.fullmatch(r".*/paper/(.+)", path)
        if method == "GET" and match:
            paper_id = unquote(match.group(1))
            paper = self.resolve(paper_id)
            return (200, project(paper)) if paper else (404, {"error": f"Paper with id {paper_id} not found"})
        return 404, {"error": "Not found"}
