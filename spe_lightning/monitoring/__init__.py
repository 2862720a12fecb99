"""Monitoring after training: alerts on running estimates, chunked estimates, checkpoint selection."""
