"""The MLX model layer used by train, evaluate, fuse, export and chat: load and encode with the
assistant mask (model), sequence packing and its loss (packing), data-parallel launch (launch),
the fast BLAS and dtype per device (accel), live metrics (metrics) and resumable
checkpoints (checkpoints). May import pipeline.core."""
