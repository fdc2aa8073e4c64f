"""What the image-file backends do about files that cannot be decoded; one policy for all of them.

A 437k-image set usually holds a few broken files, and a run should not die hours in because of
one, nor hide it. A training loader replaces an image that cannot be decoded by the next readable
image of the *same class* (a fixed choice, so reruns see the same data), logs a warning naming
the file, and keeps the names in ``bad_files``; more than ``floor(max_bad_image_fraction *
len(split))`` distinct bad files stops the run with the list. An evaluation loader never
substitutes: accuracy measured on a replacement image would be wrong, so a bad test image raises
:class:`DatasetError` naming it.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import numpy as np

from ltscale.data.base import FileSplit
from ltscale.data.errors import DatasetError

logger = logging.getLogger("ltscale.data.loaders")

# Same-class candidates tried before giving up on a sample: a class whose next 8 images are all
# broken means the data, not an odd file, is the problem.
MAX_SUBSTITUTES = 8
_MAX_LISTED = 20  # bad files quoted in an error message


class SameClassCandidates:
    """For each image, the images of its class that follow it in list order (cycling)."""

    def __init__(self, targets: np.ndarray, num_classes: int) -> None:
        self.targets = targets
        # Per class, its members in list order; position_in_class lets a bad image find "the next
        # images of its class" in O(1).
        order = np.argsort(targets, kind="stable")
        bounds = np.searchsorted(targets[order], np.arange(num_classes + 1))
        self.class_members = [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]
        self.position_in_class = np.empty(len(order), dtype=np.int64)
        for members in self.class_members:
            self.position_in_class[members] = np.arange(len(members))

    def __call__(self, index: int) -> list[int]:
        """Up to :data:`MAX_SUBSTITUTES` same-class images to try instead of ``index``."""
        members = self.class_members[self.targets[index]]
        after = np.roll(members, -int(self.position_in_class[index]))[1:]
        return after[:MAX_SUBSTITUTES].tolist()


class BadImageLedger:
    """The bad files one loader has met, and the errors the policy above calls for.

    ``substitute``: training loaders substitute; evaluation loaders raise on the first bad file.
    The budget is checked against this process's count as files are met; under DDP the training
    loop also checks every rank's files together at the end of each epoch
    (``ImageFileLoader.check_bad_images_across_ranks``).
    """

    def __init__(self, split: FileSplit, *, substitute: bool, max_bad_image_fraction: float) -> None:
        self.split = split
        self.substitute = substitute
        self.allowed = math.floor(max_bad_image_fraction * len(split))
        self.candidates = SameClassCandidates(split.targets, split.num_classes)
        self.bad: dict[int, str] = {}  # dataset index -> decoder error

    def path(self, index: int) -> str:
        return str(self.split.root / self.split.paths[index])

    @property
    def bad_files(self) -> list[str]:
        """Paths (root / relative path) of every image that failed to decode so far, sorted."""
        return sorted(self.path(index) for index in self.bad)

    def record(self, failures: Iterable[tuple[int, str]]) -> None:
        """Note ``(index, reason)`` failures: warn for each new one in training, raise for any in
        evaluation, raise with the list once the budget is exceeded."""
        for index, reason in failures:
            if index in self.bad:
                continue
            self.bad[index] = reason
            if not self.substitute:
                raise DatasetError(
                    f"{self.path(index)} (in {self.split.name}) cannot be decoded ({reason}). Evaluation "
                    "never substitutes images, since accuracy measured on a replacement would be wrong: "
                    "replace the file or remove it from the split list (`ltscale data verify` lists every "
                    "unreadable file)."
                )
            label = int(self.split.targets[index])
            logger.warning(
                "unreadable image %s (%s); replaced by another image of class %d (%s). %d bad file(s) so far, "
                "at most %d allowed (data.loader.max_bad_image_fraction).",
                self.path(index), reason, label, self.split.class_names[label], len(self.bad), self.allowed,
            )
        if len(self.bad) > self.allowed:
            listed = self.bad_files[:_MAX_LISTED]
            more = f" and {len(self.bad) - len(listed)} more" if len(self.bad) > len(listed) else ""
            raise DatasetError(
                f"{len(self.bad)} images of {self.split.name} cannot be decoded, more than the "
                f"{self.allowed} allowed (data.loader.max_bad_image_fraction x {len(self.split)} images): "
                f"{', '.join(listed)}{more}. Repair or re-download them, or remove them from the split list."
            )

    def replacement(self, index: int) -> int:
        """The image to serve for ``index``: itself unless known bad, else the first same-class
        candidate not known bad. Raises :class:`DatasetError` when there is none."""
        if index not in self.bad:
            return index
        if self.substitute:
            for candidate in self.candidates(index):
                if candidate not in self.bad:
                    return candidate
        raise self.unusable(index)

    def unusable(self, index: int) -> DatasetError:
        """The error for an image that is bad and has no usable replacement."""
        if not self.substitute:
            return DatasetError(
                f"{self.path(index)} (in {self.split.name}) cannot be decoded "
                f"({self.bad.get(index, 'see the earlier error')}); evaluation never substitutes images."
            )
        label = int(self.split.targets[index])
        tried = [self.path(candidate) for candidate in self.candidates(index) if candidate in self.bad]
        return DatasetError(
            f"{self.path(index)} cannot be decoded ({self.bad.get(index, 'unknown error')}) and no readable "
            f"image of its class {label} ({self.split.class_names[label]}) could replace it "
            f"(tried {', '.join(tried) or 'none: it is the only image of its class'}). "
            "Repair the files or remove them from the split list."
        )
