"""RunPod serverless entry point: validate, dispatch, return. The work lives in audioldm/."""

import asyncio

import runpod

from audioldm import redact
from audioldm.worker import Worker

redact.install()
worker = Worker.from_env()


async def handler(job: dict) -> dict:
    # Async so the SDK's event loop stays free (status, cancel) while the GPU works in a thread.
    return await asyncio.to_thread(worker.run, job)


if __name__ == "__main__":
    worker.warm_up()
    runpod.serverless.start({"handler": handler})
