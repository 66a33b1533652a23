"""S3 access through boto3: URIs, a client, boto3's failures as one line, reading an object.

Credentials come from the environment or boto3's chain (profiles, SSO, instance roles) and are never
written here; the endpoint of an S3-compatible store from `--endpoint-url` or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from rlhf.core.errors import UserError


def split_s3(uri: str, key_required: bool = False) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"); a malformed URI is one line naming it."""
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", uri)
    key = (m[2] or "").strip("/") if m else ""
    if not m or (key_required and not key):
        raise UserError(f"{uri}: not an S3 URI (expected s3://bucket/{'key' if key_required else 'prefix'})")
    return m[1], key


def client(endpoint_url: str | None = None, timeout: float | None = None):
    """A boto3 S3 client; with `timeout`, one that gives up on an endpoint that does not answer within about that
    many seconds (two attempts of half each; botocore's default waits 60 s a connection)."""
    import boto3
    from botocore.config import Config

    # Standard retries: three attempts, so a dead endpoint is reported in seconds rather than after five.
    if not timeout:
        return boto3.client("s3", endpoint_url=endpoint_url or None, config=Config(retries={"mode": "standard"}))
    retries = {"mode": "standard", "total_max_attempts": 2}
    config = Config(connect_timeout=timeout / 2, read_timeout=timeout / 2, retries=retries)
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=config)


@contextmanager
def s3_errors(uri: str, s3) -> Iterator[None]:
    """boto3's failures as one line naming the URI and the endpoint."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    at = f"at {s3.meta.endpoint_url}"
    try:
        yield
    except EndpointConnectionError:
        raise UserError(f"{uri}: cannot connect to the S3 endpoint {s3.meta.endpoint_url}") from None
    except NoCredentialsError:
        raise UserError(
            f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        ) from None
    except ClientError as e:
        code, status = e.response["Error"].get("Code", ""), e.response["ResponseMetadata"].get("HTTPStatusCode")
        bucket = split_s3(uri)[0]
        if code == "NoSuchBucket" or (code == "404" and e.operation_name == "HeadBucket"):
            raise UserError(f"{uri}: bucket {bucket!r} does not exist {at}") from None
        if code in ("NoSuchKey", "404"):
            raise UserError(f"{uri}: no such object {at}") from None
        if status == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise UserError(f"{uri}: access denied {at} ({code}): check the credentials") from None
        raise UserError(f"{uri}: {code or status} {at}: {e.response['Error'].get('Message', e)}") from None
    except (BotoCoreError, Boto3Error) as e:  # Boto3Error: e.g. S3UploadFailedError, a part refused mid-upload
        raise UserError(f"{uri}: {e} {at}") from None


def read_bytes(uri: str) -> bytes:
    """The bytes of an S3 object (a prompt set given as s3://bucket/key)."""
    bucket, key = split_s3(uri, key_required=True)
    s3 = client()
    with s3_errors(uri, s3):
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def check_bucket(uri: str, endpoint_url: str | None = None, timeout: float | None = None) -> None:
    """Fail in one line unless the bucket of `uri` is there and these credentials may use it (within about
    `timeout` seconds when given)."""
    s3 = client(endpoint_url, timeout)
    with s3_errors(uri, s3):
        s3.head_bucket(Bucket=split_s3(uri)[0])
