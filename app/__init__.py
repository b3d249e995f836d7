"""clipsearch: semantic image search over your own photos, built on CLIP."""

__version__ = "0.1.0"
