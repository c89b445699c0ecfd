"""The on-storage checkpoint format of fine-tune runs.

A run directory (``output.uri``, e.g. ``s3://b/runs/dogs-v1/``) holds one folder per checkpoint::

    checkpoints/step-00000500/
        unet_lora.safetensors      weights: safetensors only, never pickle
        training_state.json        small JSON files
        manifest.json              written and uploaded LAST

``manifest.json`` lists every other file with its sha256 and size. Because it is written last, a
folder without one is an interrupted checkpoint and every reader ignores it. Checkpoint URIs come
from users, so a manifest is treated as hostile input: plain file names with a ``.safetensors`` or
``.json`` suffix only, size caps everywhere, and every downloaded file is checked against its sha256
before anyone can load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from audioldm.errors import ModelError, StorageError
from audioldm.storage import Storage, _atomic_write, join

FORMAT = "audioldm2-worker/checkpoint-v1"
MANIFEST = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"

MiB = 1024 * 1024
GiB = 1024 * MiB
MAX_MANIFEST_BYTES = 1 * MiB
MAX_JSON_BYTES = 16 * MiB  # a checkpoint's own JSON files (configs, training state)
MAX_CHECKPOINT_BYTES = 32 * GiB  # default cap on a whole download: AudioLDM2-large full is ~10 GiB fp32
MAX_FILES = 256
MAX_STEP = 99_999_999  # what 8 digits can name

ALLOWED_SUFFIXES = (".safetensors", ".json")
# One plain name: no '/', '\\', no leading dot (so no '.', '..' or hidden files), no spaces.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_STEP_DIR_RE = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    """``500`` -> ``step-00000500``: fixed width, so names sort like steps."""
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"checkpoint step must be 0..{MAX_STEP}, got {step}")
    return f"step-{step:08d}"


def check_file_name(name: str) -> str:
    """A checkpoint file name that is safe to join onto a local folder or a URI, else ValueError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"checkpoint file name {str(name)[:80]!r} is not a plain file name")
    if not name.endswith(ALLOWED_SUFFIXES):
        raise ValueError(f"checkpoint file {name[:80]!r} must be .safetensors or .json")
    if name.lower() == MANIFEST:
        raise ValueError(f"a checkpoint may not list {MANIFEST} as one of its files")
    return name


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=_SHA256_RE.pattern)
    bytes: int = Field(ge=0)


