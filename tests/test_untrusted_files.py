"""Untrusted weights, end to end: a generate job naming a hostile checkpoint folder.

tests/test_checkpoints.py already covers the format layer (``download_checkpoint`` refuses a
manifest listing a pickle and ignores unlisted files; ``load_tensors`` refuses ``.pt`` by name and
fails to parse a pickle dressed as ``.safetensors``). This module adds the path a user actually
drives: ``Worker.run`` with ``{"task": "generate", "model": <checkpoint URI>}``, on S3 and on a
local folder, for LoRA and full checkpoints.

Every pickle here carries a live payload (proved live once, on a control copy): unpickled, it
creates a marker file. What holds: each hostile checkpoint fails the job with a clear error that
names the file, the marker never appears, and a refused manifest fetches nothing into the cache;
a valid checkpoint with pickles lying next to it works, and those pickles are never fetched.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import uuid
from pathlib import Path

import pytest
import torch

from audioldm import adapters, checkpoints
from helpers import s3_config


class Payload:
    """Unpickling this opens (creates) ``marker``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickled(marker: Path, as_torch_save: bool) -> bytes:
    if not as_torch_save:
        return pickle.dumps(Payload(marker))
    buffer = io.BytesIO()
    torch.save({"state_dict": Payload(marker)}, buffer)  # what a ".pt" / ".bin" from torch looks like
    return buffer.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory, s3):
    """A worker, its roots, a bucket, a marker path, and one valid LoRA and full checkpoint (local)."""
    from diffusers import AudioLDM2UNet2DConditionModel

    from audioldm.settings import Settings
    from audioldm.worker import Worker

    base = tmp_path_factory.mktemp("untrusted")
    roots, cache = base / "roots", base / "cache"
    roots.mkdir()
    worker = Worker(Settings(default_model="tiny", local_roots=[roots], model_search_dirs=[],
                             work_dir=base / "work", checkpoint_cache_dir=cache))
    worker.warm_up()

    unet = AudioLDM2UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapters.add_adapter(unet, "x", adapters.lora_config(4, 4.0))
    lora = checkpoints.write_checkpoint(
        base / "lora", 1, {"adapter.safetensors": adapters.adapter_state_dict(unet, "x")}, {}, method="lora",
        base_model="tiny", seed=0, max_steps=1, lora={"rank": 4, "alpha": 4.0, "target_modules": adapters.TARGET_MODULES})
    adapters.remove_adapter(unet, "x")
    full = checkpoints.write_checkpoint(base / "full", 1, {"unet.safetensors": unet.state_dict()}, {}, method="full",
                                        base_model="tiny", seed=0, max_steps=1)
    assert lora.step == full.step == 1
    return {"worker": worker, "base": base, "roots": roots, "cache": cache, "bucket": s3.make_bucket(),
            "marker": base / "PWNED"}


def place(env, s3, where: str, source: str, files: dict[str, bytes], manifest_edit=None, unique: bool = True) -> str:
    """Copy checkpoint ``source`` (lora/full) to S3 or a local root with files replaced or added,
    the manifest edited by ``manifest_edit(dict)`` (hashes of replaced files kept honest); returns its URI.
    ``unique`` makes each copy's manifest differ (the worker caches checkpoints by manifest digest)."""
    folder = env["base"] / source
    manifest = json.loads((folder / checkpoints.MANIFEST).read_text())
    if unique:
        manifest["extra"] = {"copy": uuid.uuid4().hex}
    content = {name: (folder / name).read_bytes() for name in manifest["files"]}
    content.update(files)
    for name in manifest["files"]:
        data = content[name]
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if manifest_edit:
        manifest_edit(manifest, content)
    content[checkpoints.MANIFEST] = json.dumps(manifest).encode()
    name = f"ckpt-{uuid.uuid4().hex[:8]}"
    if where == "s3":
        client = s3.client()
        for file, data in content.items():
            client.put_object(Bucket=env["bucket"], Key=f"{name}/{file}", Body=data)
        return f"s3://{env['bucket']}/{name}/"
    target = env["roots"] / name
    target.mkdir()
    for file, data in content.items():
        (target / file).write_bytes(data)
    return str(target)


