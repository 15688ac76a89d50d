"""The one-command demo: runner (processes in order), observer (results and /metrics), hostile device, TUI."""