class LoraInfo(BaseModel):
    """The schema of ``Manifest.lora``, which itself stays a plain dict for its readers."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    target_modules: list[str] = Field(min_length=1)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["audioldm2-worker/checkpoint-v1"] = FORMAT  # the same string as FORMAT
    step: int = Field(ge=0, le=MAX_STEP)
    method: Literal["lora", "full"]
    base_model: str = Field(min_length=1, max_length=1024)
    lora: dict[str, Any] | None = None  # {rank, alpha, target_modules}, checked against LoraInfo
    files: dict[str, FileEntry] = Field(min_length=1, max_length=MAX_FILES)
    created: str  # ISO 8601
    seed: int
    max_steps: int = Field(ge=1)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            check_file_name(name)
        if not any(name.endswith(".safetensors") for name in files):
            raise ValueError("a checkpoint must hold at least one .safetensors file")
        return files

    @field_validator("lora")
    @classmethod
    def _lora_schema(cls, lora: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if lora is None else LoraInfo.model_validate(lora).model_dump()

    @field_validator("created")
    @classmethod
    def _iso_time(cls, created: str) -> str:
        try:
            datetime.fromisoformat(created)
        except ValueError:
            raise ValueError(f"created must be an ISO 8601 time, got {created[:40]!r}") from None
        return created

    @model_validator(mode="after")
    def _lora_matches_method(self) -> Manifest:
        if (self.method == "lora") != (self.lora is not None):
            raise ValueError("lora settings are required for method 'lora' and only for it")
        return self

    @property
    def total_bytes(self) -> int:
        return sum(entry.bytes for entry in self.files.values())


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Validate manifest bytes from anywhere (storage is untrusted); ModelError explains why not."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"checkpoint manifest {where} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ModelError(f"checkpoint manifest {where} is not a JSON object")
    # Checked first so that a newer or foreign format gets a clear message, not a field list.
    if data.get("format") != FORMAT:
        found = str(data.get("format"))[:80]
        raise ModelError(f"checkpoint {where} has unsupported format {found!r} (expected {FORMAT!r})")
    try:
        # strict: no "1" -> 1 or true -> 1 coercions from a file someone else wrote.
        return Manifest.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise ModelError(f"checkpoint manifest {where} is invalid: {_summarize(exc)}") from None


def _summarize(exc: ValidationError, limit: int = 3) -> str:
    # Our own words, not pydantic's str(exc), which echoes whole input values back.
    parts = [f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}"
             for err in exc.errors(include_url=False, include_input=False)[:limit]]
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def read_local_manifest(local_dir: Path) -> Manifest:
    path = Path(local_dir) / MANIFEST
    try:
        raw = _read_capped(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ModelError(f"no {MANIFEST} in {local_dir}") from None
    except ValueError as exc:  # over the size cap
        raise ModelError(str(exc)) from None
    return parse_manifest(raw, str(path))


# ---------------------------------------------------------------------------------------------
# Writing and uploading
# ---------------------------------------------------------------------------------------------


def write_checkpoint(
    local_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    json_files: dict[str, dict[str, Any]],
    *,
    method: Literal["lora", "full"],
    base_model: str,
    seed: int,
    max_steps: int,
    lora: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    created: str | None = None,
) -> Manifest:
    """Write one checkpoint folder: weights, JSON files, then ``manifest.json`` last.

    ``tensors`` maps a ``*.safetensors`` file name to its state dict, ``json_files`` a ``*.json``
    name to its content. Every file is written atomically; existing files of the same names are
    replaced (the old manifest is removed first so a crash never pairs it with new weights).
    """
    local_dir = Path(local_dir)
    step_dir_name(step)  # range check before writing anything
    _check_outputs(tensors, json_files)
    # Validate every manifest field now, with placeholder hashes, so bad arguments fail before
    # gigabytes are written rather than after.
    placeholder = FileEntry(sha256="0" * 64, bytes=0)
    try:
        manifest = Manifest(
            step=step, method=method, base_model=base_model, lora=lora,
            files={name: placeholder for name in [*tensors, *json_files]},
            created=created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            seed=seed, max_steps=max_steps, extra=extra or {},
        )
    except ValidationError as exc:
        raise ValueError(f"invalid checkpoint manifest: {_summarize(exc)}") from exc

    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / MANIFEST).unlink(missing_ok=True)
    files: dict[str, FileEntry] = {}
    for name, state in tensors.items():
        _atomic_write(local_dir / name, lambda tmp, s=state: safetensors.torch.save_file(
            _saveable(s), str(tmp), metadata={"format": "pt"}))
        files[name] = _file_entry(local_dir / name)
    for name, content in json_files.items():
        data = json.dumps(content, indent=2, sort_keys=True).encode()
        _atomic_write(local_dir / name, lambda tmp, d=data: tmp.write_bytes(d))
        files[name] = _file_entry(local_dir / name)

    manifest = manifest.model_copy(update={"files": files})
    manifest_bytes = manifest.model_dump_json(indent=2).encode()
    _atomic_write(local_dir / MANIFEST, lambda tmp: tmp.write_bytes(manifest_bytes))
    return manifest


def _check_outputs(tensors: dict[str, Any], json_files: dict[str, Any]) -> None:
    for name in tensors:
        if not check_file_name(name).endswith(".safetensors"):
            raise ValueError(f"tensor file {name!r} must end with .safetensors")
    for name in json_files:
        if not check_file_name(name).endswith(".json"):
            raise ValueError(f"JSON file {name!r} must end with .json")
    if not tensors:
        raise ValueError("a checkpoint needs at least one tensor file")


def _saveable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors that share no memory.

    safetensors refuses tensors that share storage (tied weights, views of one buffer); cloning
    only those keeps memory use at one copy for the common case.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        elif ptr:
            seen.add(ptr)
        out[key] = t
    return out


def upload_checkpoint(storage: Storage, local_dir: Path, run_uri: str) -> str:
    """Upload a written checkpoint to ``<run_uri>/checkpoints/step-NNNNNNNN/``; returns that URI.

    The manifest goes last, so readers never see a checkpoint whose files are still on the way.
    """
    local_dir = Path(local_dir)
    manifest = read_local_manifest(local_dir)
    target = join(run_uri, CHECKPOINTS_DIR, step_dir_name(manifest.step))
    for name, entry in manifest.files.items():
        path = local_dir / name
        if not path.is_file() or path.stat().st_size != entry.bytes:
            raise ModelError(f"checkpoint file {path} is missing or differs from its manifest")
        storage.put_file(path, join(target, name))
    storage.put_file(local_dir / MANIFEST, join(target, MANIFEST), content_type="application/json")
    return target + "/"


# ---------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------


def list_checkpoints(storage: Storage, run_uri: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run (those with a manifest) as (step, URI with trailing slash)."""
    found: dict[int, str] = {}
    for item in storage.list(join(run_uri, CHECKPOINTS_DIR)):
        # Local listings come back as resolved paths, so match on the tail rather than the prefix.
        parts = item.rstrip("/").split("/")
        if len(parts) < 3 or parts[-1] != MANIFEST or parts[-3] != CHECKPOINTS_DIR:
            continue
        match = _STEP_DIR_RE.match(parts[-2])
        if match:
            found[int(match.group(1))] = join(run_uri, CHECKPOINTS_DIR, parts[-2]) + "/"
    return sorted(found.items())


