"""The multi-user job service: store, scheduler, runner, API and UI."""
