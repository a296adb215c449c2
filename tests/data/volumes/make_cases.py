"""Make the NIfTI/NRRD test cohort in this folder from pyradiomics' own sample cases.

Source: ``data/{brain1,brain2,breast1,lung1,lung2}_{image,label}.nrrd`` of the pyradiomics 3.0.1
source distribution (PyPI ``pyradiomics-3.0.1.tar.gz``; the same files ship in
``pyradiomics-bhklab``). Each image and label is cropped with SimpleITK to the label's bounding
box plus 4 voxels in-plane and 1 slice (``sitk.RegionOfInterest``: spacing, direction and the
origin of the cropped region kept, pixels unchanged), so the files stay small. ``lung1`` and
``lung2`` get a second label, a 2-voxel ring around the tumour (binary dilation in-plane minus
the tumour), to test multi-label masks. brain1 and brain2 are written as NIfTI, the others as
NRRD. Identifiers are planted where real exports carry them: patient names and birth dates in
the file names, NIfTI ``descrip``, ``aux_file``, ``intent_name`` and ``db_name``, NRRD key/value
fields, and the cases CSV's ``Patient`` column (Greek, Bulgarian, Polish, Hungarian, Irish).

Run: ``uv run python tests/data/volumes/make_cases.py PATH/TO/pyradiomics/data``.
"""

from __future__ import annotations

import csv
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent

#: case -> (file stem with a planted identity, format, patient, study, modality, rows)
CASES = {
    "brain1": ("Papadopoulos_Georgios_1961-03-04", ".nii.gz", "Γεώργιος Παπαδόπουλος", "",
               "MR", [("tumour", "")]),
    "brain2": ("Petrova_Ivana_04.03.1961", ".nii.gz", "Ивана Петрова", "Изследване 2",
               "MR", [("", "")]),
    "breast1": ("Wojcik_Zofia_1958", ".nrrd", "Zofia Wójcik", "", "MR", [("Lesion", "")]),
    "lung1": ("Szoke_Arpad_1949", ".nrrd", "Szőke Árpád", "CT-1", "CT",
              [("GTV", "1"), ("peritumoral ring", "2")]),
    "lung2": ("Ni_Bhriain_Siobhan", ".nrrd", "Siobhán Ní Bhriain", "", "CT", [("", "")]),
}  # fmt: skip
#: Text planted in every header field that can hold it.
HEADER_TEXT = {
    "brain1": "Γεώργιος Παπαδόπουλος 04/03/1961",
    "brain2": "Ивана Петрова 04.03.1961",
    "breast1": "Zofia Wójcik ur. 1958-07-21",
    "lung1": "Szőke Árpád 1949.05.12",
    "lung2": "Siobhán Ní Bhriain 12/05/1949",
}


def crop(image: sitk.Image, label: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    where = np.argwhere(sitk.GetArrayViewFromImage(label) > 0)  # z, y, x
    lo = np.maximum(where.min(axis=0) - [1, 4, 4], 0)
    hi = np.minimum(np.add(where.max(axis=0), [1, 4, 4]), np.array(image.GetSize())[::-1] - 1)
    index = [int(v) for v in lo[::-1]]
    size = [int(v) for v in (hi - lo + 1)[::-1]]
    return sitk.RegionOfInterest(image, size, index), sitk.RegionOfInterest(label, size, index)


def add_ring(label: sitk.Image) -> sitk.Image:
    tumour = sitk.Cast(label > 0, sitk.sitkUInt8)
    grown = sitk.BinaryDilate(tumour, [2, 2, 0])
    array = sitk.GetArrayFromImage(tumour).astype(np.int16)
    array[(sitk.GetArrayViewFromImage(grown) > 0) & (array == 0)] = 2
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(label)
    return out


def plant_nifti(path: Path, text: str) -> None:
    """Write ``text`` into descrip, aux_file, intent_name, db_name and data_type (NIfTI-1)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    assert struct.unpack("<i", raw[:4])[0] == 348
    blob = text.encode("utf-8")
    # descrip, aux_file, intent_name, db_name, data_type (offsets of the NIfTI-1 header)
    for offset, length in ((148, 80), (228, 24), (328, 16), (14, 18), (4, 10)):
        raw[offset : offset + length] = blob[:length].ljust(length, b"\0")
    path.write_bytes(gzip.compress(bytes(raw), mtime=0))


def write(image: sitk.Image, path: Path, case: str) -> None:
    if path.suffix == ".nrrd":
        for key, value in (("PatientName", HEADER_TEXT[case]), ("content", HEADER_TEXT[case])):
            image.SetMetaData(key, value)
        sitk.WriteImage(image, str(path), useCompression=True)
    else:
        sitk.WriteImage(image, str(path), useCompression=True)
        plant_nifti(path, HEADER_TEXT[case])


def main(source: Path) -> None:
    with open(HERE / "cases.csv", "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["Patient", "Study", "Modality", "Image", "Mask", "ROI", "Label"])
        for case, (stem, suffix, patient, study, modality, rows) in CASES.items():
            image = sitk.ReadImage(str(source / f"{case}_image.nrrd"))
            label = sitk.ReadImage(str(source / f"{case}_label.nrrd"))
            image, label = crop(image, label)
            if case.startswith("lung"):
                label = add_ring(label)
            write(image, HERE / f"{stem}_image{suffix}", case)
            write(label, HERE / f"{stem}_mask{suffix}", case)
            for roi, value in rows:
                out.writerow([patient, study, modality, f"{stem}_image{suffix}",
                              f"{stem}_mask{suffix}", roi, value])  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
