"""What SPE writes and logs: report JSON/CSV, summary table, figure, logger scalars, the estimate CLI's HTML page."""
