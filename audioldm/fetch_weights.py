"""Download a preset's weights into the Hugging Face cache (run at image build time).

    python -m audioldm.fetch_weights audioldm2

Hub repos of diffusers pipelines often hold each component twice (``.bin`` and
``.safetensors``); only safetensors are fetched where a folder has them, which halves the
image and never unpickles anything at run time.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import PurePosixPath

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


def files_to_fetch(repo_files: list[str]) -> list[str]:
    """Everything but weights, plus per folder its safetensors (else its .bin as a last resort)."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    keep = []
    for name in repo_files:
        if name.endswith(WEIGHT_SUFFIXES):
            by_folder[str(PurePosixPath(name).parent)].append(name)
        else:
            keep.append(name)
    for names in by_folder.values():
        safetensors = [name for name in names if name.endswith(".safetensors")]
        keep.extend(safetensors or [name for name in names if name.endswith(".bin")])
    return sorted(keep)


def fetch(preset: str) -> str:
    from huggingface_hub import HfApi, snapshot_download

    from audioldm.models import presets

    config = presets()[preset]
    if "repo_id" not in config:
        raise SystemExit(f"preset {preset!r} has no hub weights to fetch")
    repo_id = config["repo_id"]
    wanted = files_to_fetch(HfApi().list_repo_files(repo_id))
    return snapshot_download(repo_id, allow_patterns=wanted)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["audioldm2"]:
        print(f"{name}: {fetch(name)}")
