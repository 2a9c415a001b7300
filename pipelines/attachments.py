"""Rows that carry images and documents: where a row's file is, what it is, and its bytes when sent.

A pipeline's `[[attachments]]` name the columns that hold a file: a local path (inside the input
file's folder), a `file://`, `s3://` or `gs://` URL (where the operator allows: file_access.py), an
`https://` URL the provider fetches itself, or the bytes themselves (a Parquet binary column).

The bytes never wait in Redis. The producer records each attachment's reference, size, media type
and the sha256 of its bytes, read as they stream (`describe`); the worker reads the file when it
sends the row (`load`), checks that it is still the file that was hashed, shrinks an image when the
pipeline says `resize = "auto"`, and the backend puts it in the request as the provider takes it
(`anthropic_content`, `openai_content`). Whatever is wrong with a row's file (missing, unreadable,
changed, of a kind the provider does not take, over its limit) fails that row alone, naming the file.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable
from urllib.parse import unquote, urlparse

from promptmill.pipelines.items import AttachmentRef

INPUT_SOURCE = "input"  # the bytes are the input row's own (a Parquet binary column), read from the file again
REMOTE = ("s3://", "gs://", "gcs://")
_URL = ("https://", "http://")
_READ = 1 << 20

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"%PDF-", "application/pdf"))  # fmt: skip
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
DOCUMENT_TYPES = ("application/pdf",)
_BY_SUFFIX = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
              ".webp": "image/webp", ".pdf": "application/pdf"}  # fmt: skip

# Anthropic's best size for an image: a longer edge over 1,568 px or more than about 1.15 megapixels
# is scaled down by the API before it is read (costing time and no accuracy), so `resize = "auto"`
# sends it at that size.
BEST_LONG_EDGE = 1568
BEST_PIXELS = 1_150_000
PIXELS_PER_TOKEN = 750  # Anthropic: an image costs about width x height / 750 tokens
# What one file may cost, at most, before its answer says: an image at its best size (the API scales
# a larger one down), and a document page (Anthropic: its text and its image, 1,500 to 3,000 tokens).
IMAGE_TOKENS_MOST = math.ceil(BEST_PIXELS / PIXELS_PER_TOKEN) + 100
PAGE_TOKENS_MOST = 3000


class AttachmentError(ValueError):
    """A row's attachment cannot go: its message names the column and the file."""


@dataclass(frozen=True)
class ProviderLimits:
    """What a provider takes in one request: the most bytes of an image and of a document, and pages."""

    label: str
    image_bytes: int
    document_bytes: int
    document_pages: int


MIB = 1 << 20
# Anthropic: 5 MB an image, 32 MB and 100 pages a PDF request. OpenAI: 20 MB an image (chat
# completions), 32 MB and 100 pages a PDF file input. The local engine takes no files yet.
LIMITS = {
    "anthropic": ProviderLimits("Anthropic", 5 * MIB, 32 * MIB, 100),
    "openai": ProviderLimits("OpenAI", 20 * MIB, 32 * MIB, 100),
}


def file_tokens_bound(ref: AttachmentRef) -> int:
    """At most what the attachment adds to its request's input tokens."""
    if ref.kind == "image":
        return IMAGE_TOKENS_MOST
    return PAGE_TOKENS_MOST * (ref.pages or LIMITS["anthropic"].document_pages)


def limits_for(backend: str) -> ProviderLimits | None:
    """The limits of the provider behind a backend (its batch API's are its real-time API's)."""
    return LIMITS.get(backend.split("-")[0])


