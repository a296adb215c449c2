"""pyradiomics on several masks of one image, each filtered image computed once.

``RadiomicsFeatureExtractor.execute(image, mask)`` filters the whole image (LoG per sigma, the
eight wavelet sub-bands, ...) for every mask it is given, although no filter but LBP3D reads
the mask. :func:`features_per_mask` runs the steps of ``execute`` (pyradiomics 3.0.1,
``featureextractor.py``) with the filtering hoisted out of the per-mask loop: each filtered
image is made once and every mask's feature classes run on it, so the values are the ones
``execute`` returns for each mask alone, bit for bit.

Sharing needs an image that does not depend on the mask before filtering. With resampling
(``interpolator`` and ``resampledPixelSpacing``) or ``preCrop`` pyradiomics crops the image
to each mask's bounding box first, and LBP3D reads the mask: :func:`can_share_filters` is then
False and callers run ``execute`` per mask.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.radiomics.params import RadiomicsParams

if TYPE_CHECKING:
    import SimpleITK as sitk

#: Image types whose filter reads the mask.
MASK_DEPENDENT_IMAGE_TYPES = frozenset({"LBP3D"})


def real_value(value: Any) -> float:
    """Return a pyradiomics feature value as a float.

    glcm's MCC (the square root of an eigenvalue) can come back as a complex number with a
    zero imaginary part; ``float`` drops that part too, but warns (ComplexWarning) each time.
    """
    return float(np.real(value))


def can_share_filters(params: RadiomicsParams) -> bool:
    """Return True when the filtered images of ``params`` do not depend on the mask.

    Parameters
    ----------
    params
        Validated parameters.

    Returns
    -------
    bool
        False with resampling, ``preCrop`` or a mask-dependent image type.
    """
    canonical = params.canonical()
    setting = canonical["setting"]
    if setting.get("interpolator") is not None and setting.get("resampledPixelSpacing"):
        return False
    if setting.get("preCrop"):
        return False
    return not (set(canonical["imageType"]) & MASK_DEPENDENT_IMAGE_TYPES)


def features_per_mask(
    extractor: Any, image: sitk.Image, masks: Mapping[str, sitk.Image]
) -> dict[str, dict[str, float] | ValueError]:
    """Run ``extractor`` on ``image`` with every mask, filtering the image once per image type.

    Parameters
    ----------
    extractor
        A configured ``RadiomicsFeatureExtractor`` (enabled image types and feature classes).
    image
        The image, as ``execute`` would read it.
    masks
        Masks by key.

    Returns
    -------
    dict
        For each key, the features in ``execute``'s order (no ``diagnostics_*``), or the
        ``ValueError`` pyradiomics raised for that mask (invalid ROI), as ``execute`` would.
    """
    from radiomics import featureextractor, imageoperations

    settings = extractor.settings.copy()
    if featureextractor.geometryTolerance != settings.get("geometryTolerance"):
        extractor._setTolerance()  # as execute() does before its first step
    resegment_shape = settings.get("resegmentShape", False)

    prepared: dict[str, tuple[sitk.Image, Any]] = {}
    vectors: dict[str, OrderedDict[str, Any]] = {}
    outcome: dict[str, dict[str, float] | ValueError] = {}
    loaded = image
    for key, raw_mask in masks.items():
        # loadImage: the mask processed, the image normalised (the same image for every mask)
        try:
            loaded, mask = extractor.loadImage(image, raw_mask, None, **settings)
            bounding_box, corrected = imageoperations.checkMask(loaded, mask, **settings)
            if corrected is not None:
                mask = corrected
            resegmented = None
            if settings.get("resegmentRange") is not None:
                resegmented = imageoperations.resegmentMask(loaded, mask, **settings)
                bounding_box, _ = imageoperations.checkMask(loaded, resegmented, **settings)
            if resegment_shape and resegmented is not None:
                mask = resegmented
            vector: OrderedDict[str, Any] = OrderedDict()
            vector.update(extractor.computeShape(loaded, mask, bounding_box, **settings))
            if not resegment_shape and resegmented is not None:
                mask = resegmented
        except ValueError as exc:
            outcome[key] = exc
            continue
        prepared[key] = (mask, bounding_box)
        vectors[key] = vector

    if prepared:
        any_mask = next(iter(prepared.values()))[0]  # unused by the shareable filters
        for image_type, custom in extractor.enabledImagetypes.items():
            args = {**settings, **custom}
            generator = getattr(imageoperations, f"get{image_type}Image")(loaded, any_mask, **args)
            for filtered, type_name, kwargs in generator:
                for key in list(prepared):
                    mask, bounding_box = prepared[key]
                    try:
                        cropped, cropped_mask = imageoperations.cropToTumorMask(
                            filtered, mask, bounding_box, padDistance=0
                        )
                        vectors[key].update(
                            extractor.computeFeatures(cropped, cropped_mask, type_name, **kwargs)
                        )
                    except ValueError as exc:
                        outcome[key] = exc
                        del prepared[key]
    for key in prepared:
        outcome[key] = {
            name: real_value(value)
            for name, value in vectors[key].items()
            if not name.startswith("diagnostics_")
        }
    return {key: outcome[key] for key in masks}
