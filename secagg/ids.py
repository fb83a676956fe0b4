"""Client ids and session ids: the values every key derivation and message binds.

A client id is an integer in [1, 2^32 - 1]. It doubles as the Shamir x-coordinate of the
shares a client holds (which is why 0 is excluded: the secret sits at x = 0). Ids are encoded
as 4 big-endian bytes wherever they are hashed, signed or used as associated data, so no two
ids (or id tuples) share an encoding.
"""

from __future__ import annotations

from secagg.errors import ConfigurationError

MAX_CLIENT_ID = 2**32 - 1
SESSION_ID_BYTES = 32


def check_client_id(client_id: int) -> int:
    if isinstance(client_id, bool) or not isinstance(client_id, int):
        raise ConfigurationError(f"client id must be an integer, got {type(client_id).__name__}")
    if not 1 <= client_id <= MAX_CLIENT_ID:
        raise ConfigurationError(f"client id must be in [1, 2^32 - 1], got {client_id}")
    return client_id


def id_bytes(client_id: int) -> bytes:
    return check_client_id(client_id).to_bytes(4, "big")


def check_session_id(session_id: bytes) -> bytes:
    if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_BYTES:
        raise ConfigurationError(f"session id must be {SESSION_ID_BYTES} bytes")
    return session_id
