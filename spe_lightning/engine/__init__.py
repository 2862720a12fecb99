"""The estimation engine: metrics, support sets, the reverse step, the mapping G and reports.

Plain PyTorch / NumPy / scikit-learn; usable without a Lightning Trainer.
"""
