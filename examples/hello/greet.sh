#!/bin/sh
echo "$GREETING from a dockbuild image (running as $(id -un) in $(pwd))"
cat /hello.txt
cat /app/data/message.txt
