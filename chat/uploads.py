"""What an uploaded file is, from its first bytes; and the name it may keep.

The type a browser declares is not trusted: a file is what its bytes say, and a
file that is none of the known kinds is ``application/octet-stream`` (served as
a download, never rendered).
"""

import unicodedata

SNIFF_BYTES = 512
OCTET_STREAM = "application/octet-stream"
MAX_NAME_CHARS = 200

# (offset, signature, content type), first match wins.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"%PDF-", "application/pdf"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"\x1f\x8b", "application/gzip"),
    (4, b"ftypisom", "video/mp4"),
    (4, b"ftypmp42", "video/mp4"),
    (0, b"OggS", "audio/ogg"),
    (0, b"ID3", "audio/mpeg"),
)
# Types shown inline in a page (as <img>); everything else is a download.
INLINE_IMAGES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


def sniff_content_type(head: bytes) -> str:
    """The content type of a file that starts with ``head``."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for offset, signature, content_type in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return content_type
    if _is_text(head):
        return "text/plain"
    return OCTET_STREAM


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut off by the sniffed length is still text.
        return exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"
    return True


def clean_name(name: str) -> str:
    """A file name safe to store and show: no path, no control characters."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(
        ch for ch in name if unicodedata.category(ch)[0] != "C" and ch not in '"<>'
    ).strip()
    if len(name) > MAX_NAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        keep = ext if dot and len(ext) <= 10 else ""
        name = name[: MAX_NAME_CHARS - len(keep) - 1] + ("." + keep if keep else "")
    return name or "file"
