"""What a comparison needs from one image, computed once: hashes, ORB features, a small grey thumbnail."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
from PIL import Image

from app.dupes.hashing import HASH_FIELDS, ImageHashes

#: Bump when anything below changes what prepare_image computes: stored features of another version are stale.
FEATURES_VERSION = 1
#: Longest side of the image that local features are computed on (bigger photos are shrunk to it).
WORK_SIZE = 512
#: Smaller images are enlarged to this longest side, so ORB's 31-pixel patches fit.
MIN_WORK_SIZE = 256
#: ORB keypoints kept for a query image (the strongest first): more keypoints find smaller crops.
QUERY_FEATURES = 1000
#: ORB keypoints kept for a catalog image: half the query's, so matching and storage cost half.
CATALOG_FEATURES = 500
#: FAST corner thresholds: the usual one, and the one for soft images that give few corners at the usual one.
FAST_THRESHOLD = 12
SOFT_FAST_THRESHOLD = 4
#: Longest side of the grey thumbnail used to check that aligned pixels agree.
THUMB_SIZE = 256
DESCRIPTOR_BYTES = 32
#: pixel_digest hashes an image whose packed RGB bytes exceed DIGEST_BANDS_ABOVE a band of DIGEST_BAND_BYTES at a
#: time. A 12 MP photo's 36 MB copy at once took 49-78 ms (Zen 4), bands of 64 KB 31-34 ms, 256 KB 29-32, 1 MB 28,
#: 3 MB 88-112; at 1-10 MP the copy at once was 3-10 % faster than bands (likely: memory reused, not mapped anew).
DIGEST_BAND_BYTES = 1 << 18
DIGEST_BANDS_ABOVE = 16 << 20


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """ORB keypoints of one orientation of an image, strongest first.

    ``points`` are in work-image pixels; ``scale`` is work pixels per original pixel.
    """

    points: np.ndarray  # (n, 2) float32
    descriptors: np.ndarray  # (n, 32) uint8
    work_size: tuple[int, int]  # (width, height)
    scale: float

    def __len__(self) -> int:
        return len(self.points)

    def strongest(self, n: int) -> LocalFeatures:
        return replace(self, points=self.points[:n], descriptors=self.descriptors[:n])


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """Everything compare/lookup need from one image; prepare a catalog image once and keep it.

    ``mirrored`` holds the features of the mirror image: needed on the query side only (flips are
    found by matching the mirrored query against the unmirrored catalog image).
    """

    width: int
    height: int
    pixel_digest: str
    hashes: ImageHashes
    features: LocalFeatures
    thumb: np.ndarray  # (h, w) uint8 grey, longest side THUMB_SIZE
    mirrored: LocalFeatures | None = None

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    def without_mirror(self) -> PreparedImage:
        """The catalog-side form (half the features to keep)."""
        return replace(self, mirrored=None)

    def to_bytes(self) -> bytes:
        """A compact, versioned serialisation (for a BLOB column or a cache file)."""
        arrays: dict[str, np.ndarray] = {
            "meta": np.array([FEATURES_VERSION, self.width, self.height, *self.features.work_size], dtype=np.int64),
            "scale": np.array([self.features.scale], dtype=np.float64),
            "hashes": np.array([getattr(self.hashes, k) for k in HASH_FIELDS], dtype=np.uint64),
            "digest": np.frombuffer(bytes.fromhex(self.pixel_digest), dtype=np.uint8),
            "points": self.features.points.astype(np.float32),
            "descriptors": self.features.descriptors,
            "thumb": _encode_thumb(self.thumb),
        }
        if self.mirrored is not None:
            arrays["m_points"] = self.mirrored.points.astype(np.float32)
            arrays["m_descriptors"] = self.mirrored.descriptors
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PreparedImage:
        """Inverse of to_bytes; raises ValueError for data of another FEATURES_VERSION."""
        with np.load(io.BytesIO(data)) as npz:
            version, width, height, work_w, work_h = (int(v) for v in npz["meta"])
            if version != FEATURES_VERSION:
                raise ValueError(
                    f"prepared features of version {version}, this clipsearch computes version "
                    f"{FEATURES_VERSION}: prepare the image again"
                )
            scale = float(npz["scale"][0])
            hashes = ImageHashes(*(int(v) for v in npz["hashes"]))
            work = (work_w, work_h)
            features = LocalFeatures(npz["points"].astype(np.float32), npz["descriptors"], work, scale)
            mirrored = None
            if "m_points" in npz:
                mirrored = LocalFeatures(npz["m_points"].astype(np.float32), npz["m_descriptors"], work, scale)
            thumb = np.asarray(cv2.imdecode(npz["thumb"], cv2.IMREAD_GRAYSCALE), dtype=np.uint8)
            return cls(width, height, npz["digest"].tobytes().hex(), hashes, features, thumb, mirrored)


def _encode_thumb(grey: np.ndarray) -> np.ndarray:
    # JPEG 90 keeps a 256-px grey thumbnail at ~10 kB (PNG: ~35 kB); its error is far below what the
    # blurred, correlation-based agreement check notices.
    ok, encoded = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:  # pragma: no cover - OpenCV cannot fail on a uint8 2-D array
        raise ValueError("could not encode the thumbnail")
    return encoded.ravel()


def pixel_digest(image: Image.Image) -> str:
    """sha256 of the decoded RGB pixels and the size: equal digests mean identical pixels.

    A large image is hashed a band of rows at a time, each band packed by ``tobytes`` and hashed while it is in
    the cache: the same bytes in the same order as one ``tobytes`` of the whole image (rows are contiguous), so
    the same digest, without writing a copy of the whole picture first (see DIGEST_BANDS_ABOVE).
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    width, height = rgb.size
    if 3 * width * height <= DIGEST_BANDS_ABOVE:
        digest.update(rgb.tobytes())
    else:
        rows = max(1, DIGEST_BAND_BYTES // (3 * width))
        for top in range(0, height, rows):
            digest.update(rgb.crop((0, top, width, min(top + rows, height))).tobytes())
    return digest.hexdigest()


def work_image(image: Image.Image) -> tuple[np.ndarray, float]:
    """The grey image local features are computed on, and its scale (work px per original px)."""
    width, height = image.size
    longest = max(width, height)
    target = WORK_SIZE if longest > WORK_SIZE else max(longest, MIN_WORK_SIZE)
    scale = target / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    source = image
    if scale < 0.5:  # a cheap box pre-shrink keeps INTER_AREA fast on large photos
        factor = int(1 / scale) // 2 or 1
        source = image.reduce(factor) if factor > 1 else image
    grey = np.asarray(source.convert("L"))
    if (grey.shape[1], grey.shape[0]) != size:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        grey = cv2.resize(grey, size, interpolation=interpolation)
    return np.ascontiguousarray(grey), scale


def orb_features(grey: np.ndarray, scale: float, max_features: int) -> LocalFeatures:
    """The ``max_features`` strongest ORB keypoints (by Harris score), strongest first.

    A soft image (blurred, low contrast, enlarged from a small one) gets few FAST corners at the usual
    threshold: it is searched again with a lower one, so that it still has keypoints to match.
    """
    keypoints, descriptors = _orb(grey, max_features, FAST_THRESHOLD)
    if len(keypoints) < max_features // 2:
        keypoints, descriptors = _orb(grey, max_features, SOFT_FAST_THRESHOLD)
    work = (grey.shape[1], grey.shape[0])
    if descriptors is None or not keypoints:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_BYTES), np.uint8), work, scale)
    order = np.argsort([-k.response for k in keypoints], kind="stable")
    points = np.array([keypoints[i].pt for i in order], dtype=np.float32).reshape(-1, 2)
    return LocalFeatures(points, np.ascontiguousarray(descriptors[order]), work, scale)


