"""One small interface over object storage (``s3://bucket/key``) and local paths.

Works with AWS S3 and S3-compatible services (Cloudflare R2, MinIO, SeaweedFS, ...) through boto3
directly; runpod's ``rp_upload`` is avoided on purpose (it invents bucket names and silently falls
back to a local folder when credentials are missing).

Credentials (``S3Credentials.from_job``):
  1. the request's ``s3Config`` {accessId, accessSecret, bucketName, endpointUrl}, used as a whole;
  2. else env BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY
     (+ optional BUCKET_REGION, BUCKET_NAME);
  3. else None: ``Storage(None)`` then uses boto3's own default chain (AWS_* env, shared config,
     instance/container role), which only makes sense for AWS itself.
  The env keys are never combined with a request's endpoint, so a request cannot make the worker
  send the operator's keys to a host of the caller's choosing.

Every failure is a ``StorageError`` whose message is safe to return to the caller: it names the
bucket, object and endpoint, never the access key id or the secret.
"""

from __future__ import annotations

import mimetypes
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from audioldm.errors import StorageError

MiB = 1024 * 1024
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 limit

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# s3.eu-west-1.amazonaws.com, s3-eu-west-1.amazonaws.com, bucket.s3.eu-west-1.amazonaws.com
_AWS_REGION_RE = re.compile(r"(?:^|\.)s3[.-]([a-z]{2}(?:-[a-z]+)+-\d)\.amazonaws\.com$")
_SAFE_CODE_RE = re.compile(r"^[A-Za-z0-9.]{1,64}$")

# Codes meaning "these keys may not do this here". 403 without a code (HEAD requests) joins them.
_AUTH_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "AllAccessDisabled",
    "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed",
    "InvalidSecurity", "Forbidden", "403",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})

_SESSION: Any = None  # the process's boto3 session (see Storage._make_client)
_SESSION_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Credentials:
    endpoint_url: str | None
    access_key_id: str
    secret_access_key: str
    region: str | None = None
    bucket: str | None = None

    def __repr__(self) -> str:
        # Hand-written so that logs, tracebacks and f-strings never carry either key.
        return (f"S3Credentials(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
                f"bucket={self.bucket!r}, access_key_id='***', secret_access_key='***')")

    __str__ = __repr__

    @classmethod
    def from_job(cls, s3_config: Mapping[str, Any] | None,
                 env: Mapping[str, str] = os.environ) -> S3Credentials | None:
        """Credentials for one job: its ``s3Config`` wins, else BUCKET_* env, else None."""
        if s3_config:
            return cls._from_s3_config(s3_config)
        return cls._from_env(env)

    @classmethod
    def _from_s3_config(cls, cfg: Mapping[str, Any]) -> S3Credentials:
        if not isinstance(cfg, Mapping):
            raise StorageError("s3Config must be an object")
        key_id, secret = _clean(cfg.get("accessId")), _clean(cfg.get("accessSecret"))
        if not (key_id and secret):
            # All-or-nothing: falling back to env keys here would send them to the request's endpoint.
            raise StorageError("s3Config needs both accessId and accessSecret")
        endpoint = _check_endpoint(_clean(cfg.get("endpointUrl")), "s3Config.endpointUrl")
        return cls(endpoint, key_id, secret, _region_from_endpoint(endpoint), _clean(cfg.get("bucketName")))

    @classmethod
    def _from_env(cls, env: Mapping[str, str]) -> S3Credentials | None:
        key_id = _clean(env.get("BUCKET_ACCESS_KEY_ID"))
        secret = _clean(env.get("BUCKET_SECRET_ACCESS_KEY"))
        endpoint = _check_endpoint(_clean(env.get("BUCKET_ENDPOINT_URL")), "BUCKET_ENDPOINT_URL")
        if key_id and secret:
            region = _clean(env.get("BUCKET_REGION")) or _region_from_endpoint(endpoint)
            return cls(endpoint, key_id, secret, region, _clean(env.get("BUCKET_NAME")))
        if key_id or secret:
            raise StorageError("BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY must be set together")
        if endpoint:
            # A custom endpoint with AWS's default chain is almost surely a misconfiguration.
            raise StorageError("BUCKET_ENDPOINT_URL is set but BUCKET_ACCESS_KEY_ID / "
                               "BUCKET_SECRET_ACCESS_KEY are not")
        return None


