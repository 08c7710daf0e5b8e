#!/usr/bin/env bash
# ci/sge-down.sh - stop exactly the daemons ci/sge-up.sh started.
# Adapted from shared/infra/sge-down.sh.  Reads the pid records in
# /run/hpc-ci/sge/<name>.pid, checks that each pid still belongs to a process
# named <name> (never matches by name alone), sends SIGTERM, SIGKILL after 30 s.
# Safe to run when nothing is running.  Cell configuration and spool (job ids,
# accounting file) stay, so sge-up.sh brings the same cluster back.
# sge_qmaster needs ~10 s to exit after SIGTERM.
# Quiet: one line on success; log tail on failure (exit 1).
set -uo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
# both at once: execd does not need the master to shut down
down_main sge "sge_execd sge_qmaster"
