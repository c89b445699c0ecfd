"""audioldm.features against an independent NumPy reference written here from the formulas.

Tolerance: log-mel max |ours - reference| < 5e-4 in the log domain (0.05 % relative in the mel
magnitude; measured 6e-5); ours runs in float32, the reference in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audioldm import features as F

SR = 16_000
N_10S = 163_840  # 10.24 s at 16 kHz


# ---------------------------------------------------------------- NumPy reference (float64)
def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_mel = 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(f >= 1000.0, min_log_mel + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_mel = 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, 1000.0 * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def np_mel_filterbank(sr: int = SR, n_fft: int = 1024, n_mels: int = 64, fmin: float = 0.0, fmax: float = 8000.0) -> np.ndarray:
    """(n_mels, n_fft//2+1) triangles between mel-spaced points, each scaled to unit area (Slaney norm)."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    weights = np.zeros((n_mels, fft_freqs.size))
    for i in range(n_mels):
        lo, mid, hi = hz[i], hz[i + 1], hz[i + 2]
        rising = (fft_freqs - lo) / (mid - lo)
        falling = (hi - fft_freqs) / (hi - mid)
        weights[i] = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (hi - lo))
    return weights


def np_log_mel(x: np.ndarray) -> np.ndarray:
    """(N,) -> (T, 64): reflect pad 432, frames of 1024 every 160, periodic Hann, |rfft|, mel, log."""
    x = np.asarray(x, dtype=np.float64)
    pad = (1024 - 160) // 2
    xp = np.pad(x, pad, mode="reflect")
    n_frames = 1 + (xp.size - 1024) // 160
    idx = np.arange(1024)[None, :] + 160 * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1024) / 1024)  # periodic Hann
    mag = np.abs(np.fft.rfft(xp[idx] * window, axis=1))  # (T, 513), magnitude not power
    return np.log(np.maximum(mag @ np_mel_filterbank().T, 1e-5))


def chirp_plus_noise(n: int = N_10S, seed: int = 0) -> np.ndarray:
    """A 50 Hz -> 7.5 kHz linear chirp plus white noise: energy in every mel band."""
    t = np.arange(n) / SR
    f0, f1, dur = 50.0, 7500.0, n / SR
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * dur))
    rng = np.random.default_rng(seed)
    return (0.4 * np.sin(phase) + 0.02 * rng.standard_normal(n)).astype(np.float32)


# ---------------------------------------------------------------- filterbank
def test_numpy_filterbank_matches_librosa_and_ours():
    librosa = pytest.importorskip("librosa")
    ref = np_mel_filterbank()
    lib = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0, fmax=8000)
    assert ref.shape == lib.shape == (64, 513)
    # Relative to the largest weight: measured 6e-8 (librosa) and 2e-6 (torchaudio builds in float32).
    assert np.abs(ref - lib).max() < 1e-5 * ref.max()
    ours = F._mel_filterbank(torch.device("cpu"), torch.float32).numpy().T
    assert np.abs(ours - ref).max() < 1e-5 * ref.max()


# ---------------------------------------------------------------- log-mel
def test_log_mel_matches_numpy_reference_on_chirp_plus_noise():
    x = chirp_plus_noise()
    ours = F.log_mel(torch.from_numpy(x)).numpy()
    ref = np_log_mel(x)
    assert ours.shape == ref.shape == (1024, 64)
    assert ours.dtype == np.float32
    diff = np.abs(ours.astype(np.float64) - ref)
    assert diff.max() < 5e-4, f"max abs log-mel diff {diff.max():.2e}"  # measured 6e-5
    assert ref.min() > np.log(1e-5)  # the comparison was made on real energy, not the clamp floor


def test_log_mel_clamps_silence_to_log_floor():
    mel = F.log_mel(torch.zeros(N_10S))
    assert mel.shape == (1024, 64)
    assert torch.allclose(mel, torch.full_like(mel, np.log(1e-5)))


def test_log_mel_batched_equals_single():
    xs = torch.stack([torch.from_numpy(chirp_plus_noise(seed=s)) for s in (1, 2)])
    batched = F.log_mel(xs)
    assert batched.shape == (2, 1024, 64)
    for i in range(2):
        assert torch.allclose(batched[i], F.log_mel(xs[i]), atol=1e-5)


