#!/bin/sh
# Run a rank's command and print its exit status (`RANK_EXIT rank=R code=C`) on stderr.
#
# For tests that signal the torchrun parent: torchrun reaps its ranks itself and, on its own
# SIGTERM, never prints their exit codes. torchrun signals each rank's whole process group, so
# this shell ignores SIGTERM (the launcher installs its own handler and still gets it) and
# reports the code afterwards. A rank killed by a signal shows as 128 + signal, as in any shell.
trap '' TERM
"$@"
code=$?
echo "RANK_EXIT rank=${RANK:-?} code=$code" >&2
exit "$code"
