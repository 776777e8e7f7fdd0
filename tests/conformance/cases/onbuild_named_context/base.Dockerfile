FROM busybox
ONBUILD COPY --from=otherstage /testfile /out/foo