@pytest.mark.parametrize("n", [433, 1000, 16_000, 16_159, 16_160, 163_839, N_10S, 170_000])
def test_frame_count_is_n_over_hop(n):
    # (n + 2*432 - 1024) // 160 + 1 == n // 160: reflect padding makes center=False act centred.
    assert F.log_mel(torch.randn(n)).shape == (n // 160, 64)


def test_fit_frames_trims_and_pads_like_audioldm_pad_spec():
    mel = torch.randn(1030, 64)
    assert torch.equal(F.fit_frames(mel), mel[:1024])
    short = torch.randn(1000, 64)
    padded = F.fit_frames(short)
    assert padded.shape == (1024, 64)
    assert torch.equal(padded[:1000], short) and torch.all(padded[1000:] == 0)
    exact = torch.randn(2, 1024, 64)
    assert F.fit_frames(exact) is exact


def test_log_mel_rejects_bad_shapes():
    with pytest.raises(ValueError):
        F.log_mel(torch.zeros(1, 1, 1000))
    with pytest.raises(ValueError):
        F.log_mel(torch.zeros(100))


# ---------------------------------------------------------------- prepare_waveform
def _tone(sr: int, seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return np.sin(2 * np.pi * freq * t)


def test_prepare_waveform_resamples_44k_stereo_and_normalises():
    sr = 44_100
    left = 0.3 * _tone(sr, 3.0, 440.0) + 0.2  # DC offset must go
    right = 0.1 * _tone(sr, 3.0, 440.0) + 0.2
    wav = torch.tensor(np.stack([left, right]), dtype=torch.float32)
    out = F.prepare_waveform(wav, sr)
    assert out.shape == (N_10S,) and out.dtype == torch.float32
    n = 3 * SR
    body, tail = out[:n], out[n:]
    assert torch.all(tail == 0)  # right zero padding
    assert abs(float(body.abs().max()) - 0.5) < 1e-6  # peak 0.5
    assert abs(float(body.mean())) < 1e-6  # zero mean
    spectrum = np.abs(np.fft.rfft(body.numpy()))
    assert abs(np.argmax(spectrum) * SR / n - 440.0) < 1.0  # pitch survives the resampling


def test_prepare_waveform_crop_is_deterministic_with_seeded_generator():
    x = torch.from_numpy(chirp_plus_noise(n=30 * SR, seed=3))
    a = F.prepare_waveform(x, SR, generator=torch.Generator().manual_seed(0))
    b = F.prepare_waveform(x, SR, generator=torch.Generator().manual_seed(0))
    c = F.prepare_waveform(x, SR, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The crop is the segment the generator picks, then normalised (crop first, as AudioLDM).
    start = int(torch.randint(0, x.numel() - N_10S + 1, (1,), generator=torch.Generator().manual_seed(0)))
    seg = x[start : start + N_10S] - x[start : start + N_10S].mean()
    assert torch.allclose(a, seg * (0.5 / seg.abs().max()), atol=1e-6)
    assert abs(float(a.abs().max()) - 0.5) < 1e-6


def test_prepare_waveform_without_random_crop_keeps_the_start():
    x = torch.from_numpy(chirp_plus_noise(n=12 * SR, seed=4))
    out = F.prepare_waveform(x, SR, random_crop=False)
    seg = x[:N_10S] - x[:N_10S].mean()
    assert torch.allclose(out, seg * (0.5 / seg.abs().max()), atol=1e-6)


def test_prepare_waveform_other_lengths_and_silence():
    assert F.prepare_waveform(torch.randn(SR), SR, seconds=2.0).shape == (2 * SR,)
    silent = F.prepare_waveform(torch.zeros(2, 22_050), 22_050)
    assert silent.shape == (N_10S,) and torch.all(silent == 0)  # no NaN from 0/0


def test_prepared_clip_gives_vae_shaped_mel():
    wav = F.prepare_waveform(torch.from_numpy(chirp_plus_noise(n=20 * SR)), SR, generator=torch.Generator().manual_seed(0))
    mel = F.log_mel(wav)
    assert mel.shape == (F.TARGET_FRAMES, F.N_MELS) == (1024, 64)
    assert torch.isfinite(mel).all()


def test_load_audio_downmixes(tmp_path):
    import soundfile as sf

    stereo = np.stack([_tone(8000, 0.5, 300), np.zeros(4000)], axis=1).astype(np.float32) * 0.5
    path = tmp_path / "s.wav"
    sf.write(path, stereo, 8000, subtype="FLOAT")
    mono, sr = F.load_audio(path)
    assert sr == 8000 and mono.dtype == np.float32 and mono.shape == (4000,)
    assert np.allclose(mono, stereo.mean(axis=1))
    with open(path, "rb") as fh:
        mono2, _ = F.load_audio(fh)
    assert np.array_equal(mono, mono2)
