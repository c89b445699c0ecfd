"""RunPod serverless worker for AudioLDM2: generate and fine-tune jobs."""
