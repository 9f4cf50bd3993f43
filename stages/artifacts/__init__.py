"""What rae writes and reads on disk: atomic files and manifests, the Zarr latent store, decoder and
diffusion runs, checkpoints, image folders and their loading workers, and where a stage may write
(``outputs``: never over an input, one writer per output)."""
