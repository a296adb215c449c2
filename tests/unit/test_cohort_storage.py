"""Retries: only transient storage errors are retried, with capped, jittered backoff."""

from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from s3fs.errors import translate_boto_error

from tasks.cohort.storage import Retrier, RetryPolicy, StorageUnavailable, is_transient


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (translate_boto_error(client_error("SlowDown", 503)), True),
        (translate_boto_error(client_error("InternalError", 500)), True),
        (client_error("RequestTimeout", 400), True),
        (client_error("TooManyRequests", 429), True),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (translate_boto_error(client_error("AccessDenied", 403)), False),
        (translate_boto_error(client_error("NoSuchKey", 404)), False),
        (FileNotFoundError("x"), False),
        (FileExistsError("x"), False),
        (OSError(errno.EIO, "disk"), False),
        (ValueError("bad"), False),
    ],
)
def test_transient_classification(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_retrier_retries_transient_then_gives_up_with_one_line() -> None:
    calls = []

    def flaky(fail_times: int) -> str:
        calls.append(1)
        if len(calls) <= fail_times:
            raise translate_boto_error(client_error("SlowDown", 503))
        return "ok"

    retry = Retrier(RetryPolicy(attempts=4, base_delay=0.0, seed=0))
    assert retry("uploading x", flaky, 3) == "ok"
    assert retry.retries == 3 and len(calls) == 4
    calls.clear()
    with pytest.raises(StorageUnavailable) as err:
        retry("uploading x", flaky, 10)
    assert len(calls) == 4
    assert str(err.value) == (
        "storage kept failing while uploading x (4 attempts): OSError; "
        "run the command again to resume"
    )


def test_retrier_does_not_retry_permanent_errors() -> None:
    calls = []

    def denied() -> None:
        calls.append(1)
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        Retrier(RetryPolicy(attempts=5, base_delay=0.0))("reading", denied)
    assert len(calls) == 1


def test_backoff_is_capped_full_jitter() -> None:
    retry = Retrier(RetryPolicy(base_delay=0.5, max_delay=3.0, seed=42))
    delays = [[retry.delay(a) for _ in range(200)] for a in range(6)]
    for attempt, samples in enumerate(delays):
        cap = min(3.0, 0.5 * 2**attempt)
        assert all(0.0 <= d <= cap for d in samples)
        assert max(samples) > 0.8 * cap  # spread over the whole range (jitter)
    again = Retrier(RetryPolicy(base_delay=0.5, max_delay=3.0, seed=42))
    assert [again.delay(0) for _ in range(3)] == delays[0][:3]  # seeded
