# AudioLDM2 RunPod serverless worker.
#
#   docker build --platform linux/amd64 -t you/audioldm2-worker:1.0 .
#   docker build --build-arg MODEL_PRESETS="audioldm2 audioldm2-music" ...   # bake several
#
# The default model's weights are baked into the image's Hugging Face cache at build time, so a
# cold worker loads from local disk and never needs the network.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ARG MODEL_PRESETS="audioldm2"
# PyPI's torch 2.11 wheels target CUDA 13 (host driver >= 580); the cu128 build runs on the
# drivers most RunPod hosts have. Override to use another build.
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cu128"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/hf \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libsndfile1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt .
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.11.0 torchaudio==2.11.0 \
    && pip install -r requirements.txt

COPY audioldm/ audioldm/
COPY configs/ configs/
COPY schemas/ schemas/
COPY handler.py test_input.json ./
RUN python -m audioldm.fetch_weights $MODEL_PRESETS

# Weights are in the image from here on: never reach for the hub at run time.
ENV HF_HUB_OFFLINE=1 \
    DEFAULT_MODEL=audioldm2

CMD ["python", "-u", "handler.py"]