def _orb(grey: np.ndarray, max_features: int, fast_threshold: int) -> tuple[Sequence[cv2.KeyPoint], np.ndarray | None]:
    orb = cv2.ORB_create(  # type: ignore[attr-defined]
        nfeatures=max_features, fastThreshold=fast_threshold, edgeThreshold=15, patchSize=31
    )
    keypoints, descriptors = orb.detectAndCompute(grey, None)
    return keypoints, descriptors


def thumbnail(grey: np.ndarray) -> np.ndarray:
    height, width = grey.shape
    factor = min(1.0, THUMB_SIZE / max(width, height))
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return grey if factor == 1.0 else cv2.resize(grey, size, interpolation=cv2.INTER_AREA)


def prepare_image(image: Image.Image, *, mirrored: bool, max_features: int) -> PreparedImage:
    """Hashes, ORB features (also of the mirror image when ``mirrored``) and thumbnail of an upright image."""
    grey, scale = work_image(image)
    features = orb_features(grey, scale, max_features)
    mirror = orb_features(np.ascontiguousarray(grey[:, ::-1]), scale, max_features) if mirrored else None
    return PreparedImage(
        width=image.width,
        height=image.height,
        pixel_digest=pixel_digest(image),
        hashes=ImageHashes.of(image),
        features=features,
        thumb=thumbnail(grey),
        mirrored=mirror,
    )


def prepare_query(image: Image.Image) -> PreparedImage:
    """A query: QUERY_FEATURES keypoints of the image and of its mirror image (flipped copies). ~30-60 ms."""
    return prepare_image(image, mirrored=True, max_features=QUERY_FEATURES)


def prepare_catalog_image(image: Image.Image) -> PreparedImage:
    """A catalog image, prepared once and kept (PreparedImage.to_bytes): CATALOG_FEATURES keypoints. ~20-40 ms."""
    return prepare_image(image, mirrored=False, max_features=CATALOG_FEATURES)
