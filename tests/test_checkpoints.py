"""The on-storage checkpoint format, against a real S3 server (SeaweedFS) and a local folder."""

from __future__ import annotations

import json
import pickle
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from audioldm.checkpoints import (
    FORMAT,
    MANIFEST,
    Manifest,
    download_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_json,
    load_tensors,
    parse_manifest,
    resolve_checkpoint,
    step_dir_name,
    upload_checkpoint,
    write_checkpoint,
)
from audioldm.errors import ModelError, StorageError
from audioldm.storage import S3Credentials, Storage, join

LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_v"]}


# ---------------------------------------------------------------------------------------------
# backends: the same tests over s3:// and a local folder
# ---------------------------------------------------------------------------------------------


@dataclass
class Backend:
    storage: Storage
    run_uri: str
    s3_client: object | None = None  # a raw boto3 client, to change objects behind the code's back

    def put_raw(self, uri: str, data: bytes) -> None:
        if self.s3_client is None:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            Path(uri).write_bytes(data)
        else:
            bucket, _, key = uri.removeprefix("s3://").partition("/")
            self.s3_client.put_object(Bucket=bucket, Key=key, Body=data)

    def delete(self, uri: str) -> None:
        if self.s3_client is None:
            Path(uri).unlink()
        else:
            bucket, _, key = uri.removeprefix("s3://").partition("/")
            self.s3_client.delete_object(Bucket=bucket, Key=key)


@pytest.fixture(scope="module")
def s3_backend(s3) -> Backend:
    """One bucket and client for the module: a new SeaweedFS bucket costs ~0.3 s on first write."""
    creds = S3Credentials(endpoint_url=s3.endpoint_url, access_key_id=s3.access_key,
                          secret_access_key=s3.secret_key, region="us-east-1")
    storage = Storage(creds, max_attempts=2, connect_timeout=2, read_timeout=10)
    return Backend(storage, f"s3://{s3.make_bucket()}/", s3.client())


@pytest.fixture(params=["s3", "local"])
def backend(request, tmp_path: Path) -> Backend:
    if request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        return Backend(Storage(None, local_roots=[root]), str(root / "runs" / "dogs-v1") + "/")
    shared: Backend = request.getfixturevalue("s3_backend")
    run = join(shared.run_uri, "runs", uuid.uuid4().hex[:12], "dogs-v1") + "/"  # a fresh run per test
    return Backend(shared.storage, run, shared.s3_client)


def make_tensors(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 3, generator=g)
    return {
        "unet_lora.safetensors": {
            "a": a,
            "tied": a,  # aliased: safetensors refuses these unless cloned
            "row": a[1],  # a view into a's storage
            "t": a.t(),  # not contiguous
            "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
            "half_scalar": torch.tensor(3.5, dtype=torch.float16),
            "ints": torch.arange(7, dtype=torch.int64),
            "requires_grad": torch.randn(2, 2, generator=g, requires_grad=True),
        },
        "text_lora.safetensors": {"w": torch.randn(2, 8, generator=g, dtype=torch.float64)},
    }


def write(tmp_path: Path, step: int, seed: int = 0) -> tuple[Path, Manifest]:
    local = tmp_path / "work" / step_dir_name(step)
    manifest = write_checkpoint(
        local, step, make_tensors(seed + step),
        {"training_state.json": {"step": step, "loss": 0.25, "lr": [1e-4, 5e-5]},
         "lora_config.json": dict(LORA)},
        method="lora", base_model="cvssp/audioldm2", seed=seed, max_steps=2000, lora=LORA,
        extra={"dataset": "dogs"},
    )
    return local, manifest


def put_checkpoint(backend: Backend, tmp_path: Path, step: int) -> tuple[str, Manifest]:
    local, manifest = write(tmp_path, step)
    return upload_checkpoint(backend.storage, local, backend.run_uri), manifest


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (x.dtype == y.dtype and x.shape == y.shape and
            torch.equal(x.detach().reshape(-1).contiguous().view(torch.uint8),
                        y.detach().reshape(-1).contiguous().view(torch.uint8)))


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*")}


# ---------------------------------------------------------------------------------------------
# round trip and discovery
# ---------------------------------------------------------------------------------------------


