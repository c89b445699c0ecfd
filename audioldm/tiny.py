"""A tiny random-weight AudioLDM2 pipeline, built fully offline.

No model weights can be downloaded where this worker is developed, tested or benchmarked, so tests and
demos use this model instead. It is saved in the same on-disk layout as the hub checkpoint
`cvssp/audioldm2` (model_index.json plus one folder per component) and keeps the real model's shape
conventions, so code written against it runs unchanged on the real checkpoints:

- mel spectrogram: 64 bins, hop 160 at 16 kHz (vocoder upsampling product 160);
- VAE: 1 input/output channel, 8 latent channels, scale factor 4 (three blocks);
- UNet: 8 in/out channels, cross-attention on GPT-2 states and T5 states;
- language_model declared as `GPT2Model` in model_index.json, exactly like the hub checkpoints, so the
  loader's GPT-2 fix (see `audioldm.loading`) is exercised;
- CLAP (text_encoder) with an audio branch that can re-rank generated candidates.

Its weights are random: it makes noise, not sound.

Usage: `python -m audioldm.tiny DIR` builds it into DIR.
"""

from __future__ import annotations

from collections.abc import Callable

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AudioLDM2Pipeline,
    AudioLDM2ProjectionModel,
    AudioLDM2UNet2DConditionModel,
    AutoencoderKL,
    DDIMScheduler,
)
from transformers import (
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapTextConfig,
    GPT2Config,
    GPT2Model,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from audioldm.errors import ModelError

# Bump when the built model changes, so caches built by an older version are not reused.
TINY_VERSION = "tiny-v1"

SEED = 0

# Hidden sizes shared between components; the UNet cross-attends to both text streams.
GPT2_DIM = 16
T5_DIM = 32
CLAP_PROJECTION_DIM = 16

# The real model's mel and audio conventions.
MEL_BINS = 64
SAMPLING_RATE = 16_000
VOCODER_UPSAMPLE_RATES = [5, 4, 2, 2, 2]  # product 160 = hop length at 16 kHz, as in cvssp/audioldm2

CLAP_VOCAB_SIZE = 512  # >= the Roberta tokenizer's length
T5_VOCAB_SIZE = 256  # >= the T5 tokenizer's length (pieces + 100 <extra_id_*> tokens)

NOTE = """\
Tiny AudioLDM2 pipeline with RANDOM weights, built offline by audioldm/tiny.py ({version}).
It makes noise, not sound. It exists so the worker's code paths (loading, generation, CLAP
re-ranking, fine-tuning) can be tested without downloading the real checkpoints.
Layout and shape conventions follow cvssp/audioldm2: 64 mel bins, hop 160 at 16 kHz,
8 latent channels, VAE scale factor 4, language_model declared as GPT2Model.
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character table: byte-level BPE sees every byte as one character.

    Having all 256 characters in the vocabulary means any UTF-8 prompt tokenizes without unknowns.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _roberta_tokenizer() -> RobertaTokenizer:
    """A byte-level BPE tokenizer with Roberta's special tokens (ids 0-3 as in roberta-base)."""
    vocab: dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in _bytes_to_unicode().values():
        vocab[char] = len(vocab)
    # A few merges so the tokenizer really is BPE: "Ġ" is the byte-level space, so "Ġa" is " a".
    merges = [("Ġ", letter) for letter in "abcdefghijklmnopqrstuvwxyz"]
    merges += [("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("r", "e"), ("o", "n"), ("e", "n")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<mask>"] = len(vocab)
    # 77 like the real CLAP tokenizer; without it, padding="max_length" has no length to pad to.
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    """A unigram tokenizer with T5's special-token layout (<pad>=0, </s>=1, <unk>=2)."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{letter}", -3.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [(chr(code), -4.0) for code in range(ord("!"), ord("~") + 1)]
    # Characters outside the table become <unk>; that is enough for a random-weight model.
    return T5Tokenizer(vocab=pieces, model_max_length=128)


def _clap() -> tuple[ClapModel, ClapFeatureExtractor]:
    """CLAP text + audio model small enough to be instant, yet able to score audio against text."""
    text_config = ClapTextConfig(
        vocab_size=CLAP_VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=2,
        projection_dim=CLAP_PROJECTION_DIM,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    # The diffusers test-suite's tiny audio branch cannot re-rank; this one can. Its Swin input is
    # spec_size x spec_size, fed with (time <= spec_size * spec_size / num_mel_bins) x num_mel_bins features.
    audio_config = ClapAudioConfig(
        spec_size=16,
        window_size=2,
        num_mel_bins=8,
        hidden_size=32,
        patch_embeds_hidden_size=16,
        patch_size=2,
        patch_stride=2,
        patch_embed_input_channels=1,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        num_hidden_layers=2,
        intermediate_size=37,
        projection_dim=CLAP_PROJECTION_DIM,
    )
    config = ClapConfig(
        text_config=text_config.to_dict(),
        audio_config=audio_config.to_dict(),
        projection_dim=CLAP_PROJECTION_DIM,
    )
    torch.manual_seed(SEED)
    model = ClapModel(config)
    # 48 kHz and 10 s windows like laion/clap-htsat-unfused; the large hop gives 1 + 480000 / 16000 = 31
    # frames, within the 32 the spec_size above accepts. "rand_trunc" yields one channel, matching
    # patch_embed_input_channels=1 ("fusion" would yield four).
    feature_extractor = ClapFeatureExtractor(
        feature_size=audio_config.num_mel_bins,
        sampling_rate=48_000,
        hop_length=16_000,
        max_length_s=10,
        fft_window_size=1024,
        frequency_min=50,
        frequency_max=14_000,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    return model, feature_extractor


def _t5_encoder() -> T5EncoderModel:
    config = T5Config(vocab_size=T5_VOCAB_SIZE, d_model=T5_DIM, d_ff=37, d_kv=8, num_heads=4, num_layers=2)
    torch.manual_seed(SEED)
    return T5EncoderModel(config)


def _language_model() -> GPT2Model:
    """GPT-2 saved as a bare GPT2Model, as on the hub, so loading needs the GPT2LMHeadModel fix."""
    # n_positions must hold the projected prompt (CLAP embedding + up to 128 T5 states, each between
    # start/end markers: 133) plus the 8 generated states.
    # Like GPT-2's <|endoftext|>, bos/eos are the last id (the pipeline feeds embeddings, never ids).
    config = GPT2Config(
        n_embd=GPT2_DIM, n_layer=2, n_head=2, vocab_size=256, n_positions=256, bos_token_id=255, eos_token_id=255
    )
    config.max_new_tokens = 8  # the hub config carries this; the pipeline reads it as its default
    torch.manual_seed(SEED)
    return GPT2Model(config)


def _projection_model() -> AudioLDM2ProjectionModel:
    torch.manual_seed(SEED)
    # "langauge_model_dim" is diffusers' own spelling.
    return AudioLDM2ProjectionModel(
        text_encoder_dim=CLAP_PROJECTION_DIM, text_encoder_1_dim=T5_DIM, langauge_model_dim=GPT2_DIM
    )


def _unet() -> AudioLDM2UNet2DConditionModel:
    torch.manual_seed(SEED)
    return AudioLDM2UNet2DConditionModel(
        # 256 latent frames x 4 (VAE) x 160 (hop) / 16 kHz = 10.24 s, the real default length.
        sample_size=256,
        in_channels=8,
        out_channels=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # Per block: self-attention, then cross-attention on GPT-2 states, then on T5 states.
        cross_attention_dim=([None, GPT2_DIM, T5_DIM], [None, GPT2_DIM, T5_DIM]),
    )


def _vae() -> AutoencoderKL:
    torch.manual_seed(SEED)
    # Three blocks give the real model's scale factor 4: 64 mel bins -> 16 latent columns.
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=8,
        block_out_channels=[8, 16, 16],
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
    )


def _vocoder() -> SpeechT5HifiGan:
    # Rates and kernels of the real HiFi-GAN; only the channel count is tiny. Channels halve per stage,
    # so 32 leaves 1 channel after the fifth.
    config = SpeechT5HifiGanConfig(
        model_in_dim=MEL_BINS,
        sampling_rate=SAMPLING_RATE,
        upsample_initial_channel=32,
        upsample_rates=VOCODER_UPSAMPLE_RATES,
        upsample_kernel_sizes=[16, 16, 8, 4, 4],
        resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        normalize_before=False,
    )
    torch.manual_seed(SEED)
    return SpeechT5HifiGan(config)


def _scheduler() -> DDIMScheduler:
    # The schedule of cvssp/audioldm2's scheduler_config.json.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_pipeline() -> AudioLDM2Pipeline:
    """All components, each from a fixed seed, so every build has identical weights."""
    text_encoder, feature_extractor = _clap()
    return AudioLDM2Pipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=_t5_encoder(),
        projection_model=_projection_model(),
        language_model=_language_model(),
        tokenizer=_roberta_tokenizer(),
        tokenizer_2=_t5_tokenizer(),
        feature_extractor=feature_extractor,
        unet=_unet(),
        scheduler=_scheduler(),
        vocoder=_vocoder(),
    )


def _declare_gpt2_model(path: Path) -> None:
    """Make model_index.json declare language_model as GPT2Model, as the hub checkpoints do."""
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    index["language_model"] = ["transformers", "GPT2Model"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_tiny(path: Path) -> Path:
    """Build the tiny pipeline and save it into `path` (created if missing). Returns `path`."""
    path = Path(path)
    pipe = build_pipeline()
    pipe.save_pretrained(path, safe_serialization=True)
    # GPT2Model is saved as GPT2Model already; rewrite anyway so the file never drifts from the hub's.
    _declare_gpt2_model(path)
    (path / "TINY_MODEL.txt").write_text(NOTE.format(version=TINY_VERSION))
    return path


def default_cache_dir() -> Path:
    env = os.environ.get("AUDIOLDM_TINY_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "audioldm2-worker" / TINY_VERSION


def ensure_tiny(cache_dir: Path | None = None) -> Path:
    """The tiny model's directory, built on first use (see ``build_once``)."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(target, build_tiny, "tiny model")


def build_once(target: Path, build: Callable[[Path], object], what: str) -> Path:
    """``target`` holding a pipeline, built by ``build`` if it is not there yet.

    The build goes into a temporary directory beside the target and is renamed into place, so a crash
    or a concurrent build never leaves a half-written model where loaders look for it.
    """
    if (target / "model_index.json").is_file():
        return target
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        # Not ours to delete: it may be something else the user pointed us at.
        raise ModelError(f"{target} exists but holds no {what} (no model_index.json); remove it to rebuild")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is identical, keep it.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m audioldm.tiny DIR", file=sys.stderr)
        return 2
    print(build_tiny(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
