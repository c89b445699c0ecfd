"""Load an AudioLDM2 pipeline directory (hub layout) onto a device, with the GPT-2 trap handled."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AudioLDM2Pipeline
from transformers import GPT2LMHeadModel

from audioldm.errors import ModelError

# Every component AudioLDM2Pipeline.__init__ takes; each has a folder of that name in the hub layout.
COMPONENTS = (
    "vae",
    "text_encoder",
    "text_encoder_2",
    "projection_model",
    "language_model",
    "tokenizer",
    "tokenizer_2",
    "feature_extractor",
    "unet",
    "scheduler",
    "vocoder",
)


def check_pipeline_dir(path: Path) -> None:
    """Raise ModelError unless `path` looks like a saved AudioLDM2 pipeline.

    Checked up front because diffusers' own errors for a wrong directory are vague (or, without
    local_files_only, an attempt to reach the hub).
    """
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{path} is not a diffusers pipeline: model_index.json is missing")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{index_path} cannot be read as JSON: {error}") from error
    if not isinstance(index, dict) or index.get("_class_name") != "AudioLDM2Pipeline":
        found = index.get("_class_name") if isinstance(index, dict) else None
        raise ModelError(f"{path} is not an AudioLDM2 pipeline (model_index.json names {found!r})")
    missing = [name for name in COMPONENTS if not index.get(name) or not (path / name).is_dir()]
    if missing:
        raise ModelError(f"AudioLDM2 pipeline at {path} lacks component(s): {', '.join(missing)}")


def load_pipeline(path: str | Path, device: torch.device | str, dtype: torch.dtype) -> AudioLDM2Pipeline:
    """Load the pipeline saved at `path`, in `dtype`, on `device`, with its progress bar off.

    Raises ModelError when `path` is not a loadable AudioLDM2 pipeline.
    """
    path = Path(path)
    check_pipeline_dir(path)
    try:
        # The hub checkpoints declare language_model as GPT2Model, which lacks what transformers 5's
        # generation helpers need (the pipeline fails in `_update_model_kwargs_for_generation`).
        # GPT2LMHeadModel reads the same weights (its lm_head is tied to the embeddings), so load it
        # ourselves and hand it in instead of the declared class.
        language_model = GPT2LMHeadModel.from_pretrained(
            path, subfolder="language_model", dtype=dtype, local_files_only=True
        )
        # `dtype`, not `torch_dtype`: both libraries deprecate the old name in these versions.
        pipe = AudioLDM2Pipeline.from_pretrained(
            path, language_model=language_model, dtype=dtype, local_files_only=True
        )
    except torch.OutOfMemoryError:
        raise  # not a property of the model directory; let the caller see it for what it is
    except Exception as error:  # diffusers/transformers raise many types (OSError, ValueError, KeyError...)
        raise ModelError(f"could not load the AudioLDM2 pipeline at {path}: {type(error).__name__}: {error}") from error
    pipe = pipe.to(device)
    # Jobs report progress their own way; tqdm bars would only clutter the worker's logs.
    pipe.set_progress_bar_config(disable=True)
    return pipe
