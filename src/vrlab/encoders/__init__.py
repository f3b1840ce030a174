"""Vision encoders: the shared contract (`base`), composition (`compose`) and one backend file per source.

Backends import their heavy libraries lazily: a card's `_target_` names the class, and only the chosen
backend's module is imported.
"""

from vrlab.encoders.base import Features, ImageTransform, VisionEncoder

__all__ = ["Features", "ImageTransform", "VisionEncoder"]