def test_round_trip(backend: Backend, tmp_path: Path) -> None:
    uri_500, written = put_checkpoint(backend, tmp_path, 500)
    uri_1000, _ = put_checkpoint(backend, tmp_path, 1000)
    assert uri_500 == join(backend.run_uri, "checkpoints", "step-00000500") + "/"

    assert list_checkpoints(backend.storage, backend.run_uri) == [(500, uri_500), (1000, uri_1000)]
    assert latest_checkpoint(backend.storage, backend.run_uri) == (1000, uri_1000)

    folder, manifest = download_checkpoint(backend.storage, uri_500, tmp_path / "cache")
    assert manifest == written
    assert manifest.format == FORMAT and manifest.step == 500 and manifest.method == "lora"
    assert manifest.lora == {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_v"]}
    assert manifest.extra == {"dataset": "dogs"}
    assert folder.parent == tmp_path / "cache"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*written.files, MANIFEST])

    for name, original in make_tensors(500).items():
        loaded = load_tensors(folder / name)
        assert loaded.keys() == original.keys()
        for key, tensor in original.items():
            assert same_bits(loaded[key], tensor), (name, key)
    assert load_json(folder / "training_state.json") == {"step": 500, "loss": 0.25, "lr": [1e-4, 5e-5]}
    assert load_json(folder / "lora_config.json") == LORA


def test_interrupted_upload_is_ignored(backend: Backend, tmp_path: Path) -> None:
    uri_500, _ = put_checkpoint(backend, tmp_path, 500)
    # Step 1000 dies mid-upload: its weights and JSON are there, its manifest never made it.
    local, manifest = write(tmp_path, 1000)
    uri_1000 = join(backend.run_uri, "checkpoints", "step-00001000")
    for name in manifest.files:
        backend.storage.put_file(local / name, join(uri_1000, name))
    assert len(backend.storage.list(uri_1000)) == len(manifest.files)

    assert list_checkpoints(backend.storage, backend.run_uri) == [(500, uri_500)]
    assert resolve_checkpoint(backend.storage, backend.run_uri) == uri_500
    with pytest.raises(ModelError, match="no complete checkpoint"):
        resolve_checkpoint(backend.storage, uri_1000)


def test_resolve_checkpoint(backend: Backend, tmp_path: Path) -> None:
    uri_500, _ = put_checkpoint(backend, tmp_path, 500)
    uri_1500, _ = put_checkpoint(backend, tmp_path, 1500)
    # Stray objects that look almost like checkpoints are not checkpoints.
    backend.put_raw(join(backend.run_uri, "checkpoints", "step-9", MANIFEST), b"{}")
    backend.put_raw(join(backend.run_uri, "checkpoints", "latest", MANIFEST), b"{}")
    backend.put_raw(join(backend.run_uri, "checkpoints", MANIFEST), b"{}")

    assert resolve_checkpoint(backend.storage, backend.run_uri) == uri_1500
    assert resolve_checkpoint(backend.storage, backend.run_uri.rstrip("/")) == uri_1500
    assert resolve_checkpoint(backend.storage, uri_500) == uri_500
    assert resolve_checkpoint(backend.storage, uri_500.rstrip("/")) == uri_500

    empty = join(backend.run_uri, "empty")
    if backend.s3_client is None:
        Path(empty).mkdir()
    with pytest.raises(ModelError, match="no complete checkpoint at"):
        resolve_checkpoint(backend.storage, empty)


# ---------------------------------------------------------------------------------------------
# hostile or damaged storage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("same_size", [True, False])
def test_tampered_weights_are_refused(backend: Backend, tmp_path: Path, same_size: bool) -> None:
    uri, manifest = put_checkpoint(backend, tmp_path, 500)
    name = "text_lora.safetensors"
    good = (tmp_path / "work" / "step-00000500" / name).read_bytes()
    evil = good[:-1] + bytes([good[-1] ^ 1]) if same_size else good + b"x"
    backend.put_raw(join(uri, name), evil)

    cache = tmp_path / "cache"
    what = "sha256" if same_size else "bytes"
    with pytest.raises(ModelError, match=rf"{name}.*{what}"):
        download_checkpoint(backend.storage, uri, cache)
    assert list(cache.iterdir()) == []  # no final folder, no temp folder, no stray file


