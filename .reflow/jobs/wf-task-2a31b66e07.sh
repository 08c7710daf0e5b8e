#!/bin/sh
# reflow pbs job script
__reflow_nl="$(printf '\n_')"; __reflow_nl="${__reflow_nl%_}"
export REFLOW_JOB=1
export REFLOW_X=1
cd "${PBS_O_WORKDIR:-.}" || exit 1
exec >'/tmp/reflow-fake-09vahpo1/sandbox/l o g s/x-'"${PBS_ARRAY_ID:-$PBS_JOBID}"_"${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-}}".out 2>&1
exec sh -c 'echo out; echo err >&2'
