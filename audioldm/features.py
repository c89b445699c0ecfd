"""Audio features exactly as AudioLDM / AudioLDM2 training computes them.

Reference: the original training code (``audioldm_train/utilities/data/dataset.py``):
``read_wav_file`` (crop, resample, normalise, pad) and ``mel_spectrogram_train`` + ``pad_spec``.
The VAE was trained on these features, so any drift here silently degrades a fine-tune.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

# --- The one place the feature constants live. -------------------------------------------
SAMPLE_RATE: int = 16_000  # AudioLDM2's VAE and vocoder (SpeechT5HifiGan) work at 16 kHz.
N_FFT: int = 1024
WIN_LENGTH: int = 1024
HOP_LENGTH: int = 160  # 10 ms; also the vocoder's upsampling factor.
N_MELS: int = 64
F_MIN: float = 0.0
F_MAX: float = 8000.0  # Nyquist at 16 kHz.
LOG_FLOOR: float = 1e-5  # log(clamp(x, 1e-5)): AudioLDM's spectral_normalize_torch.
PEAK: float = 0.5  # AudioLDM normalises every clip to a 0.5 peak ("manually limit amplitude").
SECONDS: float = 10.24  # One training clip.
TARGET_FRAMES: int = 1024  # Mel frames of one clip: the VAE input is (B, 1, 1024, 64).
# Reflect padding so that frames are centred like librosa's, but with center=False:
# T = floor((N + 2*PAD - N_FFT) / HOP) + 1 = floor(N / HOP)  ->  163840 samples give 1024 frames.
STFT_PAD: int = (N_FFT - HOP_LENGTH) // 2  # 432
SILENCE_PEAK: float = 1e-8  # Below this a clip is treated as digital silence (no division).


def load_audio(source: str | Path | BinaryIO) -> tuple[np.ndarray, int]:
    """Decode a file (path or binary file object) with soundfile: (mono float32 samples, rate).

    Channels are averaged (AudioLDM kept channel 0 only; the mean keeps both sides of a stereo mix).
    """
    data, sr = sf.read(source, dtype="float32", always_2d=True)  # (frames, channels)
    return data.mean(axis=1, dtype=np.float32), int(sr)


def num_samples(seconds: float = SECONDS) -> int:
    """Samples at 16 kHz for ``seconds`` (rounded: 10.24 * 16000 is not exact in binary)."""
    return int(round(seconds * SAMPLE_RATE))


def prepare_waveform(
    wav: torch.Tensor,
    sr: int,
    seconds: float = SECONDS,
    generator: torch.Generator | None = None,
    random_crop: bool = True,
) -> torch.Tensor:
    """(N,) or (C, N) audio at ``sr`` -> (seconds*16000,) float32 mono at 16 kHz, peak 0.5.

    Order as AudioLDM's ``read_wav_file``: crop first, then normalise the crop, then pad, so the
    segment the model sees always has zero mean and a 0.5 peak (normalising the whole file first
    would leave quiet crops quiet). Crop start is drawn from ``generator`` (deterministic when
    seeded); ``random_crop=False`` keeps the start. Short clips are zero-padded on the right.
    """
    if wav.dim() not in (1, 2):
        raise ValueError(f"expected (N,) or (channels, N) audio, got shape {tuple(wav.shape)}")
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    x = wav.to(torch.float32)
    if x.dim() == 2:
        x = x.mean(dim=0)  # Downmix before resampling: both are linear, this is cheaper.
    if sr != SAMPLE_RATE:
        x = AF.resample(x, orig_freq=sr, new_freq=SAMPLE_RATE)

    target = num_samples(seconds)
    if x.numel() > target:
        start = 0
        if random_crop:
            start = int(torch.randint(0, x.numel() - target + 1, (1,), generator=generator).item())
        x = x[start : start + target]

    x = x - x.mean() if x.numel() else x
    peak = x.abs().max() if x.numel() else torch.tensor(0.0)
    # AudioLDM divides by (peak + 1e-8); we skip the division for silence so it stays all-zero
    # instead of amplifying dither/denormals to full scale.
    x = x * (PEAK / peak) if peak > SILENCE_PEAK else torch.zeros_like(x)

    if x.numel() < target:
        x = torch.nn.functional.pad(x, (0, target - x.numel()))
    return x.contiguous()


@functools.lru_cache(maxsize=8)
def _mel_filterbank(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N_FFT//2+1, N_MELS) Slaney-scale, Slaney-normalised: equal to librosa.filters.mel(...).T."""
    fb = AF.melscale_fbanks(
        n_freqs=N_FFT // 2 + 1,
        f_min=F_MIN,
        f_max=F_MAX,
        n_mels=N_MELS,
        sample_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return fb.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=8)
def _window(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # torch.hann_window is periodic by default, as in AudioLDM (and librosa's fftbins=True).
    return torch.hann_window(WIN_LENGTH, device=device, dtype=dtype)


def log_mel(wav: torch.Tensor) -> torch.Tensor:
    """16 kHz waveform (N,) or (B, N) -> log-mel (T, 64) or (B, T, 64), with T = N // 160.

    Input must already be at 16 kHz and longer than 432 samples (reflect padding needs it).
    For 10.24 s (163840 samples) T is exactly 1024, so AudioLDM's ``pad_spec`` is a no-op;
    use :func:`fit_frames` for other lengths.
    """
    if wav.dim() not in (1, 2):
        raise ValueError(f"expected (N,) or (B, N) waveform, got shape {tuple(wav.shape)}")
    batched = wav.dim() == 2
    x = wav.to(torch.float32) if not wav.is_floating_point() else wav
    x = x if batched else x.unsqueeze(0)
    if x.shape[-1] <= STFT_PAD:
        raise ValueError(f"waveform too short for the STFT: {x.shape[-1]} samples (need > {STFT_PAD})")
    # F.pad's reflect mode wants (B, C, N).
    x = torch.nn.functional.pad(x.unsqueeze(1), (STFT_PAD, STFT_PAD), mode="reflect").squeeze(1)
    spec = torch.stft(
        x,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=_window(x.device, x.dtype),
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    ).abs()  # Magnitude, not power: (B, 513, T).
    mel = spec.transpose(-1, -2) @ _mel_filterbank(x.device, x.dtype)  # (B, T, 64)
    mel = torch.log(torch.clamp(mel, min=LOG_FLOOR))
    return mel if batched else mel.squeeze(0)


def fit_frames(mel: torch.Tensor, frames: int = TARGET_FRAMES) -> torch.Tensor:
    """AudioLDM's ``pad_spec`` on (..., T, 64): trim extra frames, or append frames of zeros.

    Note the zero frames are log-mel 0 (magnitude 1), exactly as AudioLDM pads; it never happens
    for clips from :func:`prepare_waveform`, whose 163840 samples give exactly 1024 frames.
    """
    t = mel.shape[-2]
    if t > frames:
        return mel[..., :frames, :]
    if t < frames:
        return torch.nn.functional.pad(mel, (0, 0, 0, frames - t))
    return mel
