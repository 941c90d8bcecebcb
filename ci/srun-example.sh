#!/usr/bin/env bash
# Worked example: cpharness on a Slurm allocation. With --comm mpi each Slurm task is one rank (SLURM_PROCID /
# SLURM_NTASKS; torchrun's RANK/WORLD_SIZE/LOCAL_RANK work the same way) and the cp size is the number of tasks.
# Rank 0 writes the JSON report and the JUnit XML; every rank exits with rank 0's verdict, so the job's exit code
# is the gate (0 pass, 1 check failed, 2 error; a rank that dies or hangs past --timeout gives 2).
#
# The real-size cases run one Slurm task per GPU over NCCL (--comm nccl; SLURM_LOCALID picks the GPU).
#   sbatch -N1 --gpus-per-node=8 --ntasks-per-node=4 ci/srun-example.sh
set -euo pipefail
# The CPU suite across processes: cp = SLURM_NTASKS over OpenMPI (needs an OpenMPI built with Slurm/PMIx support).
srun build-gpu/harness/cpharness run cases/default --comm mpi --timeout 300 --out reports/out/slurm-mpi
# The real-size cases, one task per GPU (MASTER_ADDR/MASTER_PORT for the NCCL rendezvous).
export MASTER_ADDR=${MASTER_ADDR:-$(hostname)} MASTER_PORT=${MASTER_PORT:-29500}
srun build-gpu/harness/cpharness run cases/gpu --comm nccl --out reports/out/gpu --dump-dir reports/out/gpu/dumps
