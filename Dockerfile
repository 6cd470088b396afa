# One image for every service of docker-compose.yml: web, pump, workers and Flower.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md worker.py flowerconfig.py ./
COPY walstore ./walstore
COPY walrelay ./walrelay
COPY tasks ./tasks
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /app walpurchase \
 && install -d -o walpurchase -m 0700 /var/lib/walpurchase/wal /var/lib/walpurchase/ledger

# Named volumes mounted here start out with this ownership and mode: the WAL is private
# to the service user (DESIGN: files 0600 in a 0700 directory).
USER walpurchase
ENV WAL_DIR=/var/lib/walpurchase/wal \
    LEDGER_URL=sqlite:////var/lib/walpurchase/ledger/ledger.sqlite3

EXPOSE 8000
CMD ["uvicorn", "tasks.web:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "4"]
