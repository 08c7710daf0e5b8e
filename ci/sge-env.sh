# shellcheck shell=sh
# ci/sge-env.sh - source me (sh/bash): environment for Grid Engine clients
# (qsub, qstat, qacct, qdel, qconf) of the cell ci/sge-up.sh creates.
# Values already set in the environment win.  The Debian packages put the
# client commands in /usr/bin, so PATH needs nothing.
SGE_ROOT=${SGE_ROOT:-/var/lib/gridengine}
SGE_CELL=${SGE_CELL:-default}
export SGE_ROOT SGE_CELL
