"""Pure helpers of the PACS ingest: source URLs, date filters, QIDO paging, credentials, names."""

from __future__ import annotations

import pytest

from flows.pacs import PullParams
from tasks.errors import OncoflowError
from tasks.pacs.credentials import (
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    _from_mapping,
    load_credentials,
)
from tasks.pacs.dicomweb import (
    TAG_STUDY_UID,
    is_dicomweb_source,
    opaque_key,
    parse_source,
    search_all,
    study_date_filter,
)
from tasks.pacs.receiver import validate_ae_title
from tasks.refs import RefKey


def test_parse_source_accepts_dicomweb_urls_and_refuses_credentials() -> None:
    assert parse_source("dicomweb+http://pacs:8042/dicom-web/") == "http://pacs:8042/dicom-web"
    assert parse_source(" dicomweb+https://pacs.example/dw ") == "https://pacs.example/dw"
    assert is_dicomweb_source("DICOMWEB+http://x") and not is_dicomweb_source("s3://b/p")
    for bad in ("http://pacs/dicom-web", "dicomweb+ftp://pacs/x", "dicomweb+http:///x"):
        with pytest.raises(OncoflowError, match="not a DICOMweb source"):
            parse_source(bad)
    with pytest.raises(OncoflowError, match="credentials must not be part"):
        parse_source("dicomweb+http://reader:secret@pacs/dicom-web")
    with pytest.raises(OncoflowError, match="query"):
        parse_source("dicomweb+http://pacs/dicom-web?token=abc")


def test_study_date_filter() -> None:
    assert study_date_filter("last", None, None) is None
    assert study_date_filter("all", None, "2024-03-10T01:00:00+01:00") is None
    assert study_date_filter("last", None, "2024-03-10T01:00:00+01:00") == "20240309-"
    assert study_date_filter("last", None, "2024-03-10T01:00:00+01:00", overlap_days=0) == (
        "20240310-"
    )
    assert study_date_filter("2023-01-31", "2023-02-28", None) == "20230131-20230228"
    assert study_date_filter("all", "20230228", None) == "-20230228"
    with pytest.raises(OncoflowError, match="after the --until"):
        study_date_filter("2023-03-01", "2023-02-28", None)
    with pytest.raises(OncoflowError, match="invalid --since date"):
        study_date_filter("2023-02-30", None, None)
    with pytest.raises(OncoflowError, match="invalid --until date"):
        study_date_filter("all", "yesterday", None)


def _item(uid: str) -> dict:
    return {TAG_STUDY_UID: {"vr": "UI", "Value": [uid]}}


def test_search_all_pages_until_a_short_page() -> None:
    items = [_item(f"1.2.{i}") for i in range(2500)]
    calls = []

    def search(limit: int, offset: int) -> list[dict]:
        calls.append((limit, offset))
        return items[offset : offset + limit]

    got = search_all(search, TAG_STUDY_UID, page=1000)
    assert [i[TAG_STUDY_UID]["Value"][0] for i in got] == [f"1.2.{i}" for i in range(2500)]
    assert calls == [(1000, 0), (1000, 1000), (1000, 2000)]


def test_search_all_stops_when_the_server_ignores_offset() -> None:
    items = [_item(f"1.2.{i}") for i in range(3)]
    calls = []

    def search(limit: int, offset: int) -> list[dict]:  # always the same page
        calls.append(offset)
        return items

    assert len(search_all(search, TAG_STUDY_UID, page=3)) == 3
    assert calls == [0, 3]


def test_opaque_keys_hide_uids() -> None:
    site = RefKey(b"k" * 32)
    key = opaque_key("1.2.840.113619.2.55.3", site)
    assert len(key) == 32 and set(key) <= set("0123456789abcdef")
    assert key == opaque_key("1.2.840.113619.2.55.3", site)
    assert key != opaque_key("1.2.840.113619.2.55.4", site)
    assert key != opaque_key("1.2.840.113619.2.55.3", RefKey(b"x" * 32))  # keyed
    assert "113619" not in key


def test_credentials_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_USER, ENV_PASSWORD, ENV_TOKEN):
        monkeypatch.delenv(name, raising=False)
    assert load_credentials().origin == "none"
    monkeypatch.setenv(ENV_USER, "reader")
    with pytest.raises(OncoflowError, match=ENV_PASSWORD):
        load_credentials()
    monkeypatch.setenv(ENV_PASSWORD, "pw")
    creds = load_credentials("ignored-block")
    assert (creds.user, creds.password, creds.origin) == ("reader", "pw", "environment")
    assert creds.session().auth == ("reader", "pw")
    assert "pw" not in repr(creds)
    monkeypatch.setenv(ENV_TOKEN, "tok")
    assert load_credentials().session().headers["Authorization"] == "Bearer tok"


def test_secret_block_values() -> None:
    assert _from_mapping({"user": "u", "password": "p"}, "b").password == "p"
    assert _from_mapping('{"username": "u", "password": "p"}', "b").user == "u"
    assert _from_mapping("u:p:with-colon", "b").password == "p:with-colon"
    assert _from_mapping("just-a-token", "b").token == "just-a-token"
    with pytest.raises(OncoflowError, match="unknown shape"):
        _from_mapping({"nothing": 1}, "b")


def test_ae_titles() -> None:
    assert validate_ae_title(" ONCOFLOW ") == "ONCOFLOW"
    for bad in ("", "A" * 17, "BAD\\AE", "tab\tae"):
        with pytest.raises(OncoflowError):
            validate_ae_title(bad)


def test_pull_params_normalise_and_check(tmp_path) -> None:
    params = PullParams(
        source="dicomweb+http://pacs/dicom-web",
        site="site-a",
        store=str(tmp_path),
        modalities=["ct", " PT", "CT", ""],
        since="ALL",
    )
    assert params.modalities == ["CT", "PT"] and params.since == "all"
    assert (
        PullParams(
            source="dicomweb+http://pacs/dicom-web", site="site-a", store="x", since="2024-01-02"
        ).since
        == "2024-01-02"
    )
    with pytest.raises(ValueError, match="invalid modality"):
        PullParams(source="dicomweb+http://p/d", site="site-a", store="x", modalities=["C T"])
    with pytest.raises(OncoflowError, match="invalid --since"):
        PullParams(source="dicomweb+http://p/d", site="site-a", store="x", since="soon")
    with pytest.raises(OncoflowError, match="invalid site"):
        PullParams(source="dicomweb+http://p/d", site="Site A", store="x")


def test_cli_refuses_dicomweb_options_for_a_folder_source(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    args = ["ingest", str(tmp_path), "--site", "site-a", "--store", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as excinfo:
        main([*args, "--modality", "CT"])
    assert excinfo.value.code == 2
    assert "apply to dicomweb+ sources only" in capsys.readouterr().err