def media_type(head: bytes, name: str = "") -> str | None:
    """The file's media type, from its first bytes; a URL's (no bytes here), from its name."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return _BY_SUFFIX.get(Path(urlparse(name).path).suffix.lower()) if name and not head else None


MAX_IMAGE_PIXELS = 50_000_000  # read from an image's header before it is decoded: a bigger one fails its row


# -- the producer's side: a reference, never the bytes ---------------------------------------------


def describe(ref: AttachmentRef, row_value: Any, limits: ProviderLimits | None, resize: bool) -> AttachmentRef:
    """The reference with its size, media type and sha256, the bytes read once as they stream, and
    its content checked: an image's header and pixels (Pillow), a PDF's pages (pypdf). A file that is
    missing, not what its `kind` takes (by its bytes, never its name), unreadable, or (unless an image
    may be resized) over the provider's limit raises AttachmentError. An https URL is the provider's
    to fetch."""
    if ref.source.startswith("https://"):
        return ref.model_copy(update={"media_type": media_type(b"", ref.source)})
    digest, size, head = hashlib.sha256(), 0, b""
    if ref.source == INPUT_SOURCE:
        data = bytes(row_value)
        digest.update(data)
        size, head = len(data), data[:16]
    else:
        with open_ref(ref) as handle:
            while block := handle.read(_READ):
                if not head:
                    head = block[:16]
                digest.update(block)
                size += len(block)
    described = ref.model_copy(update={"size": size, "sha256": digest.hexdigest(), "media_type": media_type(head)})
    _check_kind(described)
    if limits is not None:
        _check_size(described, size, limits, resize)
    if ref.source == INPUT_SOURCE:
        content: bytes | BinaryIO = bytes(row_value)
        described.pages = _check_content(content, described)
    else:
        with open_ref(ref) as handle:
            described.pages = _check_content(handle, described)
    if limits is not None:
        _check_pages(described, limits)
    return described


def _check_content(content: bytes | BinaryIO, ref: AttachmentRef) -> int | None:
    """Is the file what its type says: an image Pillow reads (its pixels within MAX_IMAGE_PIXELS, its
    data intact), a PDF pypdf opens. A document's pages; None for an image."""
    if ref.kind == "document":
        return pdf_pages(content, ref)
    with open_image(content, ref) as image:
        try:
            image.verify()
        except Exception as error:  # noqa: BLE001 - Pillow raises many kinds on a broken file
            raise AttachmentError(f"attachment {ref.column!r}: {_name(ref)} is not a readable image: {error}") from None
    return None


def open_ref(ref: AttachmentRef) -> BinaryIO:
    source = ref.source
    try:
        if source.startswith(REMOTE):
            try:
                import fsspec
            except ImportError:
                raise AttachmentError(
                    f"attachment {ref.column!r}: {source} needs fsspec and its filesystem "
                    f"(pip install 'promptmill[cloud]' s3fs, or gcsfs)"
                ) from None
            return fsspec.open(source, "rb").open()
        path = unquote(urlparse(source).path) if source.startswith("file://") else source
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise AttachmentError(f"attachment {ref.column!r}: no file {source}") from None
    except IsADirectoryError:
        raise AttachmentError(f"attachment {ref.column!r}: {source} is a folder, not a file") from None
    except OSError as error:
        raise AttachmentError(f"attachment {ref.column!r}: cannot read {source}: {error.strerror or error}") from None


def _check_kind(ref: AttachmentRef) -> None:
    taken = IMAGE_TYPES if ref.kind == "image" else DOCUMENT_TYPES
    if ref.media_type not in taken:
        found = ref.media_type or "a file of unknown type"
        raise AttachmentError(f"attachment {ref.column!r}: {_name(ref)} is {found}; a {ref.kind} must be "
                              f"{', '.join(t.split('/')[1].upper() for t in taken)}")  # fmt: skip


def _check_size(ref: AttachmentRef, size: int, limits: ProviderLimits, resize: bool) -> None:
    most = limits.image_bytes if ref.kind == "image" else limits.document_bytes
    if size > most and not (resize and ref.kind == "image"):
        hint = '; resize = "auto" shrinks it' if ref.kind == "image" else ""
        raise AttachmentError(f"attachment {ref.column!r}: {_name(ref)} is {size / MIB:.1f} MiB, over "
                              f"{limits.label}'s {most / MIB:.0f} MiB for a {ref.kind}{hint}")  # fmt: skip


def _check_pages(ref: AttachmentRef, limits: ProviderLimits) -> None:
    if ref.pages is not None and ref.pages > limits.document_pages:
        raise AttachmentError(f"attachment {ref.column!r}: {_name(ref)} has {ref.pages} pages, over "
                              f"{limits.label}'s {limits.document_pages} for a document")  # fmt: skip


