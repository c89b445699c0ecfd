"""Errors whose message is safe to hand back to the caller as the job's error."""


class JobError(Exception):
    """A failure caused by the job or its environment, explained in plain words.

    The message never contains secrets; the handler returns it as ``{"error": message}``.
    """


class StorageError(JobError):
    """Object storage refused, could not be reached, or lacks the object."""


class ModelError(JobError):
    """A model could not be found or loaded."""
