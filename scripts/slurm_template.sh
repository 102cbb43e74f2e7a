#!/bin/bash
# flowmodel SLURM job array, written by scripts/make_slurm.py on $created.
# One array task per run config (listed in $configs_file); each task runs
#   flowmodel $stage CONFIG
# Runs are resumable: resubmitting this script skips every finished stage.
#SBATCH --job-name=$job_name
#SBATCH --array=0-$last%$max_parallel
#SBATCH --time=$time
#SBATCH --cpus-per-task=$cpus
#SBATCH --mem=$mem
#SBATCH --output=$logs/%x_%A_%a.out
#SBATCH --error=$logs/%x_%A_%a.err
#SBATCH --open-mode=append
$directives
set -euo pipefail

$setup

CONFIG="$$(sed -n "$$((SLURM_ARRAY_TASK_ID + 1))p" "$configs_file")"
if [ -z "$$CONFIG" ]; then
  echo "no config for array index $$SLURM_ARRAY_TASK_ID in $configs_file" >&2
  exit 2
fi
export OMP_NUM_THREADS="$${SLURM_CPUS_PER_TASK:-1}"
export MKL_NUM_THREADS="$${SLURM_CPUS_PER_TASK:-1}"
echo "task $$SLURM_ARRAY_TASK_ID on $$(hostname): $flowmodel $stage $$CONFIG"
$flowmodel -v $stage "$$CONFIG" $extra_args
