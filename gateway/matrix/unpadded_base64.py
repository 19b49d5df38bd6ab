"""Unpadded base64 (spec appendices, "Unpadded Base64" and "URL-safe unpadded Base64")."""

from __future__ import annotations

import base64
import binascii


def encode_base64(data: bytes, *, url_safe: bool = False) -> str:
    """Unpadded standard base64, or URL-safe (``-`` and ``_``) with ``url_safe=True``."""
    encoded = base64.urlsafe_b64encode(data) if url_safe else base64.b64encode(data)
    return encoded.rstrip(b"=").decode("ascii")


def decode_base64(text: str) -> bytes:
    """Decodes standard or URL-safe base64, padded or not (the spec says decoders SHOULD
    accept both paddings). Raises ``ValueError`` on anything else."""
    if len(text) % 4 == 1:
        raise ValueError(f"invalid base64 length {len(text)}")
    padded = text + "=" * (-len(text) % 4)
    if "-" in padded or "_" in padded:
        padded = padded.replace("-", "+").replace("_", "/")
    try:
        return binascii.a2b_base64(padded, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"invalid base64: {e}") from None
