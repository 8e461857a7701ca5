"""Analysis of trained models and runs: HT-SR layer spectra (WeightWatcher) and cluster separation."""
