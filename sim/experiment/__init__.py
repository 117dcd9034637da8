"""The offline continual-adaptation experiment (UTS + AKD + DWC against baselines)."""
