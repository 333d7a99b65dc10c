"""All git for a ticket: the shared clone (clone), a worktree per ticket and the `Workspace` the pipeline
uses (worktrees), what a run changed, its commit and push (publish), git on a worktree that sandboxed code
can write (worktree_git), and the checked names, paths and records under them all (places). It may import
app.proc, app.models, app.errors and app.logger, and app.agent.guard for what counts as CI configuration.
"""
