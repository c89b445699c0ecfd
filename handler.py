"""RunPod serverless entry point: validate, dispatch, return. The work lives in audioldm/."""

import logging
import os

# The SDK logs every job's full result at its default DEBUG level: inline audio, presigned
# URLs. Read once at import, so it is set before runpod is imported.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

import runpod  # noqa: E402

from audioldm import redact  # noqa: E402
from audioldm.worker import Worker  # noqa: E402

redact.install()
log = logging.getLogger("handler")
worker = Worker.from_env()


def progress_for(job: dict):
    # Progress goes to RunPod's /status only when there is a RunPod to send it to.
    if os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return lambda update: runpod.serverless.progress_update(job, update)
    return lambda update: log.info("job %s progress: %s", job.get("id"), update)


async def handler(job: dict) -> dict:
    # Async, so RunPod can cancel it; the GPU work runs in a thread that saves before stopping.
    return await worker.run_async(job, progress_for(job))


if __name__ == "__main__":
    worker.warm_up()
    runpod.serverless.start({"handler": handler})
