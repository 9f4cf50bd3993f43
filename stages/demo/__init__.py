"""The embedded demonstration: generated data (``data``) and the report at the end of ``make all``
(``report``)."""
