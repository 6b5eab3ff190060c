"""The runnable demo: ``python demo/run.py`` (``make demo``); ``demo.stack`` is its engine."""
