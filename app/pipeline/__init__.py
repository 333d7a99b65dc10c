"""The pipeline of a ticket: the ports its collaborators fill, the steps, the durable workflow over them,
the runner that queues and operates runs, and the repository's checks. Inside, imports go one way:
ports <- steps <- workflow <- runner (the workflow also compares check failures with checks). It may
import the layers below it in pyproject's import-linter contract, never app.web or app.main.
"""
