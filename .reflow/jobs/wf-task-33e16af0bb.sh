#!/bin/sh
# reflow pbs job script
__reflow_nl="$(printf '\n_')"; __reflow_nl="${__reflow_nl%_}"
export REFLOW_JOB=1
export V0='$(touch pwned)'
export V1='; rm -rf /tmp/nothing-here'
export V2='it'"'"'s "quoted"'
export V3=two"$__reflow_nl"lines"$__reflow_nl"'#$ -q evil'"$__reflow_nl"'#PBS -q x'
export V4=-leading-dash
export V5='ünïcödé ✓'
export V6='`touch pwned2`'
export V7='back\slash'
export V8='*'
export V9=''
cd "${PBS_O_WORKDIR:-.}" || exit 1
exec printf '<%s>'"$__reflow_nl"'' '$(touch pwned)' '; rm -rf /tmp/nothing-here' 'it'"'"'s "quoted"' two"$__reflow_nl"lines"$__reflow_nl"'#$ -q evil'"$__reflow_nl"'#PBS -q x' -leading-dash 'ünïcödé ✓' '`touch pwned2`' 'back\slash' '*' ''
