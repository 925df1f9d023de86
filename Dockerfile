# The virtual bike in a container: smartbiked --simulate with the example config.
# Not built in CI (it has no Docker); compose.yaml runs it next to a mosquitto:
#   docker compose up        # then point the app at localhost:1883, bike 000001
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY smartbiked ./smartbiked
# A plain install: no systemd extra, so no compiler and no libsystemd headers.
RUN pip install --no-cache-dir . && rm -rf /src
COPY config/smartbike.toml /etc/smartbiked/smartbike.toml
# The broker's address overrides the file's [broker] host and port.
ENV MQTT_HOSTNAME=broker MQTT_PORT=1883 PYTHONUNBUFFERED=1
CMD ["smartbiked", "--simulate", "--config", "/etc/smartbiked/smartbike.toml"]
