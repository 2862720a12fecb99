def test_combined_line_says_what_was_mixed_in():
    from spe_lightning.reporting.report import combined_line

    report = {
        "estimates": {},
        "true": {"t": {"dice": 0.8}},
        "combined": {"weight": 0.5, "n_sets": 8, "estimates": {"t": {"value": 0.75, "spe": 0.7, "regressor": 0.8}}},
    }
    assert "w 0.50" in combined_line(report) and "t 0.750 (true 0.800)" in combined_line(report)
    report["combined"]["weight"] = 0.0
    assert "not mixed" in combined_line(report)
    assert combined_line({"estimates": {}}) is None
