"""Device side of the transport: durable outbox, uplink worker, update fetcher, gateway client."""
