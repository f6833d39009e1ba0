# Stand-ins for the official nginx and Prometheus images in the end-to-end
# test, where no image registry is reachable: Debian's packages on the locally
# built base image. The compose override runs `nginx` or `prometheus` from it.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx prometheus \
    && rm -rf /var/lib/apt/lists/*
