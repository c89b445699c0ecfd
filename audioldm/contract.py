"""The job contract: what a caller may put in a RunPod job's ``input``.

Validated at the edge with pydantic, so a bad job fails before any model or storage work,
with every problem listed at once and where it is. `schemas/job.schema.json` is exported
from these models (``python -m audioldm.contract``) and a test fails when it goes stale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "job.schema.json"

MAX_PROMPTS = 64
MAX_CANDIDATES = 8
MAX_DURATION_S = 30.0  # the models were trained on 10.24 s clips; much longer drifts
MIN_DURATION_S = 0.5

MAX_PROMPT_CHARS = 1000

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS)]
ModelRef = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1024)]
Uri = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1024)]


class _Strict(BaseModel):
    # Unknown fields are errors: a typo such as "step" for "steps" must not be silently ignored.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=100_000)


class OutputSpec(_Strict):
    """Where results go. Without a URI: the worker's OUTPUT_URI, else inline base64."""

    uri: Uri | None = Field(
        None,
        description="Directory for the results: 's3://bucket/prefix/' or a local directory "
        "inside the worker's LOCAL_STORAGE_ROOTS. Files land under <uri>/<job id>/.",
        examples=["s3://my-bucket/audio/"],
    )
    format: Literal["wav", "flac"] = Field("wav", description="Audio container (16-bit PCM).")
    url_expiry_s: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="Lifetime of presigned download URLs (s3 only)."
    )


