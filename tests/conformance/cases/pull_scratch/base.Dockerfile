FROM scratch
LABEL foo=bar
