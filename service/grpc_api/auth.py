"""Bearer tokens for the inference service: one for inference, one for management.

Checked in the method handlers of inference.GRPCInferenceService only: the
grpc.health.v1 service and reflection stay open, so that orchestrators' probes
need no secret. Tokens are compared with hmac.compare_digest against both
configured tokens every time, so the time taken says nothing about how much of
a guess was right, nor which token it resembled. Tokens never reach a log line
or an error message.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from ..errors import PermissionDeniedError, UnauthenticatedError

AUTHORIZATION = "authorization"
BEARER = "bearer "
# RPCs that change what the server serves; guarded by the admin token.
MANAGEMENT_METHODS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})


class TokenGuard:
    def __init__(self, inference_token: str | None, admin_token: str | None) -> None:
        self._inference = inference_token.encode() if inference_token else None
        admin = admin_token or inference_token
        self._admin = admin.encode() if admin else None

    @property
    def enabled(self) -> bool:
        return self._inference is not None or self._admin is not None

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Raise unless `metadata` carries a token allowed to call `method`."""
        management = method in MANAGEMENT_METHODS
        required = self._admin if management else self._inference
        if required is None:
            return
        presented = _bearer_token(metadata)
        if presented is None:
            raise UnauthenticatedError(
                f"{method} needs a bearer token: send metadata 'authorization: Bearer <token>'"
            )
        # Both comparisons always run: constant time whichever token (if any) matches.
        matches_inference = self._inference is not None and hmac.compare_digest(
            presented, self._inference
        )
        matches_admin = self._admin is not None and hmac.compare_digest(presented, self._admin)
        if matches_admin if management else matches_inference:
            return
        if management and matches_inference:
            raise PermissionDeniedError(
                f"{method} needs the management token; the inference token does not allow it"
            )
        raise UnauthenticatedError(f"the bearer token sent to {method} is not valid")


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key != AUTHORIZATION:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if text[: len(BEARER)].lower() == BEARER:
            return text[len(BEARER) :].strip().encode("latin-1", errors="replace")
        return b""
    return None
