#!/bin/sh
# reflow sge job script
__reflow_nl="$(printf '\n_')"; __reflow_nl="${__reflow_nl%_}"
export REFLOW_JOB=1
export REFLOW_X=1
exec true
