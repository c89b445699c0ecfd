"""RunPod serverless entry point: validate, dispatch, return. The work lives in audioldm/."""

import asyncio
import os

# The SDK logs every job's full result at its default DEBUG level: inline audio, presigned
# URLs. Read once at import, so it is set before runpod is imported.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

import runpod  # noqa: E402

from audioldm import redact  # noqa: E402
from audioldm.worker import Worker  # noqa: E402

redact.install()
worker = Worker.from_env()


async def handler(job: dict) -> dict:
    # Async so the SDK's event loop stays free (status, cancel) while the GPU works in a thread.
    return await asyncio.to_thread(worker.run, job)


if __name__ == "__main__":
    worker.warm_up()
    runpod.serverless.start({"handler": handler})
