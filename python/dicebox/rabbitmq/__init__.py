"""dicebox on RabbitMQ (issue 6): the only package that imports pika.

- :mod:`dicebox.rabbitmq.connection`: connecting (errors become :class:`BrokerUnavailable`)
  and the topology every publisher and consumer declares.
- :mod:`dicebox.rabbitmq.jobs`: job messages: :class:`JobPublisher` (server side, publisher
  confirms) and :class:`JobConsumer` (processors: prefetch per slot, acks from worker threads
  through the connection thread, handoff before the broker's consumer timeout, reconnection).
"""

from dicebox.rabbitmq.connection import (
    DEAD,
    DLX,
    JOBS,
    SENSORY,
    WAIT,
    BrokerError,
    BrokerUnavailable,
    TopologyConflict,
    connect,
    declare_topology,
)
from dicebox.rabbitmq.jobs import (
    JOB_KINDS,
    Delivery,
    JobConsumer,
    JobPublisher,
    MalformedMessage,
    decode_job,
    encode_job,
    message_priority,
)

__all__ = [
    "DEAD",
    "DLX",
    "JOBS",
    "JOB_KINDS",
    "SENSORY",
    "WAIT",
    "BrokerError",
    "BrokerUnavailable",
    "Delivery",
    "JobConsumer",
    "JobPublisher",
    "MalformedMessage",
    "TopologyConflict",
    "connect",
    "declare_topology",
    "decode_job",
    "encode_job",
    "message_priority",
]
