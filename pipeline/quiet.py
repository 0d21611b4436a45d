"""Import-time noise, kept off the console. A light module (no Beam import): a spawned chunk
worker runs `chunk_worker_init` before anything imports Beam, so Beam's import-time warning
is filtered there as in the launcher (cli.py)."""

from __future__ import annotations

import logging


class DropImportNoise(logging.Filter):
    """Beam warns at import that optional GCP client libraries are absent; that is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def drop_import_noise() -> None:
    """The filter on the root logger's handlers (made here with Python's default format when
    there are none yet, as Beam's own first warning would)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        if not any(isinstance(f, DropImportNoise) for f in handler.filters):
            handler.addFilter(DropImportNoise())


class DropModelLoadFailure(logging.Filter):
    """Beam logs a DoFn's failed setup at ERROR, with its traceback, before it raises the error;
    a model that could not be loaded (ModelUnavailable) ends the run in one `error:` line
    (cli.py), so that log says it a second time, in 100 lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prep.transforms.inference import ModelUnavailable

        if record.exc_info and isinstance(record.exc_info[1], ModelUnavailable):
            return False
        return ModelUnavailable.MARK not in record.getMessage()  # a worker process's log, relayed


# The loggers that report it: the DoFn runner, and the local job service relaying the log of a
# worker process (--workers N on one job).
MODEL_LOAD_FAILURE_LOGGERS = ("apache_beam.runners.common", "apache_beam.runners.portability.local_job_service")


def drop_model_load_failure_log() -> None:
    """The filter on the Beam loggers that log it (a logger's filters see its own records)."""
    for name in MODEL_LOAD_FAILURE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropModelLoadFailure) for f in logger.filters):
            logger.addFilter(DropModelLoadFailure())


def chunk_worker_init() -> None:
    """A chunk worker's initializer (pipeline/chunks.py): no import noise, no second report of a
    model that could not be loaded (the launcher says it), and its models stay loaded from one
    chunk to the next."""
    drop_import_noise()
    drop_model_load_failure_log()
    from prep.transforms.inference import keep_models_in_this_process

    keep_models_in_this_process()
