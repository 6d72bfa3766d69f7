"""The bottom runtime layer every other layer may use: what a process of a job is (its
`Context`), the roles and resources of a plan, checkpoint files, and membership.

Nothing here imports strategies, the training loop, engines or the service.
"""
