"""Errors that describe bad input; the service maps each to an HTTP status."""

from __future__ import annotations


class InputError(ValueError):
    """Base class: a problem with what the caller sent, never with the server."""

    status_code = 422
    code = "invalid_input"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class UnsupportedMediaType(InputError):
    status_code = 415
    code = "unsupported_media_type"


class UndecodableImage(InputError):
    status_code = 422
    code = "undecodable_image"


class InvalidParameter(InputError):
    status_code = 422
    code = "invalid_parameter"


class MethodUnavailable(InputError):
    """A known explanation method this model or server does not offer (e.g. a gradient
    method for a model without a Grad-CAM graph)."""

    status_code = 422
    code = "method_unavailable"


class PayloadTooLarge(InputError):
    status_code = 413
    code = "payload_too_large"


class OutOfDistribution(InputError):
    """The out-of-distribution gate flagged the image and the policy is to refuse it."""

    status_code = 422
    code = "out_of_distribution"


class ImageTooLarge(InputError):
    """The file is small but declares more pixels (or voxels) than the budget: refused
    from its header, before anything is decoded."""

    status_code = 413
    code = "image_too_large"