def _name(ref: AttachmentRef) -> str:
    return "the row's bytes" if ref.source == INPUT_SOURCE else ref.source


# -- the worker's side: the bytes, when the row goes ------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """An attachment ready to send: its bytes (and media type after any resize), or the URL the
    provider fetches itself."""

    ref: AttachmentRef
    media_type: str | None
    data: bytes | None = None
    url: str | None = None

    @property
    def base64(self) -> str:
        return base64.b64encode(self.data or b"").decode()


def load(ref: AttachmentRef, input_path: str, line: int, limits: ProviderLimits | None, resize: bool,
         access: Any = None) -> Loaded:  # fmt: skip
    """Read the attachment now, if `access` (file_access.Access: the worker's own rule, whatever the
    spec says) allows it: the same bytes the producer hashed (else AttachmentError), shrunk to the provider's best
    size when `resize`, and within its limits."""
    if access is not None:
        access.check(ref)
    if ref.source.startswith(_URL):
        return Loaded(ref, ref.media_type, url=ref.source)
    if ref.source == INPUT_SOURCE:
        data = _input_bytes(input_path, line - 1, ref.column)
    else:
        with open_ref(ref) as handle:
            data = handle.read()
    if ref.sha256 is not None and hashlib.sha256(data).hexdigest() != ref.sha256:
        raise AttachmentError(f"attachment {ref.column!r}: {_name(ref)} changed since the job was submitted "
                              f"(its sha256 is not the one recorded)")  # fmt: skip
    kind = ref.media_type
    if resize and ref.kind == "image" and limits is not None:
        data, kind = shrink(data, kind or "image/png", limits.image_bytes, ref)
    if limits is not None:
        _check_size(ref, len(data), limits, resize=False)
        _check_pages(ref, limits)  # its pages as counted at submit: the same bytes, by their sha256
    return Loaded(ref, kind, data=data)


def load_row(request: Any, pipeline: Any, input_path: str, backend: str, access: Any) -> list[Loaded]:
    """Every attachment of a row's request, read now for `backend`'s provider, each checked by `access`."""
    limits, resized = limits_for(backend), pipeline.resized
    return [load(ref, input_path, request.line, limits, ref.column in resized, access) for ref in request.attachments or ()]


@functools.lru_cache(maxsize=1)
def _row_group(path: str, group: int, column: str) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column)


def _input_bytes(path: str, index: int, column: str) -> bytes:
    """A Parquet row's bytes, read from its row group (the last group read is kept: a chunk's rows
    sit together)."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    first = 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if index < first + rows:
            value = _row_group(path, group, column)[index - first].as_py()
            if value is None:
                raise AttachmentError(f"attachment {column!r}: the row's bytes are empty (null)")
            return bytes(value)
        first += rows
    raise AttachmentError(f"attachment {column!r}: the input has no row {index + 1} any more")


def best_size(width: int, height: int) -> tuple[int, int]:
    """The size Anthropic reads an image at: within 1,568 px on its longer edge and 1.15 megapixels."""
    scale = min(1.0, BEST_LONG_EDGE / max(width, height), math.sqrt(BEST_PIXELS / (width * height)))
    return max(1, int(width * scale)), max(1, int(height * scale))


def image_tokens(width: int, height: int) -> int:
    """Anthropic's rule for what an image costs: its pixels at its best size over 750."""
    w, h = best_size(width, height)
    return math.ceil(w * h / PIXELS_PER_TOKEN)


def shrink(data: bytes, kind: str, most_bytes: int, ref: AttachmentRef) -> tuple[bytes, str]:
    """The image at its best size (and, if still too big, smaller in steps), re-encoded in its own
    format (a GIF as PNG); as it is when it already fits."""
    from PIL import Image

    with open_image(data, ref) as image:
        size = best_size(*image.size)
        if size == image.size and len(data) <= most_bytes:
            return data, kind
        form = {"image/jpeg": "JPEG", "image/webp": "WEBP"}.get(kind, "PNG")
        try:
            image = image.convert("RGB") if form == "JPEG" else image
            while True:
                out = io.BytesIO()
                image.resize(size, Image.LANCZOS).save(out, form)
                if out.tell() <= most_bytes or min(size) <= 64:
                    return out.getvalue(), f"image/{form.lower()}"
                size = (max(1, int(size[0] * 0.75)), max(1, int(size[1] * 0.75)))
        except Exception as error:  # noqa: BLE001 - a truncated or corrupt image fails as it is decoded
            raise AttachmentError(f"attachment {ref.column!r}: {_name(ref)} could not be decoded: {error}") from None