def generate(env, s3, model: str) -> dict:
    return env["worker"].run({"id": f"u-{uuid.uuid4().hex[:6]}", "s3Config": s3_config(s3), "input": {
        "task": "generate", "prompt": "a hum", "duration_s": 0.5, "steps": 1, "candidates": 1, "model": model}})


def list_pickle(env, name: str, as_torch_save: bool):
    """A manifest edit: list a pickle called ``name`` (with its true hash), instead of the weights."""
    def edit(manifest: dict, content: dict) -> None:
        data = pickled(env["marker"], as_torch_save)
        content[name] = data
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return edit


def test_the_payload_is_live(tmp_path):
    control = tmp_path / "control-marker"
    for as_torch_save in (False, True):
        data = pickled(control, as_torch_save)
        if as_torch_save:
            torch.load(io.BytesIO(data), weights_only=False)  # what an unsafe loader would do
        else:
            pickle.loads(data)
        assert control.exists()
        control.unlink()


@pytest.mark.parametrize("where", ["s3", "local"])
@pytest.mark.parametrize(("case", "source", "expected"), [
    ("manifest lists weights.pt", "lora", r"weights\.pt.* must be \.safetensors or \.json"),
    ("manifest lists pytorch_model.bin", "full", r"pytorch_model\.bin.* must be \.safetensors or \.json"),
    ("adapter.safetensors is a pickle", "lora", r"cannot read weights adapter\.safetensors"),
    ("unet.safetensors is a pickle", "full", r"cannot read weights unet\.safetensors"),
    ("adapter.safetensors is a torch.save file", "lora", r"cannot read weights adapter\.safetensors"),
])
def test_hostile_checkpoint_fails_the_job_and_runs_nothing(env, s3, where, case, source, expected):
    import re

    weights = "adapter.safetensors" if source == "lora" else "unet.safetensors"
    if case.startswith("manifest lists"):
        bad = case.split()[-1]
        uri = place(env, s3, where, source, {}, list_pickle(env, bad, as_torch_save=True))
    else:
        uri = place(env, s3, where, source, {weights: pickled(env["marker"], "torch.save" in case)})
    cached_before = set(env["cache"].glob("*")) if env["cache"].exists() else set()

    result = generate(env, s3, uri)

    assert set(result) == {"error"}, result
    assert re.search(expected, result["error"]), result["error"]
    assert "Traceback" not in result["error"] and "internal error" not in result["error"]
    assert not env["marker"].exists(), "a pickle from a user's checkpoint was executed"
    if case.startswith("manifest lists"):  # refused from the manifest alone: nothing fetched
        assert (set(env["cache"].glob("*")) if env["cache"].exists() else set()) == cached_before


@pytest.mark.parametrize("where", ["s3", "local"])
def test_pickles_beside_a_valid_checkpoint_are_never_fetched_or_run(env, s3, where):
    strays = {name: pickled(env["marker"], True) for name in ("adapter.bin", "pytorch_model.bin", "weights.pt")}
    uri = place(env, s3, where, "lora", {}, lambda manifest, content: content.update(strays))
    result = generate(env, s3, uri)
    assert "error" not in result, result
    assert result["model"]["name"] == uri
    assert not env["marker"].exists()
    for name in strays:
        assert not list(env["cache"].rglob(name)), f"{name} was fetched into the cache"


def test_a_copied_checkpoint_is_reported_under_the_name_the_job_used(env, s3):
    first = place(env, s3, "s3", "lora", {}, unique=False)
    second = place(env, s3, "local", "lora", {}, unique=False)  # byte-identical copy elsewhere
    assert generate(env, s3, first)["model"]["name"] == first
    assert generate(env, s3, second)["model"]["name"] == second