class GenerateJob(_Strict):
    """Text to audio."""

    task: Literal["generate"] = Field(description="Selects this job type.")
    prompt: str | list[str] = Field(
        description=f"A prompt, or a list of 1-{MAX_PROMPTS} prompts generated as one batch; "
        f"each non-empty, at most {MAX_PROMPT_CHARS} characters.",
        examples=["rain on a tin roof"],
    )
    negative_prompt: Prompt | None = Field(
        None, description="What to steer away from, applied to every prompt.", examples=["low quality"]
    )
    duration_s: float = Field(10.0, ge=MIN_DURATION_S, le=MAX_DURATION_S, description="Seconds of audio.")
    steps: int = Field(200, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(3.5, ge=0.0, le=30.0, description="Classifier-free guidance; <= 1 disables it.")
    candidates: int = Field(
        3,
        ge=1,
        le=MAX_CANDIDATES,
        description="Waveforms generated per prompt; the best by CLAP text-audio score is returned.",
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**63 - 1,
        description="Prompt i uses seed + i, so a prompt gives the same audio alone or in a batch.",
    )
    scheduler: Literal["ddim", "dpmpp"] = Field(
        "ddim", description="'ddim' (the model's own) or 'dpmpp' (DPM-Solver++, good in 20-25 steps)."
    )
    model: ModelRef | None = Field(
        None,
        description="A preset from configs/ (audioldm2, audioldm2-large, audioldm2-music, tiny), a local "
        "model directory, or a fine-tuned checkpoint: its folder "
        "('s3://b/runs/x/checkpoints/step-00000500/') or its run directory (= latest checkpoint). "
        "Default: the worker's warm model (env DEFAULT_MODEL).",
        examples=["audioldm2"],
    )
    output: OutputSpec | None = Field(None, description="Where the audio goes; see `output (generate)`.")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @field_validator("prompt")
    @classmethod
    def _prompts_in_bounds(cls, value: str | list[str]) -> str | list[str]:
        # Checked by hand rather than by a constrained union so that an error names the
        # problem once ("prompt[3]: empty") instead of once per union branch.
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PROMPTS:
            raise ValueError(f"must hold 1-{MAX_PROMPTS} prompts, got {len(value)}")
        items = [value] if isinstance(value, str) else value
        cleaned = [item.strip() for item in items]
        for index, item in enumerate(cleaned):
            where = "" if isinstance(value, str) else f"item {index}: "
            if not item:
                raise ValueError(f"{where}prompt is empty")
            if len(item) > MAX_PROMPT_CHARS:
                raise ValueError(f"{where}prompt is longer than {MAX_PROMPT_CHARS} characters")
        return cleaned[0] if isinstance(value, str) else cleaned

    @field_validator("duration_s", "guidance_scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _bounded_batch(self) -> GenerateJob:
        # Memory scales with prompts x candidates; cap the product, not each alone.
        if len(self.prompts) * self.candidates > MAX_PROMPTS:
            raise ValueError(
                f"prompts x candidates is {len(self.prompts)} x {self.candidates}; "
                f"at most {MAX_PROMPTS} waveforms per job"
            )
        return self


class RunOutputSpec(_Strict):
    """The run directory of a fine-tune. Sending the same job to the same directory resumes it."""

    uri: Uri = Field(
        description="Run directory: 's3://bucket/runs/name/' or a local directory inside LOCAL_STORAGE_ROOTS. "
        "Checkpoints go to <uri>/checkpoints/step-NNNNNNNN/, validation audio to <uri>/validation/.",
        examples=["s3://my-bucket/runs/dogs-v1/"],
    )
    url_expiry_s: int = Field(3600, ge=60, le=7 * 24 * 3600, description="Lifetime of presigned URLs.")


class FinetuneJob(_Strict):
    """A dataset zip (root metadata.csv with columns audio, caption) -> a new checkpoint."""

    task: Literal["finetune"] = Field(description="Selects this job type.")
    dataset: Uri = Field(description="The dataset zip: s3:// URI or a local path inside LOCAL_STORAGE_ROOTS.",
                         examples=["s3://my-bucket/datasets/dogs.zip"])
    base_model: ModelRef | None = Field(
        None, description="Preset or local directory to start from. Default: the worker's DEFAULT_MODEL.")
    method: Literal["lora", "full"] = Field(
        "lora", description="'lora': a small adapter on the UNet's attention; 'full': every UNet weight.")
    output: RunOutputSpec = Field(description="The run directory; see `output (finetune)`.")
    max_steps: int = Field(1000, ge=1, le=1_000_000, description="Optimizer steps for the whole run.")
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0, description="AdamW learning rate after warm-up.")
    warmup_steps: int = Field(100, ge=0, le=100_000, description="Linear learning-rate warm-up.")
    batch_size: int = Field(2, ge=1, le=64, description="Clips per micro-batch (10.24 s crops).")
    gradient_accumulation: int = Field(1, ge=1, le=256, description="Micro-batches per optimizer step.")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank (method 'lora').")
    lora_alpha: float = Field(8.0, gt=0.0, le=1024.0, description="LoRA scale numerator: update x alpha/rank.")
    mixed_precision: Literal["bf16", "fp16", "no"] = Field(
        "bf16", description="Autocast precision on GPU; CPUs always train in fp32.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (recompute activations).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Fixes data order, crops, noise and LoRA init.")
    save_every_steps: int = Field(
        500, ge=1, le=1_000_000, description="Checkpoint interval; also saved at the end and before stopping.")
    validate_every_steps: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Generate validation audio every N steps (and at the end). Default: at the end only.")
    validation_prompts: list[Prompt] = Field(
        [], max_length=8,
        description="Prompts for validation audio. Default: the first two distinct captions of the dataset.")
    validation_steps: int = Field(50, ge=1, le=1000, description="Denoising steps for validation audio.")
    max_runtime_s: float | None = Field(
        None, gt=0, le=7 * 24 * 3600,
        description="Save and return cleanly before this many seconds. Default: the worker's "
        "FINETUNE_MAX_RUNTIME_S (below RunPod's default 600 s execution timeout).")

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneJob:
        if self.method == "full" and self.mixed_precision == "fp16":
            # fp16 autocast of a fully trained UNet without loss scaling diverges easily.
            raise ValueError("method 'full' trains with mixed_precision 'bf16' or 'no', not 'fp16'")
        return self


TASKS = ("generate", "finetune")
Job = Annotated[Union[GenerateJob, FinetuneJob], Field(discriminator="task")]
_JOB_ADAPTER: TypeAdapter[GenerateJob | FinetuneJob] = TypeAdapter(Job)


def parse_job(raw: Any) -> GenerateJob | FinetuneJob:
    """Validate a job's ``input``; raises pydantic.ValidationError listing every problem."""
    return _JOB_ADAPTER.validate_python(raw)


def describe_validation_error(error: ValidationError) -> str:
    """One line per bad field, 'input.<path>: <message>', without echoing the bad values.

    Values are left out on purpose: a caller's mistake may put a secret in the wrong field.
    Union branches ('str', 'list[str]', ...) are folded into their field so that one bad
    field gives one line.
    """
    by_location: dict[str, list[str]] = {}
    for problem in error.errors(include_url=False, include_input=False):
        # Field names come from the caller too: shorten them so an error stays small.
        parts = [_shorten(str(part)) for part in problem["loc"] if not _is_union_tag(part)]
        location = ".".join(["input", *parts])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "union_tag_invalid":
            message = f"unknown task; expected one of: {', '.join(TASKS)}"
        elif problem["type"] == "union_tag_not_found":
            message = f"missing 'task' (one of: {', '.join(TASKS)})"
        messages = by_location.setdefault(location, [])
        if message not in messages:
            messages.append(message)
    lines = [f"{location}: {' / '.join(messages)}" for location, messages in by_location.items()]
    return f"invalid job ({len(lines)} problem{'s' if len(lines) != 1 else ''}):\n" + "\n".join(lines)


def _shorten(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_union_tag(part: str | int) -> bool:
    if isinstance(part, int):
        return False
    return part in TASKS or part in ("str", "int", "float", "list") or "[" in part or "-" in part


def json_schema() -> dict[str, Any]:
    schema = _JOB_ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "AudioLDM2 worker job input"
    return schema


def render_schema() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


README_PATH = SCHEMA_PATH.parent.parent / "README.md"
REFERENCE_START, REFERENCE_END = "<!-- job-reference:start -->", "<!-- job-reference:end -->"


def render_reference() -> str:
    """Markdown tables of every job field, made from the models (README's reference section)."""
    definitions = json_schema()["$defs"]
    sections = []
    for title, name in (("generate", "GenerateJob"), ("finetune", "FinetuneJob"),
                        ("output (generate)", "OutputSpec"), ("output (finetune)", "RunOutputSpec")):
        model = definitions[name]
        rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
        for field_name, field in model["properties"].items():
            default = "required" if field_name in model.get("required", []) else json.dumps(field.get("default"))
            rows.append(f"| `{field_name}` | {_type_of(field)} | {default} | {field.get('description', '')} |")
        sections.append(f"#### `{title}`\n\n{model.get('description', '')}\n\n" + "\n".join(rows))
    return "\n\n".join(sections) + "\n"


def _type_of(field: dict[str, Any]) -> str:
    if "const" in field:
        return f"`{json.dumps(field['const'])}`"
    if "enum" in field:
        return " \\| ".join(f"`{json.dumps(value)}`" for value in field["enum"])
    if "anyOf" in field:
        return " or ".join(_type_of(option) for option in field["anyOf"])
    if "$ref" in field:
        return field["$ref"].rsplit("/", 1)[-1]
    kind = field.get("type", "any")
    if kind == "array":
        return f"list of {_type_of(field.get('items', {}))}"
    bounds = [f"{symbol} {field[key]}" for key, symbol in
              (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
              if key in field]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def readme_with_reference(readme: str) -> str:
    head, _, rest = readme.partition(REFERENCE_START)
    _, _, tail = rest.partition(REFERENCE_END)
    return f"{head}{REFERENCE_START}\n{render_reference()}{REFERENCE_END}{tail}"


if __name__ == "__main__":
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(render_schema())
    print(f"wrote {SCHEMA_PATH}")
    README_PATH.write_text(readme_with_reference(README_PATH.read_text()))
    print(f"updated the job reference in {README_PATH}")