def latest_checkpoint(storage: Storage, run_uri: str) -> tuple[int, str] | None:
    checkpoints = list_checkpoints(storage, run_uri)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(storage: Storage, uri: str) -> str:
    """A checkpoint folder itself, else the latest complete checkpoint of a run folder."""
    if storage.exists(join(uri, MANIFEST)):
        return uri.rstrip("/") + "/"
    latest = latest_checkpoint(storage, uri)
    if latest is None:
        raise ModelError(f"no complete checkpoint at {uri} (no {MANIFEST} there or in "
                         f"{CHECKPOINTS_DIR}/step-*/)")
    return latest[1]


# ---------------------------------------------------------------------------------------------
# Downloading and loading
# ---------------------------------------------------------------------------------------------


def download_checkpoint(
    storage: Storage, uri: str, cache_dir: Path, *, max_total_bytes: int = MAX_CHECKPOINT_BYTES,
) -> tuple[Path, Manifest]:
    """Fetch a checkpoint folder into ``cache_dir/<sha256 of its manifest>/``; verified, cached.

    The manifest is read on every call (one small GET) so that a checkpoint overwritten in
    storage gets a new cache folder; the weights are fetched once per manifest. Every file is
    checked against the manifest's size and sha256 before the folder becomes visible under its
    final name, and a failed download leaves nothing behind.
    """
    raw = storage.read_bytes(join(uri, MANIFEST), MAX_MANIFEST_BYTES)
    manifest = parse_manifest(raw, join(uri, MANIFEST))
    if manifest.total_bytes > max_total_bytes:
        raise ModelError(f"checkpoint {uri} is {manifest.total_bytes} bytes, "
                         f"more than the limit of {max_total_bytes}")
    cache_dir = Path(cache_dir)
    final = cache_dir / hashlib.sha256(raw).hexdigest()
    if _cached(final, raw, manifest):
        return final, manifest
    shutil.rmtree(final, ignore_errors=True)  # a damaged earlier copy

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{final.name[:16]}-", suffix=".part"))
    try:
        for name, entry in manifest.files.items():
            _fetch_verified(storage, join(uri, name), tmp, name, entry)
        (tmp / MANIFEST).write_bytes(raw)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _cached(final, raw, manifest):  # lost a race to an identical download: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, manifest


def _fetch_verified(storage: Storage, file_uri: str, folder: Path, name: str, entry: FileEntry) -> None:
    dest = folder / check_file_name(name)
    if dest.parent != folder:  # belt and braces: the name check already rules this out
        raise ModelError(f"checkpoint file name {name!r} leaves its folder")
    try:
        storage.get_file(file_uri, dest)
    except StorageError as exc:
        raise ModelError(f"cannot download checkpoint file {name}: {exc}") from exc
    size = dest.stat().st_size
    if size != entry.bytes:
        dest.unlink(missing_ok=True)
        raise ModelError(f"checkpoint file {name} is {size} bytes, its manifest says {entry.bytes}")
    if _sha256(dest) != entry.sha256:
        dest.unlink(missing_ok=True)
        raise ModelError(f"checkpoint file {name} does not match the sha256 in its manifest "
                         f"(corrupted or modified after upload)")


def _cached(folder: Path, raw: bytes, manifest: Manifest) -> bool:
    """A finished cache folder: same manifest, every file there at its size.

    Hashes are not recomputed: they were verified before the folder got its name, and rehashing
    gigabytes on every job would cost more than the check is worth.
    """
    try:
        if (folder / MANIFEST).read_bytes() != raw:
            return False
        return all((folder / n).stat().st_size == e.bytes for n, e in manifest.files.items())
    except OSError:
        return False


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one checkpoint file, on CPU; only safetensors, which cannot run code on load."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"refusing to load {path.name}: only .safetensors weights are loaded")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (OSError, safetensors.SafetensorError) as exc:
        raise ModelError(f"cannot read weights {path.name}: {exc}") from exc


def load_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(_read_capped(path, max_bytes))
    except OSError as exc:
        raise ModelError(f"cannot read {path.name}: {exc.strerror or type(exc).__name__}") from exc
    except ValueError:  # includes UnicodeDecodeError and our size cap
        raise ModelError(f"{path.name} is not valid JSON of at most {max_bytes} bytes") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} is not a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=_sha256(path), bytes=path.stat().st_size)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_capped(path: Path, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path.name} is larger than {max_bytes} bytes")
    return data


__all__ = [
    "FORMAT", "MANIFEST", "FileEntry", "LoraInfo", "Manifest", "check_file_name",
    "download_checkpoint", "latest_checkpoint", "list_checkpoints", "load_json", "load_tensors",
    "parse_manifest", "read_local_manifest", "resolve_checkpoint", "step_dir_name",
    "upload_checkpoint", "write_checkpoint",
]
