"""The model names the router serves, and the check a request's `model` passes.

The names are what the workers report (WorkerInfo.model); one router serves
one model, so a request may name it or leave `model` empty. Both front ends
(gRPC Generate, OpenAI HTTP) check here, before any work is queued.
"""

from __future__ import annotations

from pdserve.common import genai
from pdserve.common.errors import InvalidRequestError
from pdserve.router.worker_pool import WorkerPool


class ModelNotFoundError(InvalidRequestError):
    """The request names a model no worker serves: INVALID_ARGUMENT (field
    `model`) over gRPC; over HTTP OpenAI's own 404 `model_not_found`."""

    def __init__(self, message: str):
        super().__init__("model", message)


def served_models(pool: WorkerPool) -> list[str]:
    """The model names the workers report (empty until a worker answered)."""
    return sorted({w.info.model for w in pool.all if w.info is not None and w.info.model})


def genai_attributes(pool: WorkerPool, model: str, chat: bool) -> dict[str, str]:
    """A request's OpenTelemetry GenAI attributes: the operation, and the model it names
    (or, when it names none, the one served)."""
    served = served_models(pool)
    # Only a served name: before any worker answers every name passes check_model, and a metric
    # label fed from a client's string would grow a series per string.
    named = model if model in served else ""
    return {genai.OPERATION: genai.operation_name(chat), genai.REQUEST_MODEL: named or (served[0] if served else "")}


def check_model(pool: WorkerPool, model: str | None) -> None:
    """Raise ModelNotFoundError unless `model` is empty or served. Before any
    worker has answered nothing is known to refuse; routing then fails on its own."""
    served = served_models(pool)
    if model and served and model not in served:
        raise ModelNotFoundError(f"the model `{model}` does not exist (served: {', '.join(served)})")
