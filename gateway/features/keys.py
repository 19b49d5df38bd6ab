"""Public key queries: no delegation key ever leaves through the public listener.

The homeserver re-serves every key it has cached through its own notary endpoints
(``GET /_matrix/key/v2/query/{serverName}`` and ``POST /_matrix/key/v2/query``). Its cache
holds the delegation keys our internal notary vouched, so every server-keys entry carrying
one is removed from those answers before they reach a third party: nobody outside may learn
or come to trust a delegation key.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from gateway.errors import Codes, MatrixError
from gateway.http import Request, Response
from gateway.notary.keys import DELEGATION_KEY_PREFIX, server_keys_carry_delegation_key

if TYPE_CHECKING:
    from gateway.services import Services


def filter_key_query_body(body: bytes) -> tuple[bytes, int]:
    """Returns the answer without delegation-key entries, and how many were removed.

    A body that is not a JSON object with a ``server_keys`` list cannot be filtered entry by
    entry; it passes unchanged only when it cannot hold a delegation key at all.
    """
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("server_keys"), list):
        if DELEGATION_KEY_PREFIX.split(":", 1)[1].encode() in body:
            raise MatrixError(
                502, Codes.UNKNOWN, "the homeserver's key answer could not be checked"
            )
        return body, 0
    kept = [e for e in parsed["server_keys"] if not server_keys_carry_delegation_key(e)]
    removed = len(parsed["server_keys"]) - len(kept)
    if removed == 0:
        return body, 0
    parsed["server_keys"] = kept
    return json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode(), removed


async def on_key_query(request: Request[Services]) -> Response:
    """Forwards a request under ``/_matrix/key/`` to the homeserver and filters its answer
    (the public listener sends every such path here, whatever its shape)."""
    headers = [
        (k, v)
        for k, v in request.services.forwarder.upstream_headers(request.scope)
        if k != b"accept-encoding"
    ]
    answer = await request.services.forwarder.forward(request, headers=headers)
    if answer.status != 200:
        return answer
    body, removed = filter_key_query_body(answer.body)
    if removed:
        request.services.metrics.delegation_entries_removed.inc(removed)
        request.log.info("keys.delegation_entries_removed", removed=removed)
        answer.body = body
        answer.headers = [(k, v) for k, v in answer.headers if k.lower() != b"content-length"]
    return answer
