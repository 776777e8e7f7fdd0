FROM busybox
RUN echo release-1.0 > /etc/release
