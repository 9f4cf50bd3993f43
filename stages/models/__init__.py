"""The networks, without I/O (``dit``, ``decoder``, ``discriminator``, ``pos_embed``, ``fp8``,
``imagenet``), and what loads pretrained weights into them (``weights``, ``encoders``)."""
