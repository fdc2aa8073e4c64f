"""ltscale recipes. Importing this package registers every recipe with ``ltscale.config``.

A recipe is a function returning a typed :class:`~ltscale.stages.config.PipelineConfig`; a variant
derives from it with ``dataclasses.replace`` or :func:`ltscale.config.apply_overrides`.
"""

from configs import cifar, demo, imagenet_lt, inat18, places_lt  # noqa: F401  (registration)