def _clean(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _check_endpoint(url: str | None, name: str) -> str | None:
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range or not a number
    except ValueError:  # "http://[::1" (bad IPv6), "http://host:99999"
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(f"{name} must be an http(s) URL such as https://s3.example.com")
    return url


def _region_from_endpoint(endpoint: str | None) -> str | None:
    host = urlsplit(endpoint).hostname if endpoint else None
    match = _AWS_REGION_RE.search(host or "")
    return match.group(1) if match else None


def _is_aws(endpoint: str) -> bool:
    return (urlsplit(endpoint).hostname or "").endswith(".amazonaws.com")


def _display_endpoint(url: str | None) -> str:
    """scheme://host[:port][/path]: drops userinfo and query so nothing secret can ride along."""
    if not url:
        return "the default AWS S3 endpoint"
    p = urlsplit(url)
    port = f":{p.port}" if p.port else ""
    return f"{p.scheme}://{p.hostname}{port}{p.path.rstrip('/')}"


# ---------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b"); the key may be empty (a bucket-wide prefix)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise StorageError(f"invalid bucket name in {uri!r}")
    if len(key.encode()) > 1024:
        raise StorageError(f"object key too long in {uri[:80]!r}...")
    return bucket, key


def join(prefix_uri: str, *parts: str) -> str:
    """Join path parts onto an s3:// URI or a local path, always with '/'.

    Parts are relative names; '..' is refused (they may come from callers) and empty or '.'
    segments are dropped, so join("s3://b/out/", "/run", "x.wav") == "s3://b/out/run/x.wav".
    """
    segments: list[str] = []
    for part in parts:
        for seg in str(part).split("/"):
            if seg == "..":
                raise StorageError(f"'..' is not allowed in a storage path: {part!r}")
            if seg not in ("", "."):
                segments.append(seg)
    if not segments:
        return prefix_uri
    return prefix_uri.rstrip("/") + "/" + "/".join(segments)


def _local_raw_path(uri: str) -> str:
    """Path text of a local URI: plain path or file:///path; other schemes are refused."""
    match = _SCHEME_RE.match(uri)
    if not match:
        return uri
    if match.group(1).lower() != "file":
        raise StorageError(f"unsupported storage URI scheme {match.group(1)!r}: use s3:// or a local path")
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"file:// URI with a remote host is not supported: {uri!r}")
    return unquote(parts.path)


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


