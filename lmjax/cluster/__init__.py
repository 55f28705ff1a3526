"""Starting the same run on many processes: locally, on SLURM, on TPU pod slices."""
