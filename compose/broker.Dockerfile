# MQTT broker of the compose swarm: Debian's mosquitto on the same base image as the nodes.
#
#   docker build -f compose/broker.Dockerfile -t p2pnode-broker:latest compose
#
# The build context can be compose/ alone (only mosquitto.conf is copied). apt reaches the Debian
# archive configured in the base image (python:3.11-slim-bookworm or a debootstrap rootfs).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
RUN set -eu; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto mosquitto-clients; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY mosquitto.conf /etc/mosquitto/p2pnode.conf
USER mosquitto
EXPOSE 1883
HEALTHCHECK --interval=5s --timeout=5s --retries=5 \
    CMD mosquitto_sub -h 127.0.0.1 -p 1883 -t '$SYS/broker/uptime' -C 1 -W 3 >/dev/null || exit 1
ENTRYPOINT ["mosquitto", "-c", "/etc/mosquitto/p2pnode.conf"]
