"""What a site accepts from its own data folder, as one setting: the site check and training
read the same `DataLimits`, so whatever the check accepts, training loads.

Kept free of torch and MONAI so that settings and the CLI can name the defaults cheaply.
"""

from dataclasses import dataclass

MB = 10**6

# The largest image a site decodes unless its settings say otherwise, as declared in the header
# (rows x columns x frames x samples x bytes per sample). 200 MB holds a 10000 x 10000 16-bit
# image; real radiographs are at most ~4300 x 4300 (DR) or ~4100 x 5600 (mammography), 35-46 MB,
# and a CT slice is 0.5 MB. Decoding costs about 5x the declared size (16-bit stored values
# become float64 after rescale), so the default bounds a decode at about 1 GB.
DEFAULT_MAX_IMAGE_MB = 200.0

# Classes a label may name unless the site settings declare more: 0 = no finding, 1 = finding.
DEFAULT_NUM_CLASSES = 2


class DataLimitsError(ValueError):
    """A limit that cannot be applied (not positive, too few classes)."""


@dataclass(frozen=True)
class DataLimits:
    """max_image_mb: largest declared image decoded, in MB of 10^6 bytes; num_classes: labels
    are integers 0 .. num_classes - 1."""

    max_image_mb: float = DEFAULT_MAX_IMAGE_MB
    num_classes: int = DEFAULT_NUM_CLASSES

    def __post_init__(self) -> None:
        if not self.max_image_mb > 0:
            raise DataLimitsError(f"max-image-mb must be a positive number of MB, got "
                                  f"{self.max_image_mb!r}")
        if self.num_classes < 2:
            raise DataLimitsError(f"num-classes must be at least 2, got {self.num_classes!r}")

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * MB)
