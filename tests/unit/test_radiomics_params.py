"""The strict pyradiomics parameter model: one-line errors naming the key, canonical hash."""

from pathlib import Path

import pytest
import yaml

from tasks.errors import OncoflowError
from tasks.radiomics.params import PRESET_DIR, Preset, load_params, validate_params

BAD = [
    ({"setting": {"binWidth": -5}}, "setting.binWidth"),
    ({"setting": {"binWidth": 0}}, "setting.binWidth"),
    ({"setting": {"binWidth": "25"}}, "setting.binWidth"),
    ({"setting": {"interpolater": "sitkBSpline"}}, "setting.interpolater: unknown key"),
    ({"settings": {"binWidth": 25}}, "settings: unknown key"),
    ({"setting": {"normalize": 1}}, "setting.normalize"),
    ({"setting": {"label": 1.5}}, "setting.label"),
    ({"setting": {"label": 0}}, "setting.label"),
    ({"setting": {"minimumROIDimensions": 4}}, "setting.minimumROIDimensions"),
    ({"setting": {"interpolator": "sitkCubic"}}, "setting.interpolator"),
    ({"setting": {"interpolator": 11}}, "setting.interpolator"),
    ({"setting": {"wavelet": "nope"}}, "setting.wavelet"),
    ({"setting": {"resampledPixelSpacing": [1, 1, -1]}}, "setting.resampledPixelSpacing"),
    ({"setting": {"resampledPixelSpacing": [1, 1, 1, 1]}}, "setting.resampledPixelSpacing"),
    ({"setting": {"resegmentRange": [400, -1000]}}, "resegmentRange"),
    ({"setting": {"distances": [0]}}, "setting.distances"),
    ({"imageType": {"Foo": {}}}, "imageType.Foo: unknown name"),
    ({"imageType": {"LoG": {}}}, "imageType.LoG: needs sigma"),
    ({"imageType": {"LoG": {"sigma": [-1.0]}}}, "imageType.LoG.sigma"),
    ({"imageType": {"Original": {"binWidht": 3}}}, "imageType.Original.binWidht: unknown key"),
    ({"featureClass": {"glcmx": None}}, "featureClass.glcmx: unknown name"),
    ({"featureClass": {"glcm": ["NotAFeature"]}}, "featureClass.glcm: unknown features"),
    ({"voxelSetting": {"kernelRadius": 0}}, "voxelSetting.kernelRadius"),
    ([1, 2], "expected a mapping"),
]


@pytest.mark.parametrize(("data", "needle"), BAD)
def test_bad_parameters_give_one_line_naming_the_key(data, needle):
    with pytest.raises(OncoflowError) as info:
        validate_params(data, "p.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("parameter file p.yaml: ")
    assert needle in message


def test_hash_ignores_spelling_but_not_values():
    base = {
        "setting": {"binWidth": 25, "label": 1},
        "imageType": {"Original": {}, "Wavelet": None},
        "featureClass": {"glcm": ["Contrast", "Idm"], "firstorder": None},
    }
    respelled = {
        "featureClass": {"firstorder": [], "glcm": ["Idm", "Contrast", "Idm"]},
        "imageType": {"Wavelet": {}, "Original": None},
        "setting": {"label": 1, "binWidth": 25.0},
    }
    h = validate_params(base).params_hash()
    assert len(h) == 64
    assert validate_params(respelled).params_hash() == h
    changed = {**base, "setting": {"binWidth": 20, "label": 1}}
    assert validate_params(changed).params_hash() != h
    # LoG sigma spelling changes pyradiomics' feature names, so it changes the hash
    a = validate_params({"imageType": {"LoG": {"sigma": [1]}}})
    b = validate_params({"imageType": {"LoG": {"sigma": [1.0]}}})
    assert a.params_hash() != b.params_hash()


def test_defaults_are_explicit_in_canonical_form():
    canonical = validate_params({}).canonical()
    assert canonical["imageType"] == {"Original": {}}
    assert set(canonical["featureClass"]) == {
        "firstorder",
        "glcm",
        "gldm",
        "glrlm",
        "glszm",
        "ngtdm",
        "shape",
        "shape2D",
    }


def test_presets_match_the_files_and_load():
    files = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert files == sorted(p.value for p in Preset)
    hashes = set()
    for preset in Preset:
        params, label = load_params(preset.value)
        assert label == f"preset:{preset.value}"
        assert {"Original", "LoG", "Wavelet"} <= set(params.canonical()["imageType"])
        hashes.add(params.params_hash())
        # the same file given by path gives the same parameters
        same, _ = load_params(str(preset.path))
        assert same.params_hash() == params.params_hash()
    assert len(hashes) == 3
    ct, _ = load_params("ct")
    assert ct.setting.binWidth == 25
    mr, _ = load_params("mr")
    assert mr.setting.normalize is True
    pet, _ = load_params("pet")
    assert pet.setting.binWidth == 0.5


def test_file_errors(tmp_path: Path):
    with pytest.raises(OncoflowError, match="not found"):
        load_params(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("setting: [binWidth: 25\n")
    with pytest.raises(OncoflowError, match=r"broken\.yaml: not valid YAML/JSON"):
        load_params(str(broken))
    good = tmp_path / "mine.yaml"
    good.write_text(yaml.safe_dump({"setting": {"binWidth": 10}, "imageType": {"Original": {}}}))
    params, label = load_params(str(good))
    assert label == "mine.yaml"
    assert params.setting.binWidth == 10.0
    with pytest.raises(OncoflowError, match="no radiomics parameters"):
        load_params("  ")
