"""Content-addressed results of pyradiomics, stored as small objects in the site store.

One (series, ROI) result is split into *parts*: the shape features (which depend on the mask and
the global settings only) and one part per enabled image type (``Original``, ``LoG``,
``Wavelet``, ...). Each part is stored at::

    features/_cache/pyradiomics-<version>/<image-sha256>/<mask-sha256>/<part-hash>.json

where ``part-hash`` is the SHA-256 of the part's own parameters (global settings, the feature
classes it computes, its image type's overrides) and the pyradiomics version. So:

* a rerun on unchanged input finds every part and computes nothing (and writes nothing);
* a changed image or mask has new hashes, and only that unit recomputes;
* a changed parameter recomputes only the parts it affects (changing LoG's sigma leaves the
  Original, Wavelet and shape parts untouched).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from tasks.radiomics.params import SHAPE_CLASSES, RadiomicsParams, hash_json
from tasks.store import FEATURES, SiteStore

#: The installed pyradiomics (``radiomics.__version__`` without its ``v``), read from the package
#: metadata so that planning a run does not import pyradiomics and SimpleITK.
PYRADIOMICS_VERSION = version("pyradiomics").lstrip("v")
CACHE_PREFIX = f"{FEATURES}/_cache/pyradiomics-{PYRADIOMICS_VERSION}"
SHAPE_PART = "shape"

#: Settings that do not change feature values (excluded from part hashes).
NEUTRAL_SETTINGS = frozenset({"additionalInfo"})

#: Image types whose feature-name prefix is exactly their lowercase name.
_EXACT_PREFIXES = {
    "original": "Original",
    "square": "Square",
    "squareroot": "SquareRoot",
    "logarithm": "Logarithm",
    "exponential": "Exponential",
    "gradient": "Gradient",
    "lbp-2D": "LBP2D",
}
#: Image types yielding several images, named ``<prefix>...`` (``log-sigma-1-0-mm-3D``,
#: ``wavelet-LLH``, ``wavelet2-HHH``, ``lbp-3D-m1``, ``lbp-3D-k``).
_START_PREFIXES = (("log-sigma-", "LoG"), ("wavelet", "Wavelet"), ("lbp-3D-", "LBP3D"))


@dataclass(frozen=True)
class Part:
    """One cached piece of a (series, ROI) result.

    Parameters
    ----------
    name
        ``shape`` or an image type name (``Original``, ``LoG``, ...).
    key
        SHA-256 of the part's parameters and the pyradiomics version.
    """

    name: str
    key: str


def _settings(params: RadiomicsParams) -> dict[str, Any]:
    canonical = params.canonical()
    return {k: v for k, v in canonical["setting"].items() if k not in NEUTRAL_SETTINGS}


def plan_parts(params: RadiomicsParams) -> list[Part]:
    """Return the parts a result of ``params`` consists of: shape first, then image types by name.

    Parameters
    ----------
    params
        Validated parameters.

    Returns
    -------
    list of Part
        Empty when no feature class is enabled.
    """
    canonical = params.canonical()
    classes = canonical["featureClass"]
    shape = {k: v for k, v in classes.items() if k in SHAPE_CLASSES}
    other = {k: v for k, v in classes.items() if k not in SHAPE_CLASSES}
    common = {
        "pyradiomics": PYRADIOMICS_VERSION,
        "setting": _settings(params),
        "voxelSetting": canonical["voxelSetting"],
    }
    parts: list[Part] = []
    if shape:
        parts.append(
            Part(SHAPE_PART, hash_json({**common, "part": SHAPE_PART, "featureClass": shape}))
        )
    if other:
        for name, overrides in canonical["imageType"].items():
            key = hash_json({**common, "part": name, "featureClass": other, "overrides": overrides})
            parts.append(Part(name, key))
    return parts


def part_for_feature(name: str, shape_enabled: bool = True) -> str:
    """Return the part a pyradiomics feature name belongs to.

    Parameters
    ----------
    name
        A feature name such as ``original_shape_Sphericity`` or ``wavelet-LLH_glcm_Contrast``.
    shape_enabled
        Whether shape classes are computed (``original_shape*`` go to the shape part).

    Raises
    ------
    ValueError
        When the name does not start with a known image type prefix.
    """
    image_type, _, rest = name.partition("_")
    if shape_enabled and image_type == "original" and rest.split("_", 1)[0] in SHAPE_CLASSES:
        return SHAPE_PART
    if image_type in _EXACT_PREFIXES:
        return _EXACT_PREFIXES[image_type]
    for prefix, part in _START_PREFIXES:
        if image_type.startswith(prefix):
            return part
    raise ValueError(f"feature {name!r} has no known image type prefix")


def object_key(image_sha256: str, mask_sha256: str, part: Part) -> str:
    """Store key of one cached part of one (image, mask) pair."""
    return f"{CACHE_PREFIX}/{image_sha256}/{mask_sha256}/{part.key}.json"


@dataclass(frozen=True)
class CachedPart:
    """A cached part: features in pyradiomics order, or a quarantine outcome."""

    name: str
    features: dict[str, float] | None = None
    reason: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        """True when the part holds features."""
        return self.features is not None

    def to_bytes(self) -> bytes:
        """Serialise (JSON; key order kept, floats exact, NaN as ``NaN``)."""
        body: dict[str, Any] = {"part": self.name}
        if self.features is not None:
            body["features"] = self.features
        else:
            body["reason"] = self.reason
            body["detail"] = self.detail
        return json.dumps(body, separators=(",", ":"), allow_nan=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedPart:
        """Parse :meth:`to_bytes` output."""
        body = json.loads(data)
        features = body.get("features")
        if features is not None:
            features = {k: float(v) for k, v in features.items()}
        return cls(
            name=body["part"],
            features=features,
            reason=body.get("reason", ""),
            detail=body.get("detail", ""),
        )


def read_parts(store: SiteStore, keys: list[str], attempts: int = 3) -> dict[str, CachedPart]:
    """Read the cached parts that exist among ``keys``; missing ones are left out.

    One batched call first; objects whose read failed for another reason than "not found"
    (a dropped connection under load, throttling) are read again one by one, so a transient
    error never passes for a cache miss.
    """
    return {
        k: CachedPart.from_bytes(d) for k, d in store.read_many(keys, attempts=attempts).items()
    }


def write_part(store: SiteStore, key: str, part: CachedPart) -> bool:
    """Write one part atomically; return False when identical content was already there."""
    return store.write_bytes(key, part.to_bytes())
