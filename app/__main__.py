"""python -m app: the same as the auto-code command."""

from app.cli import main

main()
