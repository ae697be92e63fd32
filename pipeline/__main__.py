"""`python -m pipeline` runs the `atlas` command line."""
from pipeline.cli import main

main()
