"""The Celery application both roles share: broker settings, the guarantees, the queue per model.

Guarantees, and the setting that gives each:
- a job survives a worker dying mid-job: ``task_acks_late`` (acknowledged only after it ran) and
  ``task_reject_on_worker_lost``; RabbitMQ requeues an unacknowledged message the moment its
  consumer's connection closes, so another worker gets it at once;
- one job per worker at a time, none hoarded: ``worker_prefetch_multiplier = 1`` with one
  execution slot (RabbitMQ applies the prefetch to the whole channel, across all its queues);
- queued jobs survive a broker restart: durable queues and persistent messages;
- a hung worker is noticed: AMQP heartbeats (``broker_heartbeat``) close its connection.

Routing with affinity: one queue per model (``dapi.model.<name>``, plus ``dapi.any`` for jobs that
need no model). A worker consumes the queues of the models it serves; on the queue of the model
it loads at start it consumes with a higher RabbitMQ consumer priority (``x-priority``), so a job
goes to a free worker that already holds its model, and to another free worker only when none
does — a model switch happens only when needed.
"""
from __future__ import annotations

import re

from celery import Celery
from kombu import Exchange, Queue

TASK_NAME = "diffusionapi.run_job"
ANY_QUEUE = "dapi.any"
AFFINITY_PRIORITY = 10


def queue_name(model: str | None) -> str:
    if not model:
        return ANY_QUEUE
    # AMQP queue names allow most characters, but keep them readable and safe for routing keys.
    return "dapi.model." + re.sub(r"[^A-Za-z0-9._-]", "_", model)


def make_queue(name: str, priority: int = 0) -> Queue:
    """The same declaration on both sides (API publishes, worker consumes): durable, direct exchange."""
    args = {"x-priority": priority} if priority else None
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name, durable=True,
                 consumer_arguments=args)


def make_celery(settings) -> Celery:
    app = Celery("diffusionapi", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # state and results live in Redis, written by our own code
        task_serializer="json",
        accept_content=["json"],
        task_default_delivery_mode="persistent",
        task_create_missing_queues=True,
        task_default_queue=ANY_QUEUE,
        broker_heartbeat=max(2, int(settings.worker_heartbeat_sec * 5)),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits out a broker restart
        broker_pool_limit=10,
        # An API node answers 503 instead of hanging when the broker is down.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 1.0},
        # confirm_publish: submit answers only after RabbitMQ has the message. Redis as broker: an
        # unacknowledged message comes back after visibility_timeout (see README).
        broker_transport_options={"visibility_timeout": 3600, "confirm_publish": True},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,  # no pidbox queues per worker; /cluster reads Redis
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
