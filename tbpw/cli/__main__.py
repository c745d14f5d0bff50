"""`python -m tbpw.cli`: the command line."""

from tbpw.cli import main

main()
