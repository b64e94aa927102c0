"""braincam core: the contract shared by the trainer, the exporter and the service.

Nothing in this package imports TensorFlow: the service depends on it alone.
"""

import os

# Refuse decompression bombs inside OpenCV's decoders (the default allows 2^30
# pixels, i.e. gigabytes per request). Must be set before cv2 decodes anything.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024))

__version__ = "0.1.0"

DISCLAIMER = (
    "braincam is a medical-imaging research tool, not a diagnostic device. "
    "Its outputs must not be used for clinical decisions."
)
