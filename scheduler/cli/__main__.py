"""`python -m scheduler.cli` = `shoal`."""
from scheduler.cli import main

main()
