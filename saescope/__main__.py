"""`python -m saescope` runs the command line."""

from saescope.cli import main

main()
