"""Which Celery queue a task goes to, and which queues a worker consumes (``[executor] kind = "celery"``).

A worker declares what it can run: its **device** (``cuda`` when onnxruntime offers the CUDAExecutionProvider and
``[inference] providers`` allows it, else ``cpu``) and the **models** it holds (installed and usable in its
``models_dir``). From them it derives the queues it consumes (:func:`worker_queues`), all named
``<prefix>.<device>[.<model>+<model>...]``:

* ``<prefix>.any``: every worker (where a task goes when no live worker announced a queue that fits it);
* ``<prefix>.<device>``: tasks that need no model;
* ``<prefix>.<device>.<m1>+<m2>``: one queue per set of models a task of the configured rules can need (a job:
  ``NodeConfig.models_for(rule)``; a follow-up: the model whose sT1 it compares, ``steps.follow_up_models``) that
  the worker holds whole, models sorted.

Workers announce their device, models and queues in Redis (:mod:`dicom_node.celery_app`); the receiver routes
each task with :func:`queue_for` over the live announcements: a task that runs a network (a job with models) goes
to a ``cuda`` queue when a live CUDA worker consumes it, else to the ``cpu`` one; a task without a network (a
follow-up) prefers ``cpu`` and takes ``cuda`` only when no CPU worker can run it; ``any`` when nobody can (no
worker up, or none holding the models): the first worker to take it runs it, or fails it with the model missing.
So GPU workers take the synthesis and segmentation whenever one is up, and CPU workers run everything otherwise.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .config import NodeConfig

Device = Literal["cpu", "cuda"]

#: onnxruntime's name of the provider that makes a worker a CUDA worker
CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Needs:
    """What a task needs of its worker: the models it loads, and whether it runs a network (prefers CUDA)."""

    models: frozenset[str] = frozenset()
    inference: bool = False


@dataclass(frozen=True)
class Capabilities:
    """What one worker announced: its id, device, the models it holds and the queues it consumes."""

    worker: str
    device: Device
    models: frozenset[str] = frozenset()
    queues: frozenset[str] = field(default_factory=frozenset)


def detect_device(providers: Literal["auto", "cpu", "cuda"], available: Collection[str]) -> Device:
    """A worker's device: ``cuda`` when onnxruntime offers CUDA (``available``: its providers) and the
    configuration (``[inference] providers``) does not restrict it to the CPU."""
    return "cuda" if providers != "cpu" and CUDA_PROVIDER in available else "cpu"


def any_queue(prefix: str) -> str:
    """The queue every worker consumes."""
    return f"{prefix}.any"


def queue_name(prefix: str, device: Device, models: Iterable[str]) -> str:
    """``<prefix>.<device>`` for a task without models, ``<prefix>.<device>.<m1>+<m2>`` (sorted) with them."""
    names = sorted(set(models))
    return f"{prefix}.{device}" + (f".{'+'.join(names)}" if names else "")


def model_sets(config: NodeConfig) -> set[frozenset[str]]:
    """Every set of models a task of the configured rules can need: each rule's models (its job) and each rule's
    own model (its job's follow-ups name it); the empty set always."""
    sets: set[frozenset[str]] = {frozenset()}
    for rule in config.rules:
        sets.add(frozenset(config.models_for(rule)))
        if rule.model:
            sets.add(frozenset({rule.model}))
    return sets


def worker_queues(prefix: str, device: Device, held: Collection[str],
                  wanted: Iterable[frozenset[str]]) -> list[str]:
    """The queues a worker on ``device`` holding the models ``held`` consumes: ``any``, its device's queue, and
    one per model set of ``wanted`` (:func:`model_sets`) it holds whole."""
    queues = [any_queue(prefix), queue_name(prefix, device, ())]
    for models in sorted(wanted, key=sorted):
        if models and models <= set(held):
            queues.append(queue_name(prefix, device, models))
    return queues


def queue_for(needs: Needs, workers: Sequence[Capabilities], prefix: str) -> str:
    """The queue for a task: on the preferred device (``cuda`` for a network, ``cpu`` otherwise) when a live
    worker consumes that queue, else on the other device, else ``any``."""
    order: tuple[Device, Device] = ("cuda", "cpu") if needs.inference else ("cpu", "cuda")
    for device in order:
        name = queue_name(prefix, device, needs.models)
        if any(w.device == device and name in w.queues for w in workers):
            return name
    return any_queue(prefix)
