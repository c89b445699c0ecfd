"""The job contract: defaults, bounds and error messages callers rely on."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from audioldm.contract import (
    README_PATH,
    SCHEMA_PATH,
    describe_validation_error,
    parse_job,
    readme_with_reference,
    render_schema,
)


def errors_for(raw) -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_job(raw)
    return describe_validation_error(info.value).splitlines()[1:]


def test_defaults_follow_the_audioldm_recipe():
    job = parse_job({"task": "generate", "prompt": "  rain on a tin roof "})
    assert job.prompts == ["rain on a tin roof"]
    assert (job.duration_s, job.steps, job.guidance_scale, job.candidates, job.seed, job.scheduler) == (
        10.0, 200, 3.5, 3, 0, "ddim")
    assert job.model is None and job.output is None and job.negative_prompt is None


def test_a_list_of_prompts_is_a_batch():
    assert parse_job({"task": "generate", "prompt": ["a", "b"]}).prompts == ["a", "b"]


@pytest.mark.parametrize(("field", "value"), [
    ("duration_s", 0.1), ("duration_s", 31), ("steps", 0), ("steps", 1001), ("guidance_scale", -1),
    ("candidates", 0), ("candidates", 9), ("seed", -1), ("seed", 2**64), ("scheduler", "euler"),
    ("duration_s", float("nan")), ("guidance_scale", float("inf")), ("steps", 2.5), ("steps", "many"),
    ("prompt", ""), ("prompt", []), ("prompt", ["ok", " "]), ("prompt", ["x"] * 65), ("prompt", "x" * 1001),
    ("prompt", 42), ("output", {"format": "mp3"}), ("output", {"uri": ""}), ("output", {"url_expiry_s": 10}),
])
def test_out_of_bounds_values_name_their_field(field, value):
    [line] = errors_for({"task": "generate", "prompt": "ok", field: value})
    assert line.startswith(f"input.{field}")


def test_every_problem_is_reported_at_once_without_echoing_values():
    lines = errors_for({"task": "generate", "prompt": "ok", "steps": -5, "sead": 1,
                        "output": {"uri": "s3://b/", "secret": "hunter2hunter2"}})
    assert len(lines) == 3
    assert any(line.startswith("input.sead: Extra inputs are not permitted") for line in lines)
    assert any(line.startswith("input.output.secret:") for line in lines)
    assert not any("hunter2" in line or "-5" in line for line in lines)


def test_prompt_times_candidates_is_capped():
    [line] = errors_for({"task": "generate", "prompt": ["a"] * 30, "candidates": 3})
    assert "at most 64 waveforms" in line


@pytest.mark.parametrize(("raw", "expected"), [
    ({}, "input: missing 'task'"), ({"task": "train"}, "input: unknown task"),
    ("just a prompt", "input: Input should be a valid dictionary"),
])
def test_missing_or_unknown_task(raw, expected):
    [line] = errors_for(raw)
    assert line.startswith(expected)


def test_exported_json_schema_is_up_to_date():
    assert SCHEMA_PATH.read_text() == render_schema(), "run: python -m audioldm.contract"
    schema = json.loads(SCHEMA_PATH.read_text())
    generate = schema["$defs"]["GenerateJob"]
    assert generate["additionalProperties"] is False
    assert generate["properties"]["steps"]["default"] == 200


def test_readme_job_reference_is_up_to_date():
    readme = README_PATH.read_text()
    assert readme == readme_with_reference(readme), "run: python -m audioldm.contract"
    for field in ("duration_s", "candidates", "save_every_steps", "max_runtime_s", "url_expiry_s"):
        assert f"| `{field}` |" in readme


def test_finetune_defaults_and_rules():
    job = parse_job({"task": "finetune", "dataset": "s3://b/d.zip", "output": {"uri": "s3://b/runs/x/"}})
    assert (job.method, job.max_steps, job.batch_size, job.learning_rate, job.save_every_steps) == (
        "lora", 1000, 2, 1e-4, 500)
    assert job.validation_prompts == [] and job.max_runtime_s is None
    [line] = errors_for({"task": "finetune", "dataset": "d.zip", "output": {"uri": "r/"}, "method": "full",
                         "mixed_precision": "fp16"})
    assert "bf16" in line
    [line] = errors_for({"task": "finetune", "dataset": "d.zip"})
    assert line.startswith("input.output: Field required")
