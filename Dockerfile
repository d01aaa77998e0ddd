# sydent-rs in a scratch image: a statically linked binary, a CA bundle and a user, nothing else
# (about 15 MB). Nothing is pulled, so it builds with no registry. The binary is built and
# staged in target/docker/rootfs by contrib/docker/build-image.sh, which then runs
# `docker build` here; run that script rather than `docker build` directly.
FROM scratch
COPY target/docker/rootfs/ /
COPY --chown=10001:10001 target/docker/data/ /data/
USER 10001:10001
# As Sydent's image: config, database and pid file in the /data volume. The internal API
# (unauthenticated binds) listens on 8091 inside the container; publish it only on loopback.
ENV SYDENT_CONF=/data/sydent.conf \
    SYDENT_DB_PATH=/data/sydent.db \
    SYDENT_PID_FILE=/data/sydent.pid \
    SYDENT_RS_INTERNALAPI_BIND_ADDRESS=:: \
    SYDENT_RS_INTERNALAPI_PORT=8091
VOLUME /data
WORKDIR /data
EXPOSE 8090 8091 4434
HEALTHCHECK --interval=10s --timeout=6s --start-period=10s --retries=3 \
    CMD ["/usr/bin/sydent-rs", "healthcheck"]
ENTRYPOINT ["/usr/bin/sydent-rs"]
