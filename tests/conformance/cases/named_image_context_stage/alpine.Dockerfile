FROM busybox
RUN echo 3.18.0 > /etc/alpine-release
ENV PATH=/foobar:$PATH
ENV FOOBAR=foobar
