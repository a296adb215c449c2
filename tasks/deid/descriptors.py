"""Clean Descriptors: keep only vocabulary words and technical tokens in free-text descriptors.

A descriptor such as ``"CT THORAX QZORVATH 5mm"`` becomes ``"CT THORAX 5mm"``: each word is
kept only if it is in an imaging vocabulary (anatomy, modality, sequence, phase, laterality,
RT structure words) or looks like a technical token (``T1``, ``B30f``, ``5mm``, ``3D``), and is
not one of the patient's known identifier tokens. Unknown words (names, places, IDs, dates)
are dropped; the punctuation between kept words is preserved, so ``"GTV-1"`` stays ``"GTV-1"``.
This is an allow-list: a name nobody listed is removed, at the cost of also removing rare
technical words that are not in the vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_VOCABULARY_TEXT = """
    a ab abd abdomen abdo abdominal ac acq acquisition adc admire adrenal ai air al alt and
    angio angiography ankle aorta aortic ap apex arm arterial artery asir asl att attenuation
    auto automatic average avg ax axial b0 bh bilat bilateral bladder blood body bold bolus
    bone bones brain brainstem breast breath bronchus bw c ca calcium cardiac carotid cerebral
    cervical cerebellum ch chest cine clavicle colon combined contour contrast cor cord coronal
    corrected correction ct cta ctv cw dce de delay delayed dose dsc dti dual dwi dyn dynamic
    early ear echo ecg edema energy enhanced enhancement eob epi esophagus exam expiration
    external extremity eye fat fdg femur fiesta flair fl fluid foot fov frfse fs fse full gated
    gating gd gradient gre gross gtv gtvn gtvp hand hcc head heart helical high hip hr hu iliac
    in inf inferior inspiration int inv ir iterative itv iv jaw kidney kidneys kernel knee l
    large larynx late lat lateral left lesion lesions limb liver lobe local localizer localiser
    long low lower lumbar lung lungs lymph mass max mediastinum med medium met metastasis mets
    mid middle min mip mpr mprage mr mra mri ms mtt multi muscle nac native neck nerve no node
    nodes nodule non oar oblique of on opp optic oral orbit organ osem out ovary pancreas
    parotid part pd pelvis perfusion pet phase plain portal post pre primary prone prostate
    prot protocol pt ptv pulm pulmonary qc r range rectum recon reconstruction ref region renal
    resp respiratory rib right roi routine rt s sag sagittal scan scout se segment segmentation
    series sharp short shoulder sinus skin skull slice slices small smooth soft spectral spine
    spinal spiral spleen standard static std stir stomach study suv supine survey swi t1 t1w
    t2 t2w target tha thick thin thorax thoracic thyroid tissue tof topogram total trachea tse
    tumor tumour upper uterus vein venous vertebra vessel vibe view vol volume w water wb whole with
    without wo xray
    """
VOCABULARY = frozenset(_VOCABULARY_TEXT.split())

#: Technical tokens kept without being in the vocabulary: sizes with units, sequence weights
#: and kernels such as ``5mm``, ``2.5``, ``3D``, ``T1``, ``B30f``, ``Br40``.
_TECHNICAL = re.compile(
    r"^(?:\d{1,3}(?:[.,]\d{1,2})?(?:mm|cm|m|s|ms|kv|kvp|ma|mas|t|d|h|min|sec|x|mbq|ml|%)?"
    r"|[a-z]{1,2}\d{1,3}[a-z]{0,2})$",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z0-9]+")
_EMPTY_BRACKETS = re.compile(r"[\(\[\{][\s\W_]*[\)\]\}]")
_SPACES = re.compile(r"\s{2,}")
_EDGE = " \t-_.,;:/\\|+&*#"


def identifier_tokens(values: Iterable[str]) -> frozenset[str]:
    """Split identifying values (names, IDs) into lowercase word tokens of 2+ characters."""
    tokens: set[str] = set()
    for value in values:
        for word in _WORD.findall(str(value)):
            if len(word) >= 2:
                tokens.add(word.lower())
    return frozenset(tokens)


def token_allowed(word: str, forbidden: frozenset[str] = frozenset()) -> bool:
    """Whether a word may stay in a cleaned descriptor."""
    low = word.lower()
    if low in forbidden:
        return False
    return low in VOCABULARY or bool(_TECHNICAL.match(word))


def clean_descriptor(text: str, forbidden: frozenset[str] = frozenset()) -> str:
    """Remove every word that is not vocabulary or a technical token.

    Parameters
    ----------
    text
        Descriptor value (one value of a possibly multi-valued element).
    forbidden
        Lowercase identifier tokens of the patient (always removed, even if in the vocabulary).

    Returns
    -------
    str
        The cleaned text (may be empty).
    """
    if not text:
        return ""
    kept = _WORD.sub(lambda m: m.group(0) if token_allowed(m.group(0), forbidden) else "", text)
    if kept == text:
        return text.strip()
    previous = None
    while previous != kept:
        previous = kept
        kept = _EMPTY_BRACKETS.sub(" ", kept)
    kept = _SPACES.sub(" ", kept)
    # Collapse runs of separators left behind by removed words ("CT - - 5mm" -> "CT - 5mm").
    kept = re.sub(
        r"(?:\s*[-_.,;:/\\|+&*#'\"]\s*){2,}", lambda m: m.group(0).strip()[:1] + " ", kept
    )
    return kept.strip(_EDGE).strip()
