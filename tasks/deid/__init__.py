"""De-identification and pseudonymisation to DICOM PS3.15 (Annex E), with audit and a leak gate.

Modules:

* :mod:`tasks.deid.profile` — the PS3.15 Table E.1-1 action table (as data) and the options.
* :mod:`tasks.deid.allowlist` — the reviewed allow-list of attributes kept, derived from the
  standard's module tables (``allow_list.txt``).
* :mod:`tasks.deid.policy` — the one decision table both engines call for every element, and
  the value checks against the data dictionary.
* :mod:`tasks.deid.checks` — instance checks before the walk (documents, burned-in text,
  overlays, bounded inflation).
* :mod:`tasks.deid.secret` — the site secret (environment or Prefect Secret block).
* :mod:`tasks.deid.pseudonyms` — keyed pseudonyms, UID remapping and per-patient date shifts.
* :mod:`tasks.deid.descriptors` — descriptors rebuilt from a multilingual vocabulary
  (``vocabulary.txt``), dates and times in European forms removed.
* :mod:`tasks.deid.pixels` — burned-in annotation risk and configured pixel cleaning.
* :mod:`tasks.deid.dataset` — de-identify one pydicom Dataset (every nested level).
* :mod:`tasks.deid.rewrite` — the same decisions applied to a file's byte stream (same output,
  no pydicom Dataset; the pydicom path takes the files it does not handle).
* :mod:`tasks.deid.series` — de-identify one series from the private catalogue (the task body).
* :mod:`tasks.deid.audit` — audit counts (attribute, action, count; never values).
* :mod:`tasks.deid.scan_phi` — the leak gate over DICOM and table files.
"""
