"""The benchmark (``loft.bench``): its command line, records, plots and extras."""
