"""``rae train-decoder`` and ``rae train-diffusion``: ``config`` (the two config objects, below
everything else here), each stage (``decoder``, ``diffusion``: run directory, resume, logs) over its
step (``decoder_step``, ``diffusion_step``), the data plan (``data``), the run log (``runlog``) and the
decoder's losses (``losses``)."""