def hostile_manifests() -> list[tuple[str, object]]:
    def rename(new: str):
        def edit(m: dict) -> None:
            m["files"][new] = m["files"].pop("text_lora.safetensors")
        return edit

    def setter(key: str, value: object):
        return lambda m: m.__setitem__(key, value)

    return [
        ("traversal", rename("../../evil.safetensors")),
        ("subfolder", rename("sub/evil.safetensors")),
        ("backslash", rename("..\\evil.safetensors")),
        ("absolute", rename("/tmp/evil.safetensors")),
        ("hidden", rename(".evil.safetensors")),
        ("pickle", rename("model.pkl")),
        ("bin", rename("x.bin")),
        ("torch", rename("weights.pt")),
        ("manifest", rename(MANIFEST)),
        ("format", setter("format", "audioldm2-worker/checkpoint-v9")),
        ("no-format", lambda m: m.pop("format")),
        ("string-step", setter("step", "500")),
        ("unknown-key", setter("exec", "rm -rf /")),
        ("bad-sha", lambda m: m["files"]["text_lora.safetensors"].__setitem__("sha256", "00")),
        ("lora-string-rank", lambda m: m["lora"].__setitem__("rank", "4")),
        ("lora-extra-key", lambda m: m["lora"].__setitem__("dropout", 0.1)),
        ("lora-for-full", setter("method", "full")),
        ("not-object", lambda m: m.clear() or m.update({"format": FORMAT, "files": []})),
    ]


@pytest.mark.parametrize("edit", [e for _, e in hostile_manifests()],
                         ids=[n for n, _ in hostile_manifests()])
def test_hostile_manifest_is_refused(backend: Backend, tmp_path: Path, edit) -> None:
    uri, _ = put_checkpoint(backend, tmp_path, 500)
    data = json.loads((tmp_path / "work" / "step-00000500" / MANIFEST).read_bytes())
    edit(data)
    backend.put_raw(join(uri, MANIFEST), json.dumps(data).encode())

    cache = tmp_path / "sandbox" / "cache"
    cache.mkdir(parents=True)
    before = files_under(tmp_path)
    with pytest.raises(ModelError, match="manifest|format"):
        download_checkpoint(backend.storage, uri, cache)
    assert files_under(tmp_path) == before  # nothing written anywhere, cache included
    assert not list(Path("/tmp").glob("evil.safetensors"))


def test_unparseable_and_oversized_manifests(backend: Backend, tmp_path: Path) -> None:
    uri, _ = put_checkpoint(backend, tmp_path, 500)
    for raw in (b"\x80not json", b"[1, 2]", b""):
        backend.put_raw(join(uri, MANIFEST), raw)
        with pytest.raises(ModelError, match="manifest"):
            download_checkpoint(backend.storage, uri, tmp_path / "cache")
    backend.put_raw(join(uri, MANIFEST), b" " * (1024 * 1024 + 1))
    with pytest.raises(StorageError, match="larger than"):
        download_checkpoint(backend.storage, uri, tmp_path / "cache")


def test_total_size_cap(backend: Backend, tmp_path: Path) -> None:
    uri, manifest = put_checkpoint(backend, tmp_path, 500)
    with pytest.raises(ModelError, match="more than the limit"):
        download_checkpoint(backend.storage, uri, tmp_path / "cache", max_total_bytes=manifest.total_bytes - 1)
    assert not (tmp_path / "cache").exists()
    download_checkpoint(backend.storage, uri, tmp_path / "cache", max_total_bytes=manifest.total_bytes)


class _Exploit:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    marker: Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_is_never_loaded(backend: Backend, tmp_path: Path) -> None:
    exploit = _Exploit()
    exploit.marker = tmp_path / "PWNED"
    payload = pickle.dumps(exploit)

    uri, _ = put_checkpoint(backend, tmp_path, 500)
    for stray in ("weights.pt", "pytorch_model.bin", "model.pkl"):
        backend.put_raw(join(uri, stray), payload)

    folder, manifest = download_checkpoint(backend.storage, uri, tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest.files, MANIFEST])
    for name in manifest.files:
        (load_tensors if name.endswith(".safetensors") else load_json)(folder / name)

    # Loading a pickle by hand is refused by name, and a pickle dressed as safetensors fails to parse.
    (tmp_path / "weights.pt").write_bytes(payload)
    (tmp_path / "fake.safetensors").write_bytes(payload)
    with pytest.raises(ModelError, match="only .safetensors"):
        load_tensors(tmp_path / "weights.pt")
    with pytest.raises(ModelError, match="cannot read weights"):
        load_tensors(tmp_path / "fake.safetensors")
    assert not exploit.marker.exists()

    # A manifest that lists the pickle is refused before anything is fetched.
    data = json.loads((tmp_path / "work" / "step-00000500" / MANIFEST).read_bytes())
    data["files"]["weights.pt"] = data["files"].pop("text_lora.safetensors")
    backend.put_raw(join(uri, MANIFEST), json.dumps(data).encode())
    with pytest.raises(ModelError, match="weights.pt"):
        download_checkpoint(backend.storage, uri, tmp_path / "cache2")
    assert not exploit.marker.exists()


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


