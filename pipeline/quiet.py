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


def chunk_worker_init() -> None:
    """A chunk worker's initializer (pipeline/chunks.py): no import noise, and its models stay
    loaded from one chunk to the next."""
    drop_import_noise()
    from prep.transforms.inference import keep_models_in_this_process

    keep_models_in_this_process()
