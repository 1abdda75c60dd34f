"""The command line (``coordinator server``, ``demo``, ``probe``, ...) and the processes it runs."""
