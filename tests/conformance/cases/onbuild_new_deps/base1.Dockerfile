FROM busybox
ONBUILD COPY --from=relsrc /etc/release /out/release2
