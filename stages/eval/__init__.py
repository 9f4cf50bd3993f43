"""``rae eval``: what is scored (``inputs``), against what reference (``refs``), with which network
(``nets``), in one pass over the images (``features``), with the metrics' maths (``metrics``); the
stage itself is ``evaluate``."""
