"""The MLX model layer used by train, evaluate, fuse, export and chat: load and encode with the
assistant mask (model), sequence packing and its loss (packing), preference objectives DPO/ORPO
with the reference log-probability cache (preference, preference_packing), the kept checkpoint
and early stopping (best), the train settings' checks, adapter layers and optimizer (settings),
data-parallel launch (launch), the fast BLAS and dtype per device (accel), live metrics (metrics)
and resumable checkpoints (checkpoints). May import pipeline.core."""
