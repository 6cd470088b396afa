"""Implementations of the broker seam (``walrelay.broker.Publisher``): kombu for
Redis, Sentinel and RabbitMQ; an in-memory stub for tests."""
