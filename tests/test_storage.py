"""audioldm.storage against a real S3 server (SeaweedFS, auth on) and real local folders. No mocks."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from audioldm import storage as storage_mod
from audioldm.errors import StorageError
from audioldm.storage import MiB, S3Credentials, Storage, join

PART = 5 * MiB  # the smallest part S3 (and SeaweedFS) accept


def creds_for(s3, *, access_key=None, secret_key=None, endpoint=None) -> S3Credentials:
    return S3Credentials(
        endpoint_url=endpoint or s3.endpoint_url,
        access_key_id=access_key or s3.access_key,
        secret_access_key=secret_key or s3.secret_key,
        region="us-east-1",
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def store(s3, root: Path) -> Storage:
    # A small multipart threshold keeps the multipart test fast; 2 attempts keep failures quick.
    return Storage(creds_for(s3), [root], max_attempts=2, connect_timeout=2, read_timeout=10,
                   multipart_threshold=PART, multipart_chunksize=PART)


@pytest.fixture
def bucket(s3) -> str:
    return s3.make_bucket()


def keys_in(s3, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def assert_no_secrets(exc: BaseException, *secrets: str) -> None:
    texts = [str(exc), repr(exc)]
    if exc.__cause__ is not None:
        texts += [str(exc.__cause__), repr(exc.__cause__)]
    for secret in secrets:
        assert all(secret not in text for text in texts), "a key leaked into the error"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


# ---------------------------------------------------------------------------------------------
# S3: happy paths
# ---------------------------------------------------------------------------------------------


def test_put_get_round_trip(s3, store: Storage, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "clip.wav"
    src.write_bytes(b"RIFF" + os.urandom(1000))
    uri = f"s3://{bucket}/runs/job-1/clip.wav"

    assert store.put_file(src, uri) == uri
    assert store.exists(uri)
    assert not store.exists(f"s3://{bucket}/runs/job-1/other.wav")
    head = s3.client().head_object(Bucket=bucket, Key="runs/job-1/clip.wav")
    assert head["ContentType"].startswith("audio/")

    out = store.get_file(uri, tmp_path / "dl" / "clip.wav")
    assert out.read_bytes() == src.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["clip.wav"]  # no temp file left

    # list treats the prefix as a folder: "runs/job" does not match "runs/job-1/..."
    assert store.list(f"s3://{bucket}/runs/job-1") == [uri]
    assert store.list(f"s3://{bucket}/runs/job") == []
    assert store.list(f"s3://{bucket}") == [uri]


def test_multipart_upload_is_intact(s3, store: Storage, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(2 * PART + 123))  # 3 parts
    uri = f"s3://{bucket}/big.bin"
    store.put_file(src, uri)

    etag = s3.client().head_object(Bucket=bucket, Key="big.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), f"expected a 3-part multipart ETag, got {etag}"
    out = store.get_file(uri, tmp_path / "big.out")
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_put_bytes_read_bytes(s3, store: Storage, bucket: str) -> None:
    uri = join(f"s3://{bucket}/", "manifests", "job.json")
    body = json.dumps({"ok": True}).encode()
    store.put_bytes(body, uri)
    assert store.read_bytes(uri, max_bytes=1000) == body
    head = s3.client().head_object(Bucket=bucket, Key="manifests/job.json")
    assert head["ContentType"] == "application/json"
    with pytest.raises(StorageError, match="larger than 5 bytes"):
        store.read_bytes(uri, max_bytes=5)


def test_check_writable_passes_with_good_keys(store: Storage, bucket: str) -> None:
    store.check_writable(f"s3://{bucket}/some/prefix/")


# ---------------------------------------------------------------------------------------------
# Presigned URLs
# ---------------------------------------------------------------------------------------------


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_presigned_url_downloads_and_tampering_is_refused(store: Storage, bucket: str) -> None:
    uri = store.put_bytes(b"hello audio", f"s3://{bucket}/p/a.txt", content_type="text/plain")
    url = store.presign(uri, 600)
    assert url is not None
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.read() == b"hello audio"

    store.put_bytes(b"other", f"s3://{bucket}/p/b.txt")
    assert http_status(url.replace("/p/a.txt", "/p/b.txt")) == 403  # another object, same signature
    sig_at = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    flipped = "0" if url[sig_at] != "0" else "1"
    assert http_status(url[:sig_at] + flipped + url[sig_at + 1:]) == 403
    assert http_status(url.replace("X-Amz-Expires=600", "X-Amz-Expires=6000")) == 403


def test_expired_presigned_url_is_refused(store: Storage, bucket: str) -> None:
    uri = store.put_bytes(b"soon gone", f"s3://{bucket}/e.txt")
    url = store.presign(uri, 1)
    time.sleep(2.1)  # X-Amz-Date has one-second resolution
    assert http_status(url) == 403


def test_presign_bounds_and_local(store: Storage, root: Path, bucket: str) -> None:
    with pytest.raises(StorageError, match="lifetime"):
        store.presign(f"s3://{bucket}/x", 0)
    with pytest.raises(StorageError, match="lifetime"):
        store.presign(f"s3://{bucket}/x", 8 * 24 * 3600)
    assert store.presign(str(root / "x.wav"), 60) is None
    with pytest.raises(StorageError, match="outside the allowed local roots"):
        store.presign("/etc/passwd", 60)


# ---------------------------------------------------------------------------------------------
# S3: failures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [100, PART + 1], ids=["single", "multipart"])
def test_wrong_secret_is_clear_leaks_nothing_and_writes_nothing(
        s3, root: Path, bucket: str, tmp_path: Path, size: int) -> None:
    bad_secret = "WRONG" + s3.secret_key[5:]
    bad = Storage(creds_for(s3, secret_key=bad_secret), [root], max_attempts=2,
                  multipart_threshold=PART, multipart_chunksize=PART)
    src = tmp_path / "x.bin"
    src.write_bytes(os.urandom(size))

    with pytest.raises(StorageError) as info:
        bad.put_file(src, f"s3://{bucket}/x.bin")
    msg = str(info.value)
    assert f"storage rejected the credentials for bucket '{bucket}' at {s3.endpoint_url}" in msg
    assert_no_secrets(info.value, bad_secret, s3.secret_key, s3.access_key)
    assert keys_in(s3, bucket) == []
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_unknown_access_key_is_clear(s3, root: Path, bucket: str) -> None:
    bad_key = "AKUNKNOWN" + s3.access_key[9:]
    bad = Storage(creds_for(s3, access_key=bad_key), [root], max_attempts=2)
    with pytest.raises(StorageError, match="rejected the credentials") as info:
        bad.put_bytes(b"{}", f"s3://{bucket}/m.json")
    assert_no_secrets(info.value, bad_key, s3.secret_key, s3.access_key)
    with pytest.raises(StorageError, match="rejected the credentials"):
        bad.read_bytes(f"s3://{bucket}/m.json", 100)
    assert keys_in(s3, bucket) == []


def test_check_writable_fails_fast_on_wrong_keys(s3, root: Path, bucket: str) -> None:
    bad = Storage(creds_for(s3, secret_key="nope" * 10), [root])  # default retries: 403 is not retried
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"rejected the credentials for bucket '{bucket}'") as info:
        bad.check_writable(f"s3://{bucket}/out/")
    assert time.monotonic() - started < 3
    assert_no_secrets(info.value, "nope" * 10, s3.access_key)
    assert keys_in(s3, bucket) == []


def test_missing_bucket_is_clear(s3, store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "a.wav"
    src.write_bytes(b"x")
    expected = f"bucket 'no-such-bucket-here' does not exist at {s3.endpoint_url}"
    with pytest.raises(StorageError, match=expected):
        store.check_writable("s3://no-such-bucket-here/out")
    with pytest.raises(StorageError, match=expected):
        store.put_file(src, "s3://no-such-bucket-here/a.wav")
    with pytest.raises(StorageError, match=expected):
        store.list("s3://no-such-bucket-here/")
    assert "no-such-bucket-here" not in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}


def test_missing_object_is_clear(store: Storage, bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/nothing/here.wav"
    with pytest.raises(StorageError, match=f"object {uri} not found"):
        store.get_file(uri, tmp_path / "dl" / "here.wav")
    assert list((tmp_path / "dl").iterdir()) == []  # no partial or temp file
    with pytest.raises(StorageError, match=f"object {uri} not found"):
        store.read_bytes(uri, 100)
    assert store.exists(uri) is False


def test_unreachable_endpoint_fails_quickly(s3, root: Path, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    dead = Storage(creds_for(s3, endpoint=endpoint), [root], max_attempts=2,
                   connect_timeout=1, read_timeout=2)
    src = tmp_path / "a.wav"
    src.write_bytes(b"x")
    started = time.monotonic()
    for call in (lambda: dead.check_writable("s3://bucket-a/out"),
                 lambda: dead.put_file(src, "s3://bucket-a/a.wav"),
                 lambda: dead.get_file("s3://bucket-a/a.wav", tmp_path / "b.wav"),
                 lambda: dead.list("s3://bucket-a/")):
        with pytest.raises(StorageError, match=f"cannot reach storage endpoint {endpoint}") as info:
            call()
        assert_no_secrets(info.value, s3.secret_key, s3.access_key)
    assert time.monotonic() - started < 10


def test_bad_uris_are_refused(store: Storage) -> None:
    with pytest.raises(StorageError, match="unsupported storage URI scheme"):
        store.exists("https://example.com/x.wav")
    with pytest.raises(StorageError, match="invalid bucket name"):
        store.exists("s3://Bad_Bucket/x")
    with pytest.raises(StorageError, match="names a prefix"):
        store.put_bytes(b"", "s3://bucket-a/dir/")


# ---------------------------------------------------------------------------------------------
# Local paths
# ---------------------------------------------------------------------------------------------


def test_local_round_trip_and_forms(store: Storage, root: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "a.wav"
    src.write_bytes(b"one")
    dest = root / "runs" / "j1" / "a.wav"
    assert store.put_file(src, str(dest)) == str(dest)
    assert dest.read_bytes() == b"one"
    assert oct(dest.stat().st_mode & 0o777) == "0o644"

    store.put_bytes(b'{"a": 1}', f"file://{root}/runs/j1/m.json")
    assert store.read_bytes(str(root / "runs/j1/m.json"), 100) == b'{"a": 1}'
    monkeypatch.chdir(root)
    assert store.exists("runs/j1/a.wav")
    assert store.list("runs") == [str(root / "runs/j1/a.wav"), str(root / "runs/j1/m.json")]
    assert store.get_file("runs/j1/a.wav", tmp_path / "copy.wav").read_bytes() == b"one"
    assert store.list(str(root / "nothing")) == []
    with pytest.raises(StorageError, match="not found"):
        store.get_file(str(root / "missing.wav"), tmp_path / "m.wav")


def test_local_write_is_atomic(store: Storage, root: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    dest = root / "out.wav"
    dest.write_bytes(b"old complete file")
    src = tmp_path / "new.wav"
    src.write_bytes(b"new" * 1000)

    def broken_copy(_src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"half")  # a crash mid-copy
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage_mod.shutil, "copyfile", broken_copy)
    with pytest.raises(StorageError, match="No space left"):
        store.put_file(src, str(dest))
    assert dest.read_bytes() == b"old complete file"
    assert sorted(p.name for p in root.iterdir()) == ["out.wav"]  # temp file cleaned up

    monkeypatch.undo()
    store.put_file(src, str(dest))
    assert dest.read_bytes() == b"new" * 1000
    assert sorted(p.name for p in root.iterdir()) == ["out.wav"]


def test_local_escapes_are_refused(store: Storage, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("private")
    (root / "link").symlink_to(outside)  # a folder link leading out of the root
    (root / "file-link.txt").symlink_to(outside / "secret.txt")
    src = tmp_path / "a.wav"
    src.write_bytes(b"x")

    for uri in (f"{root}/../outside/x.wav", f"{root}/link/x.wav", f"file://{root}/link/x.wav",
                "/etc/passwd", str(root / "file-link.txt")):
        with pytest.raises(StorageError, match="outside the allowed local roots"):
            store.put_file(src, uri)
    with pytest.raises(StorageError, match="outside the allowed local roots"):
        store.read_bytes(str(root / "link" / "secret.txt"), 100)
    with pytest.raises(StorageError, match="outside the allowed local roots"):
        store.check_writable(f"{root}/../elsewhere")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "private"
    assert store.list(str(root)) == []  # links out of the root are not listed


def test_local_check_writable_creates_folder(store: Storage, root: Path) -> None:
    store.check_writable(str(root / "a" / "b"))
    assert (root / "a" / "b").is_dir()


def test_no_roots_means_no_local_paths(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="outside the allowed local roots"):
        Storage().put_bytes(b"x", str(tmp_path / "x"))


# ---------------------------------------------------------------------------------------------
# join, credentials
# ---------------------------------------------------------------------------------------------


def test_join() -> None:
    assert join("s3://b", "x.wav") == "s3://b/x.wav"
    assert join("s3://b/out/", "/run", "x.wav") == "s3://b/out/run/x.wav"
    assert join("/data/out", "a/./b", "") == "/data/out/a/b"
    assert join("file:///data/", "x") == "file:///data/x"
    assert join("s3://b/p") == "s3://b/p"
    with pytest.raises(StorageError, match=r"'\.\.'"):
        join("s3://b/out", "../../etc")


ENV = {"BUCKET_ENDPOINT_URL": "https://env.example.com", "BUCKET_ACCESS_KEY_ID": "ENVKEYID1234",
       "BUCKET_SECRET_ACCESS_KEY": "envsecretvalue", "BUCKET_NAME": "env-bucket"}
JOB = {"accessId": "JOBKEYID5678", "accessSecret": "jobsecretvalue", "bucketName": "job-bucket",
       "endpointUrl": "https://job.example.com"}


def test_from_job_precedence() -> None:
    job = S3Credentials.from_job(JOB, ENV)
    assert (job.endpoint_url, job.access_key_id, job.secret_access_key, job.bucket) == (
        "https://job.example.com", "JOBKEYID5678", "jobsecretvalue", "job-bucket")
    env = S3Credentials.from_job(None, ENV)
    assert (env.endpoint_url, env.access_key_id, env.bucket) == (
        "https://env.example.com", "ENVKEYID1234", "env-bucket")
    assert S3Credentials.from_job({}, ENV) == env
    assert S3Credentials.from_job(None, {}) is None
    aws = S3Credentials.from_job({**JOB, "endpointUrl": "https://s3.eu-west-2.amazonaws.com"}, {})
    assert aws.region == "eu-west-2"


def test_from_job_refuses_half_configs() -> None:
    # Env keys must never be sent to an endpoint named by the request.
    with pytest.raises(StorageError, match="accessId and accessSecret"):
        S3Credentials.from_job({"endpointUrl": "https://evil.example.com"}, ENV)
    with pytest.raises(StorageError, match="set together"):
        S3Credentials.from_job(None, {"BUCKET_ACCESS_KEY_ID": "x"})
    with pytest.raises(StorageError, match="BUCKET_ENDPOINT_URL is set"):
        S3Credentials.from_job(None, {"BUCKET_ENDPOINT_URL": "https://x.example.com"})
    with pytest.raises(StorageError, match="http"):
        S3Credentials.from_job({**JOB, "endpointUrl": "ftp://x"}, {})


def test_repr_and_str_hide_keys(root: Path) -> None:
    creds = S3Credentials.from_job(JOB, {})
    storage = Storage(creds, [root])
    for text in (repr(creds), str(creds), f"{creds}", repr(storage), str([creds])):
        assert "JOBKEYID5678" not in text and "jobsecretvalue" not in text
        assert "job.example.com" in text