class Storage:
    """put/get/exists/list/presign over s3:// URIs and local paths inside ``local_roots``.

    Local paths given as URIs must resolve (symlinks and '..' included) inside one of
    ``local_roots``; with no roots, local URIs are refused. The ``local`` argument of
    put_file/get_file is the worker's own file and is not restricted.
    """

    def __init__(
        self,
        credentials: S3Credentials | None = None,
        local_roots: Iterable[Path | str] = (),
        *,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,  # S3 requires parts >= 5 MiB (but the last)
        max_concurrency: int = 8,
    ) -> None:
        self._creds = credentials
        self._roots = [Path(r).resolve() for r in local_roots]
        self._max_attempts = max_attempts
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            num_download_attempts=max_attempts,
            preferred_transfer_client="classic",  # same behaviour whether awscrt is installed or not
        )
        self._client_obj: Any = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Storage(credentials={self._creds!r}, local_roots={self._roots!r})"

    @property
    def credentials(self) -> S3Credentials | None:
        return self._creds

    # -- public API ----------------------------------------------------------------------------

    def put_file(self, local: Path | str, uri: str, content_type: str | None = None) -> str:
        local = Path(local)
        if not local.is_file():
            raise StorageError(f"local file {local} does not exist")
        if is_s3_uri(uri):
            bucket, key = self._object(uri)
            extra = {"ContentType": content_type or _guess_type(uri)}
            with self._s3_errors("upload", bucket, key):
                self._client().upload_file(str(local), bucket, key, ExtraArgs=extra, Config=self._transfer)
        else:
            dest = self._local(uri)
            with _local_errors("write", uri):
                _atomic_write(dest, lambda tmp: shutil.copyfile(local, tmp))
        return uri

    def get_file(self, uri: str, local: Path | str) -> Path:
        local = Path(local)
        if is_s3_uri(uri):
            bucket, key = self._object(uri)
            with self._s3_errors("download", bucket, key):
                _atomic_write(local, lambda tmp: self._client().download_file(
                    bucket, key, str(tmp), Config=self._transfer))
        else:
            src = self._local(uri)
            if not src.is_file():
                raise StorageError(f"local file {uri} not found")
            with _local_errors("read", uri):
                _atomic_write(local, lambda tmp: shutil.copyfile(src, tmp))
        return local

    def exists(self, uri: str) -> bool:
        if not is_s3_uri(uri):
            return self._local(uri).is_file()
        bucket, key = self._object(uri)
        with self._s3_errors("check", bucket, key):
            try:
                self._client().head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if _status(exc) == 404:  # HEAD has no body, so no NoSuchKey code to look at
                    return False
                raise
        return True

    def size(self, uri: str) -> int:
        """Bytes of an existing object; StorageError when it is missing."""
        if not is_s3_uri(uri):
            path = self._local(uri)
            if not path.is_file():
                raise StorageError(f"file {uri!r} not found")
            return path.stat().st_size
        bucket, key = self._object(uri)
        with self._s3_errors("read", bucket, key):
            return int(self._client().head_object(Bucket=bucket, Key=key)["ContentLength"])

    def list(self, prefix_uri: str) -> list[str]:
        """Objects under a prefix, treated as a folder (``s3://b/run`` lists ``run/...``), sorted."""
        if not is_s3_uri(prefix_uri):
            return self._list_local(prefix_uri)
        bucket, prefix = parse_s3_uri(prefix_uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        keys: list[str] = []
        with self._s3_errors("list", bucket):
            pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return sorted(f"s3://{bucket}/{k}" for k in keys)

    def presign(self, uri: str, expires_s: int) -> str | None:
        """A GET URL valid for ``expires_s`` seconds; None for local paths (nothing to sign)."""
        if not is_s3_uri(uri):
            self._local(uri)  # still refuse paths outside the roots
            return None
        if not 1 <= expires_s <= MAX_PRESIGN_SECONDS:
            raise StorageError(f"presigned URL lifetime must be 1..{MAX_PRESIGN_SECONDS} s")
        bucket, key = self._object(uri)
        with self._s3_errors("presign", bucket, key):
            return self._client().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s)

    def check_writable(self, prefix_uri: str) -> None:
        """Fail fast, before expensive work, when results could not be stored.

        s3: HEAD the bucket, which catches wrong keys, a missing bucket and an unreachable
        endpoint without writing anything. It needs s3:ListBucket, so strictly write-only keys
        fail here although they could upload. Local: inside the roots and creatable.
        """
        if is_s3_uri(prefix_uri):
            bucket, _ = parse_s3_uri(prefix_uri)
            with self._s3_errors("check", bucket):
                self._client().head_bucket(Bucket=bucket)
            return
        path = self._local(prefix_uri)
        with _local_errors("create", prefix_uri):
            path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise StorageError(f"local folder {prefix_uri} is not writable")

    def read_bytes(self, uri: str, max_bytes: int) -> bytes:
        """A small object (a JSON manifest); larger than ``max_bytes`` is an error, not a truncation."""
        if not is_s3_uri(uri):
            path = self._local(uri)
            if not path.is_file():
                raise StorageError(f"local file {uri} not found")
            with _local_errors("read", uri), open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        else:
            bucket, key = self._object(uri)
            with self._s3_errors("read", bucket, key):
                resp = self._client().get_object(Bucket=bucket, Key=key)
                with resp["Body"] as body:
                    if resp.get("ContentLength", 0) > max_bytes:
                        raise StorageError(f"{uri} is larger than {max_bytes} bytes")
                    data = body.read(max_bytes + 1)  # the length header could lie
        if len(data) > max_bytes:
            raise StorageError(f"{uri} is larger than {max_bytes} bytes")
        return data

    def put_bytes(self, data: bytes, uri: str, content_type: str = "application/json") -> str:
        if is_s3_uri(uri):
            bucket, key = self._object(uri)
            with self._s3_errors("upload", bucket, key):
                self._client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        else:
            dest = self._local(uri)
            with _local_errors("write", uri):
                _atomic_write(dest, lambda tmp: tmp.write_bytes(data))
        return uri

    # -- local paths ---------------------------------------------------------------------------

    def _local(self, uri: str) -> Path:
        """Resolve a local URI (symlinks, '..', relative to cwd) and insist it stays inside the roots."""
        if not uri:
            raise StorageError("empty storage path")
        try:
            path = Path(_local_raw_path(uri)).resolve()
        except (OSError, ValueError) as exc:  # NUL bytes, symlink loops
            raise StorageError(f"invalid local path {uri!r}") from exc
        if not any(path.is_relative_to(root) for root in self._roots):
            raise StorageError(f"local path {uri!r} is outside the allowed local roots")
        return path

    def _list_local(self, prefix_uri: str) -> list[str]:
        top = self._local(prefix_uri)
        if top.is_file():
            return [str(top)]
        found: list[str] = []
        for dirpath, _dirs, files in os.walk(top):  # does not descend into symlinked dirs
            for name in files:
                path = Path(dirpath, name)
                # Skip temp files of in-flight atomic writes and links leading out of the roots.
                if name.endswith(".part") and name.startswith("."):
                    continue
                resolved = path.resolve()
                if resolved.is_file() and any(resolved.is_relative_to(r) for r in self._roots):
                    found.append(str(path))
        return sorted(found)

    # -- s3 --------------------------------------------------------------------------------------

    def _object(self, uri: str) -> tuple[str, str]:
        bucket, key = parse_s3_uri(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"{uri!r} names a prefix, not an object")
        return bucket, key

    def _client(self) -> Any:
        # Built lazily (local-only use never touches boto3) and once: clients are thread-safe.
        with self._client_lock:
            if self._client_obj is None:
                self._client_obj = self._make_client()
            return self._client_obj

    def _make_client(self) -> Any:
        creds = self._creds
        kwargs: dict[str, Any] = {}
        s3_options: dict[str, Any] = {}
        if creds is not None:
            kwargs = {
                "aws_access_key_id": creds.access_key_id,
                "aws_secret_access_key": creds.secret_access_key,
                "endpoint_url": creds.endpoint_url,
                # Non-AWS services accept us-east-1 for SigV4 (R2 also takes "auto").
                "region_name": creds.region or ("us-east-1" if creds.endpoint_url else None),
            }
            if creds.endpoint_url and not _is_aws(creds.endpoint_url):
                # Custom endpoints rarely have wildcard DNS for bucket.host addressing.
                s3_options["addressing_style"] = "path"
        config = Config(
            signature_version="s3v4",
            # total_max_attempts counts the first try; botocore's "max_attempts" here would count
            # retries only (one attempt more than asked, and than the error messages say).
            retries={"total_max_attempts": self._max_attempts, "mode": "standard"},
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            # Newer botocore adds CRC checksums by default; R2/MinIO/others may reject them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3=s3_options or None,
        )
        if creds is None:
            # boto3's own chain: a fresh session, so every job resolves (and refreshes) it anew.
            return boto3.session.Session().client("s3", config=config)
        # Explicit keys: one shared session, so botocore parses its service models once (a fresh
        # session per job cost ~170 ms of CPU per job). Building clients from one session is not
        # thread-safe, hence the lock; the clients themselves are.
        global _SESSION
        with _SESSION_LOCK:
            if _SESSION is None:
                _SESSION = boto3.session.Session()
            return _SESSION.client("s3", config=config, **kwargs)

    def _endpoint(self) -> str:
        if self._client_obj is not None:
            return _display_endpoint(self._client_obj.meta.endpoint_url)
        return _display_endpoint(self._creds.endpoint_url if self._creds else None)

    @contextmanager
    def _s3_errors(self, action: str, bucket: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            root = _root_error(exc)
            raise self._describe(root, action, bucket, key) from self._safe_cause(root)

    def _safe_cause(self, exc: BaseException) -> BaseException | None:
        """Keep the original for tracebacks only if its text carries neither key."""
        if self._creds is None:
            return exc
        text = f"{exc!s} {exc!r}"
        keys = (self._creds.access_key_id, self._creds.secret_access_key)
        return None if any(k in text for k in keys) else exc

    def _describe(self, exc: BaseException, action: str, bucket: str, key: str | None) -> StorageError:
        endpoint = self._endpoint()
        target = f"s3://{bucket}/{key}" if key else f"bucket '{bucket}'"
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            if code in _AUTH_CODES or status == 403:
                return StorageError(f"storage rejected the credentials for bucket '{bucket}' at {endpoint} "
                                    f"({code}): check the access key, secret and their permissions")
            if code == "NoSuchBucket" or (status == 404 and key is None):
                return StorageError(f"bucket '{bucket}' does not exist at {endpoint}")
            if code in _NOT_FOUND_CODES or status == 404:
                return StorageError(f"object s3://{bucket}/{key} not found")
            if status is not None and status >= 500:
                return StorageError(f"storage endpoint {endpoint} failed to {action} {target} "
                                    f"({code}, HTTP {status}) after {self._max_attempts} attempts")
            return StorageError(f"storage refused to {action} {target} at {endpoint} ({code}, HTTP {status})")
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            return StorageError(f"cannot reach storage endpoint {endpoint}")
        if isinstance(exc, (ReadTimeoutError, ConnectionClosedError, ResponseStreamingError)):
            return StorageError(f"storage endpoint {endpoint} stopped responding during {action} of {target}")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError("no storage credentials: send s3Config with the request or set "
                                "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY")
        if isinstance(exc, ParamValidationError):
            return StorageError(f"invalid storage request to {action} {target}")
        return StorageError(f"storage error during {action} of {target} at {endpoint} ({type(exc).__name__})")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _root_error(exc: BaseException) -> BaseException:
    """The botocore error inside boto3's wrappers (S3UploadFailedError keeps it as __context__)."""
    seen = exc
    while isinstance(seen, S3UploadFailedError):
        inner = seen.__cause__ or seen.__context__
        if inner is None:
            break
        seen = inner
    return seen


def _code(exc: ClientError) -> str:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code if _SAFE_CODE_RE.match(code) else "unknown error"  # server text goes into messages


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _guess_type(uri: str) -> str:
    return mimetypes.guess_type(uri)[0] or "application/octet-stream"


@contextmanager
def _local_errors(action: str, uri: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot {action} {uri}: {exc.strerror or type(exc).__name__}") from exc


def _atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    """``write`` fills a temp file beside ``dest``, which is then renamed over it: readers never
    see a half-written file, and a failed write leaves the old one in place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # durable before it becomes visible under the real name
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp makes 0600
        os.replace(tmp, dest)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
