"""Domain errors. The CLI maps them to exit codes, the API to HTTP status codes."""

from __future__ import annotations


class ClipSearchError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ConfigError(ClipSearchError):
    """A setting is invalid or inconsistent."""


class ModelLoadError(ClipSearchError):
    """The CLIP model could not be loaded."""


class IndexMismatch(ClipSearchError):
    """The index on disk was built with another model (or is unreadable)."""


class ModelMismatch(IndexMismatch):
    """The index on disk was built with another model (or other pretrained weights) than the one configured."""

    def __init__(self, message: str, *, built: str, wanted: str, count: int) -> None:
        super().__init__(message)
        #: "model (pretrained)" of the index and of the configuration, and the index's count of vectors
        self.built, self.wanted, self.count = built, wanted, count


class NotReady(ClipSearchError):
    """There is no index yet, or it is still loading."""


class NotFound(ClipSearchError):
    """An image id that the store does not know."""


class BadQuery(ClipSearchError):
    """A query that cannot be answered as given."""


class UnsupportedImage(ClipSearchError):
    """A file or upload that cannot be decoded as an image (or is too large)."""


class ImageTooLarge(UnsupportedImage):
    """An image whose pixel count is above the limit (a decompression bomb, or simply too big)."""


class StoreError(ClipSearchError):
    """The metadata store is unreachable or has an incompatible schema."""
