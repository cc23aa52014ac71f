#!/bin/sh
echo "coverage is not supported by the offline Bazel stand-ins" >&2
exit 1
