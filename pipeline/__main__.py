"""`python -m pipeline ...` is the same as `tuneline ...`."""

from pipeline.cli import main

main()