def open_image(content: bytes | BinaryIO, ref: AttachmentRef) -> Any:
    """The image opened from its header (nothing decoded yet), refused when Pillow cannot read it or
    when its pixels are over MAX_IMAGE_PIXELS (a decompression bomb is a few KB that decode to GBs)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(content) if isinstance(content, bytes) else content)
    except Exception as error:  # noqa: BLE001 - UnidentifiedImageError, DecompressionBomb*, OSError...
        raise AttachmentError(f"attachment {ref.column!r}: {_name(ref)} is not a readable image: {error}") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise AttachmentError(f"attachment {ref.column!r}: {_name(ref)} is {width}x{height} pixels, over the "
                              f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels an image may have")  # fmt: skip
    return image


def image_size(data_or_file: bytes | BinaryIO, ref: AttachmentRef) -> tuple[int, int]:
    """An image's width and height, from its header."""
    with open_image(data_or_file, ref) as image:
        return image.size


def pdf_pages(data: bytes | BinaryIO, ref: AttachmentRef) -> int:
    from pypdf import PdfReader

    try:
        return len(PdfReader(io.BytesIO(data) if isinstance(data, bytes) else data).pages)
    except Exception as error:  # noqa: BLE001 - pypdf raises many kinds on a broken file
        raise AttachmentError(f"attachment {ref.column!r}: {_name(ref)} is not a readable PDF: {error}") from None


# -- into the request, as each provider takes it ----------------------------------------------------


def _pieces(prompt: str, loaded: Iterable[Loaded]) -> list[tuple[str, Any]]:
    """The user turn in order: text between the attachments, each where the prompt put it."""
    pieces: list[tuple[str, Any]] = []
    at = 0
    for item in sorted(loaded, key=lambda item: item.ref.at):
        if prompt[at : item.ref.at].strip():  # the APIs refuse a text block of whitespace alone
            pieces.append(("text", prompt[at : item.ref.at]))
        at = max(at, item.ref.at)
        pieces.append(("file", item))
    if prompt[at:].strip():
        pieces.append(("text", prompt[at:]))
    return pieces


def anthropic_content(prompt: str, loaded: Iterable[Loaded]) -> list[dict[str, Any]]:
    """Messages API content blocks: text, and `image` or `document` blocks, base64 or by URL."""
    blocks: list[dict[str, Any]] = []
    for kind, piece in _pieces(prompt, loaded):
        if kind == "text":
            blocks.append({"type": "text", "text": piece})
        elif piece.url is not None:
            blocks.append({"type": piece.ref.kind, "source": {"type": "url", "url": piece.url}})
        else:
            source = {"type": "base64", "media_type": piece.media_type, "data": piece.base64}
            blocks.append({"type": piece.ref.kind, "source": source})
    return blocks


def openai_content(prompt: str, loaded: Iterable[Loaded]) -> list[dict[str, Any]]:
    """Chat completions content parts: text, `image_url` (a data URL or the URL), and a PDF as a
    `file` part with its data URL."""
    parts: list[dict[str, Any]] = []
    for kind, piece in _pieces(prompt, loaded):
        if kind == "text":
            parts.append({"type": "text", "text": piece})
        elif piece.ref.kind == "image":
            url = piece.url or f"data:{piece.media_type};base64,{piece.base64}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif piece.url is not None:
            raise AttachmentError(f"attachment {piece.ref.column!r}: chat completions take a document as its "
                                  f"bytes, not a URL ({piece.url}); give a path or s3:// URL instead")  # fmt: skip
        else:
            name = Path(urlparse(piece.ref.source).path).name if piece.ref.source != INPUT_SOURCE else "document.pdf"
            data_url = f"data:{piece.media_type};base64,{piece.base64}"
            parts.append({"type": "file", "file": {"filename": name, "file_data": data_url}})
    return parts
