# ReliAPI gateway image: `docker build -t reliapi . && docker run -p 8000:8000 reliapi`
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY gateway ./gateway
COPY providers ./providers
COPY policies ./policies
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin reliapi \
 && chown -R reliapi /app

USER reliapi
EXPOSE 8000
# /app/config.yaml, when mounted, is picked up automatically (or set RELIAPI_CONFIG).
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
STOPSIGNAL SIGTERM
CMD ["python", "-m", "gateway", "--host", "0.0.0.0"]
