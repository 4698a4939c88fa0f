"""Split a WADO-RS `multipart/related` reply into files as it streams in (RFC 2046).

dicomweb-client's retrieve calls parse every part into a pydicom Dataset (not the stored bytes,
and a whole part in memory); a site must keep the bytes the PACS stores, so each part's body
goes chunk by chunk to a sink, and the memory held is one network chunk plus a delimiter.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar


class MultipartError(ValueError):
    """The reply is not the multipart/related message it says it is."""


class PartSink(Protocol):
    def write(self, data: bytes | bytearray) -> None: ...

    def discard(self) -> None: ...


Sink = TypeVar("Sink", bound=PartSink)


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a multipart/related Content-Type header."""
    media_type, *parameters = (p.strip() for p in content_type.split(";"))
    if media_type.lower() != "multipart/related":
        raise MultipartError(f"Content-Type is {media_type or '(none)'}, not multipart/related")
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode()
    raise MultipartError("multipart/related reply without a boundary")


def split_parts(chunks: Iterable[bytes], boundary: bytes,
                new_sink: Callable[[], Sink]) -> Iterator[Sink]:
    """Write each part's body to a fresh sink and yield the sink once the part is complete.

    A part whose own Content-Type is not application/dicom, or a message that ends before its
    closing delimiter, raises MultipartError (the unfinished sink is discarded).
    """
    delimiter = b"\r\n--" + boundary
    buffer = bytearray(b"\r\n")  # the first delimiter has no CRLF before it
    stream = iter(chunks)

    def fill() -> bool:
        for chunk in stream:
            if chunk:
                buffer.extend(chunk)
                return True
        return False

    def read_until(marker: bytes) -> int:
        while (at := buffer.find(marker)) < 0:
            if not fill():
                raise MultipartError("the reply ended inside a part header (truncated)")
        return at

    del buffer[: read_until(delimiter) + len(delimiter)]
    while True:
        while len(buffer) < 2 and fill():
            pass
        if buffer[:2] == b"--":
            return
        end = read_until(b"\r\n\r\n")
        _check_headers(bytes(buffer[:end]))
        del buffer[: end + 4]
        sink = new_sink()
        try:
            _copy_body(buffer, fill, delimiter, sink)
        except BaseException:
            sink.discard()
            raise
        yield sink


def _copy_body(buffer: bytearray, fill: Callable[[], bool], delimiter: bytes,
               sink: PartSink) -> None:
    """Move body bytes from `buffer` to `sink` up to the delimiter, which is consumed."""
    keep = len(delimiter) - 1  # a delimiter may straddle two chunks
    while (at := buffer.find(delimiter)) < 0:
        if len(buffer) > keep:
            sink.write(buffer[: len(buffer) - keep])
            del buffer[: len(buffer) - keep]
        if not fill():
            raise MultipartError("the reply ended inside a part (truncated)")
    sink.write(buffer[:at])
    del buffer[: at + len(delimiter)]


def _check_headers(block: bytes) -> None:
    for line in block.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            media_type = value.split(";")[0].strip().lower()
            if media_type != "application/dicom":
                raise MultipartError(f"a part is {media_type}, not application/dicom")
