"""Generate jobs through the worker on the tiny model, with results in a real S3 server."""

from __future__ import annotations

import base64
import logging

import numpy as np
import pytest

from audioldm.redact import RedactingFilter
from helpers import decode_audio, fetch_url, list_keys, read_object, s3_config

FAST = {"duration_s": 1.0, "steps": 4, "candidates": 1}


def generate(worker, s3=None, bucket=None, job_id="job", s3_secret=None, **fields) -> dict:
    job = {"id": job_id, "input": {"task": "generate", "prompt": "rain on a tin roof", **FAST, **fields}}
    if s3 is not None:
        job["s3Config"] = s3_config(s3, bucket, secret=s3_secret)
    return worker.run(job)


def test_generate_writes_playable_audio_to_the_bucket(worker, s3):
    bucket = s3.make_bucket()
    result = generate(worker, s3, bucket, job_id="j-wav", duration_s=1.5,
                      output={"uri": f"s3://{bucket}/renders/"})

    assert "error" not in result, result
    [entry] = result["outputs"]
    assert entry["uri"] == f"s3://{bucket}/renders/j-wav/000-rain-on-a-tin-roof.wav"
    audio, rate = decode_audio(read_object(s3, entry["uri"]))
    assert rate == entry["sample_rate"] == 16000
    assert len(audio) == 24000 and entry["duration_s"] == 1.5
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert fetch_url(entry["url"]) == read_object(s3, entry["uri"])
    assert result["model"]["name"] == "tiny"
    assert set(result["timings"]) == {"load_s", "generate_s", "upload_s", "total_s"}


def test_flac_and_default_prefix_in_the_requests_bucket(worker, s3):
    bucket = s3.make_bucket()
    result = generate(worker, s3, bucket, job_id="j-flac", output={"format": "flac"})

    [entry] = result["outputs"]
    assert entry["uri"].startswith(f"s3://{bucket}/audioldm2-outputs/j-flac/")
    assert entry["uri"].endswith(".flac")
    data = read_object(s3, entry["uri"])
    assert data[:4] == b"fLaC"
    assert decode_audio(data)[1] == 16000


def test_wrong_secret_is_a_clear_error_and_writes_nothing(worker, s3, caplog):
    bucket = s3.make_bucket()
    wrong = "wrong-secret-" + "x" * 24
    # The worker's log filter, as handler.py installs it; DEBUG makes botocore log its headers.
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.DEBUG):
        result = generate(worker, s3, bucket, s3_secret=wrong, output={"uri": f"s3://{bucket}/out/"})

    assert "credentials" in result["error"]
    assert wrong not in result["error"] and s3.access_key not in result["error"]
    assert wrong not in caplog.text and s3.access_key not in caplog.text
    assert list_keys(s3, bucket) == []


def test_missing_bucket_is_a_clear_error(worker, s3):
    result = generate(worker, s3, "no-such-bucket-here", output={"uri": "s3://no-such-bucket-here/out/"})
    assert "no-such-bucket-here" in result["error"] and "does not exist" in result["error"]


def test_inline_base64_when_no_destination_is_configured(worker):
    result = generate(worker, prompt=["a dog barks", "wind"])

    assert [entry["prompt"] for entry in result["outputs"]] == ["a dog barks", "wind"]
    for entry in result["outputs"]:
        assert "uri" not in entry
        audio, rate = decode_audio(base64.b64decode(entry["audio_base64"]))
        assert rate == 16000 and len(audio) == 16000


def test_too_large_for_inline_fails_before_generating(worker):
    result = generate(worker, prompt=["a"] * 64, duration_s=30.0, steps=1000)
    assert "response limit" in result["error"] and "output.uri" in result["error"]


def test_local_output_directory(worker, outputs_root):
    result = generate(worker, job_id="j-local", output={"uri": str(outputs_root / "local")})
    [entry] = result["outputs"]
    assert entry["uri"] == str(outputs_root / "local" / "j-local" / "000-rain-on-a-tin-roof.wav")
    assert entry["url"] is None
    assert decode_audio(open(entry["uri"], "rb").read())[1] == 16000


def test_local_output_outside_the_allowed_roots_is_refused(worker, tmp_path):
    result = generate(worker, output={"uri": str(tmp_path / "elsewhere")})
    assert "outside the allowed local roots" in result["error"]
    assert not (tmp_path / "elsewhere").exists()


def _audio(result: dict, index: int = 0) -> np.ndarray:
    return decode_audio(base64.b64decode(result["outputs"][index]["audio_base64"]))[0]


def test_same_seed_same_audio_different_seed_different_audio(worker):
    first = generate(worker, seed=7, candidates=2)
    again = generate(worker, seed=7, candidates=2)
    other = generate(worker, seed=8, candidates=2)

    assert first["outputs"][0]["audio_base64"] == again["outputs"][0]["audio_base64"]
    assert first["outputs"][0]["clap_score"] == again["outputs"][0]["clap_score"]
    assert not np.array_equal(_audio(first), _audio(other))


def test_a_prompt_sounds_the_same_alone_or_in_a_batch(worker):
    batch = generate(worker, prompt=["wind", "a dog barks"], seed=3)
    alone = generate(worker, prompt="a dog barks", seed=4)

    assert batch["outputs"][1]["seed"] == 4
    # Batched matmuls may round differently from single ones; the noise itself is identical.
    np.testing.assert_allclose(_audio(batch, 1), _audio(alone), atol=2e-4)


def test_more_candidates_never_pick_a_worse_clip(worker):
    # Candidate 0 of a 3-candidate job uses the same noise as a 1-candidate job with that seed,
    # so re-ranking by CLAP can only match or beat the single clip's score.
    for seed in range(3):
        single = generate(worker, seed=seed, candidates=1)["outputs"][0]["clap_score"]
        best = generate(worker, seed=seed, candidates=3)["outputs"][0]["clap_score"]
        assert best >= single


def test_negative_prompt_and_dpmpp_scheduler_change_the_audio(worker):
    plain = _audio(generate(worker))
    assert not np.array_equal(plain, _audio(generate(worker, negative_prompt="low quality")))
    assert not np.array_equal(plain, _audio(generate(worker, scheduler="dpmpp")))


def test_warm_model_is_not_reloaded(worker):
    loads_before = worker.models.loads
    results = [generate(worker), generate(worker)]

    assert worker.models.loads == loads_before
    assert all(not r["model"]["loaded_this_job"] and r["timings"]["load_s"] == 0 for r in results)


def test_invalid_job_lists_every_problem_and_writes_nothing(worker, outputs_root):
    before = sorted(outputs_root.rglob("*"))
    result = worker.run({"id": "bad", "input": {"task": "generate", "prompt": [], "steps": 0,
                                                 "guidance_scale": "loud", "colour": "red",
                                                 "output": {"uri": str(outputs_root / "bad")}}})

    lines = result["error"].splitlines()
    assert lines[0] == "invalid job (4 problems):"
    assert {line.split(":")[0] for line in lines[1:]} == {
        "input.prompt", "input.steps", "input.guidance_scale", "input.colour"}
    assert sorted(outputs_root.rglob("*")) == before


@pytest.mark.parametrize("job", [None, "generate", {"input": "text"}, {"input": {"task": "train"}}])
def test_malformed_requests_get_a_clear_error(worker, job):
    request = job if isinstance(job, dict) and "input" in job else {"id": "x", "input": job}
    result = worker.run(request)
    assert result["error"].startswith("invalid job")


def test_unknown_model_is_a_clear_error(worker):
    result = generate(worker, model="audioldm3")
    assert "audioldm3" in result["error"] and "preset" in result["error"]
