"""Per-case quality: RCA scores, the quality regressor, synthetic mask errors, few-label (PPI) estimates."""