def test_second_download_uses_the_cache(backend: Backend, tmp_path: Path) -> None:
    uri, manifest = put_checkpoint(backend, tmp_path, 500)
    cache = tmp_path / "cache"
    first, _ = download_checkpoint(backend.storage, uri, cache)

    # Only the manifest is read again: with every other object gone, the download still works.
    for name in manifest.files:
        backend.delete(join(uri, name))
    again, again_manifest = download_checkpoint(backend.storage, uri, cache)
    assert again == first and again_manifest == manifest
    assert load_tensors(again / "text_lora.safetensors").keys() == {"w"}

    # A damaged cache copy is not trusted: it is fetched again (which now fails: objects are gone).
    (first / "text_lora.safetensors").unlink()
    with pytest.raises(ModelError, match="cannot download checkpoint file .*not found"):
        download_checkpoint(backend.storage, uri, cache)
    assert list(cache.iterdir()) == []


def test_rewritten_checkpoint_gets_a_new_cache_folder(backend: Backend, tmp_path: Path) -> None:
    uri, _ = put_checkpoint(backend, tmp_path, 500)
    cache = tmp_path / "cache"
    first, _ = download_checkpoint(backend.storage, uri, cache)
    local, _ = write(tmp_path / "other", 500, seed=7)  # same step, other weights
    assert upload_checkpoint(backend.storage, local, backend.run_uri) == uri
    second, _ = download_checkpoint(backend.storage, uri, cache)
    assert second != first
    assert same_bits(load_tensors(second / "text_lora.safetensors")["w"],
                     make_tensors(507)["text_lora.safetensors"]["w"])


def test_concurrent_downloads_share_one_folder(tmp_path: Path) -> None:
    root = tmp_path / "store"
    storage = Storage(None, local_roots=[root])
    run = str(root / "run")
    local, _ = write(tmp_path, 500)
    uri = upload_checkpoint(storage, local, run)

    results: list[Path] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(download_checkpoint(storage, uri, tmp_path / "cache")[0])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [results[0].name]  # no .part left


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def test_write_checkpoint_refuses_bad_input(tmp_path: Path) -> None:
    tensors = {"w.safetensors": {"x": torch.zeros(2)}}
    common = dict(method="lora", base_model="m", seed=0, max_steps=10, lora=LORA)
    for bad_tensors, bad_json in [
        ({"../w.safetensors": {"x": torch.zeros(2)}}, {}),
        ({"w.pt": {"x": torch.zeros(2)}}, {}),
        ({"w.json": {"x": torch.zeros(2)}}, {}),
        (tensors, {"state.safetensors": {}}),
        (tensors, {MANIFEST: {}}),
        ({}, {"state.json": {}}),
    ]:
        with pytest.raises(ValueError):
            write_checkpoint(tmp_path / "a", 1, bad_tensors, bad_json, **common)
        assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="lora"):
        write_checkpoint(tmp_path / "b", 1, tensors, {}, **{**common, "lora": None})
    with pytest.raises(ValueError, match="lora"):
        write_checkpoint(tmp_path / "c", 1, tensors, {}, **{**common, "method": "full"})
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # refused before writing
    with pytest.raises(ValueError):
        step_dir_name(100_000_000)


def test_full_checkpoint_and_local_manifest(tmp_path: Path) -> None:
    manifest = write_checkpoint(tmp_path / "full", 0, {"unet.safetensors": {"x": torch.ones(3)}}, {},
                                method="full", base_model="cvssp/audioldm2-music", seed=1, max_steps=1,
                                created="2026-01-02T03:04:05+00:00")
    raw = (tmp_path / "full" / MANIFEST).read_bytes()
    assert parse_manifest(raw, "x") == manifest
    assert json.loads(raw)["format"] == FORMAT
    # Rewriting a folder replaces its files and manifest.
    again = write_checkpoint(tmp_path / "full", 1, {"unet.safetensors": {"x": torch.zeros(3)}}, {},
                             method="full", base_model="m", seed=1, max_steps=1)
    assert again.step == 1 and again.files["unet.safetensors"] != manifest.files["unet.safetensors"]
    assert parse_manifest((tmp_path / "full" / MANIFEST).read_bytes(), "x") == again
    assert manifest.lora is None and manifest.created == "2026-01-02T03:04:05+00:00"
    assert step_dir_name(0) == "step-00000000" and step_dir_name(500) == "step-00000500"
