# ReliAPI gateway image (see README "Running in production"):
#   docker build -t reliapi .
#   docker run -p 8000:8000 -e OPENAI_API_KEY reliapi
# No key or config is baked in: keys come from the environment at run time, a config file is
# mounted at /app/config.yaml (or named by RELIAPI_CONFIG), shared state is at REDIS_URL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY gateway ./gateway
COPY providers ./providers
COPY policies ./policies
# The code stays root-owned and read-only to the user that runs it. The otel extra: spans go out over OTLP
# when OTEL_EXPORTER_OTLP_ENDPOINT is set (docs/OPERATIONS.md "Traces"), and cost nothing when it is not.
RUN pip install ".[otel]" \
 && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin reliapi

USER reliapi
EXPOSE 8000
# Liveness only: a store outage shows on /readyz (for load balancers), and restarting every
# gateway over it would not help — they degrade and keep serving.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-m", "gateway", "--healthcheck"]
# Exec form: the gateway is PID 1 and gets SIGTERM itself, then drains for server.shutdown_grace_s.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "gateway", "--host", "0.0.0.0"]
