"""What the gateway has seen and says: the event bus (``events``), JSON logs (``logs``), the counts
behind every report (``counters``), Prometheus exposition (``metrics``) and the status page (``page``)."""
